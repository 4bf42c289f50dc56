"""The frozen Flax OpenCLIP as a batched feature extractor for images files and caption strings.

Images go through open_clip's evaluation transform on the host (clip_preprocess.py, PIL, in a
thread pool), captions through the CLIP tokenizer (clip_tokenizer.py); features are the
unnormalised `encode_image` / `encode_text` outputs in float32 (docs/data.md 2.4).

The demo has no real CLIP weights (nothing can be downloaded): `ensure_demo_clip` writes a small
random-init OpenCLIP in the converted-file format, so the synthetic demo exercises the same cache
path. Its features carry little information about the images or captions, by design.
"""

import concurrent.futures
import os

import jax
import jax.numpy as jnp
import numpy as np

from aahr_jax.models import clip
from input_pipeline import clip_preprocess
from input_pipeline import clip_tokenizer
from input_pipeline.scan_files import DataError

DEMO_SEED = 0
# Small enough to featurise ~10k 96x96 images and 50k captions in well under a minute on 2 cores;
# 512-d output like ViT-B/32, so configs keep clip_dim = 512.
DEMO_CONFIG = clip.CLIPConfig(
    embed_dim=512,
    vision=clip.VisionConfig(image_size=(64, 64), patch_size=(16, 16), width=64, layers=2,
                             heads=2, mlp_width=128),
    text=clip.TextConfig(context_length=77, vocab_size=49408, width=64, heads=2, layers=2,
                         mlp_width=128),
    act='gelu')
TEXT_BUCKET = 16   # token widths are rounded up to a multiple of this (causal: exact results)


def ensure_demo_clip(path: str) -> str:
  """Writes (once, seeded) the demo's random-init CLIP as a converted .safetensors file."""
  if os.path.isfile(path):
    return path
  from conversion import flax_file   # pylint: disable=import-outside-toplevel
  from flax import traverse_util      # pylint: disable=import-outside-toplevel
  module = clip.CLIP(DEMO_CONFIG)
  params = module.init(jax.random.PRNGKey(DEMO_SEED), **clip.dummy_inputs(DEMO_CONFIG))['params']
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep='/').items()}
  tmp = path[:-len('.safetensors')] + '.partial.safetensors'
  flax_file.write(tmp, flat, model=clip.FILE_MODEL_NAME, config=DEMO_CONFIG.to_dict(),
                  source=f'random init, seed {DEMO_SEED} (demo: no pretrained CLIP available)')
  os.replace(tmp, path)
  return path


class ClipEncoder:
  """Batched CLIP features of image files and captions, float32 [n, embed_dim]."""

  def __init__(self, checkpoint: str, batch_size: int = 256, num_threads: int = 4):
    if not os.path.isfile(checkpoint):
      raise DataError(f'{checkpoint}: converted CLIP file not found (config.model.clip_checkpoint; '
                      'create it with `python -m conversion open_clip --model ViT-B-32 --src '
                      'open_clip_pytorch_model.bin --out FILE.safetensors`)')
    try:
      self.module, params = clip.load(checkpoint)
    except ValueError as e:
      raise DataError(str(e)) from None
    self.checkpoint = checkpoint
    self.config = self.module.config
    if self.config.vision is None or self.config.text is None:
      raise DataError(f'{checkpoint}: both CLIP towers are needed (image and text features)')
    self.params = jax.device_put(params)
    self.batch_size = batch_size
    self.image_size = self.config.vision.image_size[0]
    if self.config.vision.image_size[0] != self.config.vision.image_size[1]:
      raise DataError(f'{checkpoint}: square CLIP image size expected, got '
                      f'{self.config.vision.image_size}')
    self.tokenizer = clip_tokenizer.get_tokenizer()
    self.pool = concurrent.futures.ThreadPoolExecutor(num_threads)
    module = self.module
    self._images = jax.jit(lambda p, x: module.apply({'params': p}, x, method=module.encode_image))
    self._texts = jax.jit(lambda p, t: module.apply({'params': p}, t, method=module.encode_text))

  @property
  def dim(self) -> int:
    return self.config.embed_dim

  def _pixels(self, path: str) -> np.ndarray:
    try:
      return clip_preprocess.load_image(path, self.image_size)
    except FileNotFoundError:
      raise DataError(f'{path}: image file not found') from None
    except (OSError, ValueError, SyntaxError) as e:
      raise DataError(f'{path}: cannot decode the image ({e}); expected a readable JPEG/PNG, '
                      'download it again') from None

  def _run(self, fn, inputs: np.ndarray) -> np.ndarray:
    """Pads the last batch to the batch size so each shape compiles once."""
    n = len(inputs)
    pad = self.batch_size - n
    if pad > 0:
      inputs = np.concatenate([inputs, np.repeat(inputs[-1:], pad, axis=0)])
    with jax.default_matmul_precision('float32'):
      return np.asarray(fn(self.params, jnp.asarray(inputs)), np.float32)[:n]

  def image_features(self, paths: list[str]) -> np.ndarray:
    out = []
    for lo in range(0, len(paths), self.batch_size):
      pixels = np.stack(list(self.pool.map(self._pixels, paths[lo:lo + self.batch_size])))
      out.append(self._run(self._images, pixels))
    return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

  def text_features(self, captions: list[str]) -> np.ndarray:
    length = self.config.text.context_length
    out = []
    for lo in range(0, len(captions), self.batch_size):
      ids = self.tokenizer(captions[lo:lo + self.batch_size], context_length=length)
      if self.config.text.causal_mask and self.config.text.pool_type == 'argmax':
        # The pooled (end-token) position never sees later ones: trailing pads can be dropped.
        used = int((ids != 0).sum(axis=1).max())
        ids = ids[:, :min(length, -(-used // TEXT_BUCKET) * TEXT_BUCKET)]
      out.append(self._run(self._texts, ids))
    return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)
