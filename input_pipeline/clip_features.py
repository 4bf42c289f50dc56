"""Frozen-CLIP features of a split for the loader: read from the cache, or computed online.

The cache of a built dataset lives in `config.data.clip_cache` or, when that is '', in
`<data_dir>/clip_cache/<clip name>/<builder config name>/`, one folder per split:
  clip_image_feat.npy  float32 [n_images, dim]    row i = image i of the tfds split
  clip_text_feat.npy   float32 [n_captions, dim]  row c = caption c (c // 5 = its image)
  clip_cache.json      the CLIP file it came from (path, size, fingerprint, config), the dataset
                       (name, counts) and the preprocessing; checked against the config on load.
Rows cover the whole built split; `dev` truncation applies to them as to everything else.
"""

import hashlib
import json
import os

import numpy as np

from input_pipeline import clip_encoder
from input_pipeline import layouts
from input_pipeline.scan_files import DataError

IMAGE_FILE, TEXT_FILE, META_FILE = 'clip_image_feat.npy', 'clip_text_feat.npy', 'clip_cache.json'
DEMO_CLIP_NAME = 'demo_clip'
BUILD_COMMAND = 'python main.py --config <your config> --workdir <workdir> --mode clip_cache'


def clip_wanted(config) -> bool:
  """Does the config's model take CLIP features? (AAHR always does.)"""
  return bool(config.model.get('use_clip', False)) or config.model.get('name') == 'aahr'


def clip_online(config) -> bool:
  return bool(config.data.get('clip_online', False))


def checkpoint_path(config, data_dir: str) -> str:
  """The converted CLIP file of the config; the demo's random one for synthetic data."""
  path = config.model.get('clip_checkpoint', '')
  if path:
    return path
  if config.data.name == 'synthetic':
    return clip_encoder.ensure_demo_clip(
        os.path.join(data_dir, 'clip_cache', DEMO_CLIP_NAME + '.safetensors'))
  raise DataError('config.model.clip_checkpoint is empty but the model uses CLIP features: set '
                  '--config.model.clip_checkpoint=PATH.safetensors (a file written by `python -m '
                  'conversion open_clip --model ViT-B-32 --src open_clip_pytorch_model.bin --out '
                  'PATH.safetensors`)')


def clip_name(checkpoint: str) -> str:
  return os.path.splitext(os.path.basename(checkpoint))[0]


def cache_dir(config, data_dir: str, dataset_config: str, checkpoint: str) -> str:
  """config.data.clip_cache, or <data_dir>/clip_cache/<clip name>/<builder config name>."""
  if config.data.get('clip_cache', ''):
    return config.data.clip_cache
  return os.path.join(data_dir, 'clip_cache', clip_name(checkpoint), dataset_config)


def fingerprint(path: str) -> str:
  """sha256 of the size and the first and last MiB: cheap, and changes with the weights."""
  digest = hashlib.sha256(str(os.path.getsize(path)).encode())
  with open(path, 'rb') as f:
    digest.update(f.read(1 << 20))
    f.seek(max(0, os.path.getsize(path) - (1 << 20)))
    digest.update(f.read())
  return digest.hexdigest()


class CachedClip:
  """Memory-mapped cached features of one split."""

  def __init__(self, folder: str, num_images: int, num_captions: int, checkpoint: str | None):
    meta_path = os.path.join(folder, META_FILE)
    if not os.path.isfile(meta_path):
      raise DataError(f'{folder}: CLIP feature cache not found (the config uses CLIP features); '
                      f'build it with `{BUILD_COMMAND}`, or compute them on the fly with '
                      '--config.data.clip_online=True')
    try:
      with open(meta_path, encoding='utf-8') as f:
        self.meta = json.load(f)
      self.meta['clip']['fingerprint']  # pylint: disable=pointless-statement
    except (ValueError, KeyError, TypeError) as e:
      raise DataError(f'{meta_path} is damaged ({type(e).__name__}: {e}); delete {folder} and '
                      f'rebuild it with `{BUILD_COMMAND}`') from None
    if checkpoint and os.path.isfile(checkpoint) and self.meta['clip']['fingerprint'] != \
        fingerprint(checkpoint):
      raise DataError(f'{meta_path}: the cache was computed with {self.meta["clip"]["path"]}, '
                      f'whose weights differ from config.model.clip_checkpoint={checkpoint}; '
                      f'delete {folder} and rebuild it with `{BUILD_COMMAND}`')
    self.image = self._open(folder, IMAGE_FILE, num_images)
    self.text = self._open(folder, TEXT_FILE, num_captions)
    self.dim = self.image.shape[1]

  @staticmethod
  def _open(folder: str, name: str, rows: int) -> np.ndarray:
    path = os.path.join(folder, name)
    try:
      array = np.load(path, mmap_mode='r')
    except (OSError, ValueError) as e:
      raise DataError(f'{path}: unreadable ({e}); delete {folder} and rebuild it with '
                      f'`{BUILD_COMMAND}`') from None
    if array.ndim != 2 or array.shape[0] < rows or array.dtype != np.float32:
      raise DataError(f'{path}: array {array.shape} {array.dtype}, expected float32 '
                      f'[{rows}, dim] aligned with the dataset; rebuild it with `{BUILD_COMMAND}`')
    return array

  def images(self, index: np.ndarray) -> np.ndarray:
    return np.asarray(self.image[np.asarray(index)], np.float32)

  def texts(self, index: np.ndarray) -> np.ndarray:
    return np.asarray(self.text[np.asarray(index)], np.float32)


class OnlineClip:
  """Features computed on the host when a batch is made (no cache; slower, same numbers)."""

  def __init__(self, encoder: clip_encoder.ClipEncoder, examples, layout: layouts.Layout):
    self.encoder = encoder
    self.examples = examples   # the tfds data source: image_path and captions by image index
    self.layout = layout
    self.dim = encoder.dim

  def image_path(self, i: int) -> str:
    example = self.examples[int(i)]
    rel = example['image_path'].decode() if isinstance(example['image_path'], bytes) \
        else example['image_path']
    if not rel:
      raise DataError(f'image {i} (id {int(example["image_id"])}) has no image file in '
                      f'{self.layout.mapping_path}; CLIP features need every raw image')
    return os.path.join(self.layout.dataset_dir, rel)

  def images(self, index: np.ndarray) -> np.ndarray:
    return self.encoder.image_features([self.image_path(i) for i in np.asarray(index)])

  def texts(self, index: np.ndarray) -> np.ndarray:
    captions = []
    for c in np.asarray(index):
      text = self.examples[int(c) // 5]['captions'][int(c) % 5]
      captions.append(text.decode('utf-8') if isinstance(text, bytes) else text)
    return self.encoder.text_features(captions)
