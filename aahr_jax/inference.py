"""Retriever: load a model, embed images and captions exactly as the evaluation does.

  r = Retriever.from_checkpoint('weights/aahr_f30k')          # a converted DIR or a workdir
  img = r.embed_images(regions, region_lengths, clip_image)    # [B, D] numpy
  cap = r.embed_captions(token_ids, lengths, clip_text)        # [B, D] numpy
  scores = img @ cap.T                                         # the evaluator's similarity
  q = r.embed_texts(['two dogs on a beach'])                   # tokenised (+ CLIP text) here

Embeddings are computed in eval mode, fp32, at the highest matmul precision. A call embeds exactly
the batch it is given: AAHR's caption embeddings depend on the batch's longest caption (GGLP
attends to pad tokens, quirk Q20), so to reproduce the original numbers pass the original's
batches (dataset order, batch size 128 for F30K / 256 for COCO).

A converted DIR (`python -m conversion aahr|vse_infty`) holds `model.json` (model config,
input sizes, provenance) and `variables.safetensors` ('/'-joined paths of params and
batch_stats). `from_checkpoint` dispatches on what a path contains, so trained workdirs and
orbax checkpoints can be added as further loaders.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from aahr_jax.models import aahr

CONVERTED_FORMAT = 'aahr_jax.converted.v1'
MODEL_JSON = 'model.json'
VARIABLES_FILE = 'variables.safetensors'
CLIP_MODELS = ('aahr',)  # models whose encoders take CLIP global features


# ----------------------------------------------------------------------------------------------
# Converted DIR: writing (used by the converters) and reading
# ----------------------------------------------------------------------------------------------

def write_converted_dir(out, model_config: dict, variables: dict, inputs: dict, *, source: str,
                        original: dict | None = None) -> None:
  """Writes model.json + variables.safetensors. `inputs`: region_dim, clip_dim, max_len."""
  from flax import traverse_util
  from safetensors.numpy import save_file
  out = pathlib.Path(out)
  if out.exists() and not out.is_dir():
    raise ValueError(f'--out {out} exists and is not a directory; pass a directory path.')
  out.mkdir(parents=True, exist_ok=True)
  flat = traverse_util.flatten_dict(variables, sep='/')
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()},
            str(out / VARIABLES_FILE), metadata={'format': CONVERTED_FORMAT})
  meta = {'format': CONVERTED_FORMAT, 'model': model_config, 'inputs': inputs,
          'source': source, 'original': original or {}}
  (out / MODEL_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + '\n')


def load_converted_dir(path) -> tuple[ml_collections.ConfigDict, dict, dict]:
  """(model config, variables, inputs) from a converted DIR; checks every variable's shape."""
  from flax import traverse_util
  from safetensors import SafetensorError, safe_open
  path = pathlib.Path(path)
  try:
    meta = json.loads((path / MODEL_JSON).read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f'cannot read {path / MODEL_JSON}: {e}; convert the checkpoint again '
                     'with `python -m conversion aahr|vse_infty`.') from e
  if meta.get('format') != CONVERTED_FORMAT:
    raise ValueError(f'{path / MODEL_JSON} has format {meta.get("format")!r}, expected '
                     f'{CONVERTED_FORMAT!r}; convert the checkpoint again.')
  try:
    with safe_open(str(path / VARIABLES_FILE), framework='numpy') as f:
      flat = {k: f.get_tensor(k) for k in f.keys()}
  except (OSError, SafetensorError) as e:
    raise ValueError(f'cannot read {path / VARIABLES_FILE}: {e}; convert the checkpoint '
                     'again.') from e
  config = ml_collections.ConfigDict(meta['model'])
  model = aahr.build_model(config)
  expected = traverse_util.flatten_dict(
      jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                        _tiny_batch(config.name, meta['inputs']))), sep='/')
  missing = sorted(set(expected) - set(flat))
  extra = sorted(set(flat) - set(expected))
  wrong = sorted(k for k in set(flat) & set(expected) if flat[k].shape != expected[k].shape)
  if missing or extra or wrong:
    raise ValueError(f'{path}: the weights do not fit the model in {MODEL_JSON}: missing '
                     f'{missing[:5]}, unexpected {extra[:5]}, wrong shape {wrong[:5]}.')
  return config, traverse_util.unflatten_dict(flat, sep='/'), meta['inputs']


def _tiny_batch(name: str, inputs: dict) -> dict:
  batch = {'regions': np.zeros((2, 4, inputs['region_dim']), np.float32),
           'region_len': np.full((2,), 4, np.int32), 'bert_ids': np.ones((2, 4), np.int32),
           'bert_len': np.full((2,), 4, np.int32)}
  if name in CLIP_MODELS:
    batch['clip_image'] = np.zeros((2, inputs['clip_dim']), np.float32)
    batch['clip_text'] = np.zeros((2, inputs['clip_dim']), np.float32)
  return batch


# ----------------------------------------------------------------------------------------------
# Trained workdir: config.json + orbax checkpoints (aahr_jax/checkpoint.py)
# ----------------------------------------------------------------------------------------------

WORKDIR_CONFIG = 'config.json'
ENCODER_PARAMS = ('img', 'txt')  # what embedding needs; training-only groups are left out


def is_workdir(path) -> bool:
  path = pathlib.Path(path)
  return (path / WORKDIR_CONFIG).is_file() and (path / 'checkpoints').is_dir()


def load_workdir_config(path) -> ml_collections.ConfigDict:
  from aahr_jax import json_files
  config_path = pathlib.Path(path) / WORKDIR_CONFIG
  try:
    return ml_collections.ConfigDict(json_files.read(str(config_path), RESTORE_CONFIG))
  except OSError as e:
    raise ValueError(f'cannot read {config_path}: {e.strerror}; {RESTORE_CONFIG}') from None


# A workdir's config.json is rewritten by every training run that resumes from it.
RESTORE_CONFIG = ('copy it back from a backup, or rewrite it by running the training command '
                  'of this workdir (with its --config) again: it resumes and rewrites the file')


def load_workdir(path, step: str | int | None = None) -> tuple[ml_collections.ConfigDict, dict,
                                                               dict, int]:
  """(model config, variables, inputs, step) of a trained workdir: `step` names a checkpoint
  step, 'latest' or 'best'; None = the best (best.json) if recorded, else the latest."""
  from aahr_jax import checkpoint
  from aahr_jax import evaluate
  config = load_workdir_config(path)
  checkpoint.require_checkpoint(str(path))
  mngr = checkpoint.manager(str(path), config.get('keep_checkpoints', 3))
  best_mngr = checkpoint.manager(str(path), 1, checkpoint.BEST_DIR)
  which = evaluate.default_checkpoint(str(path), None if step is None else str(step))
  if which is not None and str(which).isdigit() and best_mngr.latest_step() == int(which):
    mngr = best_mngr  # the selected model is kept in best/ even after checkpoints/ moved on
  resolved = checkpoint.resolve_step(mngr, which)
  try:
    state = checkpoint.restore_on_one_device(mngr, resolved)
  except checkpoint.UnreadableCheckpoint as e:
    raise checkpoint.UnreadableCheckpoint(
        e.folder, f'{e.reason}; {checkpoint.alternatives(str(path), e.folder)}') from None
  params = {k: v for k, v in state['params'].items() if k in ENCODER_PARAMS}
  variables = jax.tree.map(np.asarray, {'params': params,
                                        'batch_stats': state.get('batch_stats') or {}})
  clip_checkpoint = config.model.get('clip_checkpoint', '') or None
  if clip_checkpoint is None and config.model.name in CLIP_MODELS and (
      config.data.name == 'synthetic'):
    # The demo trained on the features of its seeded random CLIP: the same one embeds queries.
    from input_pipeline import clip_features, datasets  # pylint: disable=import-outside-toplevel
    clip_checkpoint = clip_features.checkpoint_path(config, datasets.data_dir(config, str(path)))
  inputs = {'region_dim': config.data.region_dim, 'max_len': config.data.max_len,
            'clip_dim': config.model.get('clip_dim', 512),
            'vocab_path': config.data.get('vocab_path', '') or None,
            'clip_checkpoint': clip_checkpoint}
  return config.model, variables, inputs, resolved


# ----------------------------------------------------------------------------------------------
# Retriever
# ----------------------------------------------------------------------------------------------

def _bucket(n: int) -> int:
  """Batch sizes are padded to powers of two (with invalid rows) to bound recompilation."""
  return 1 << max(int(n) - 1, 0).bit_length()


class Retriever:
  """Embeds images and captions with a loaded model (eval mode, fp32, highest precision)."""

  def __init__(self, model_config: ml_collections.ConfigDict, variables: dict, inputs: dict):
    self.config = model_config
    self.inputs = dict(inputs)
    self.model = aahr.build_model(model_config)
    self.variables = jax.tree.map(jnp.asarray, variables)
    self.uses_clip = model_config.name in CLIP_MODELS
    self.source = ''  # where the weights came from (set by from_checkpoint for workdirs)
    self._embed_images = jax.jit(self._images_fn)
    self._embed_captions = jax.jit(self._captions_fn)

  @classmethod
  def from_checkpoint(cls, path, step: str | int | None = None) -> 'Retriever':
    """A converted DIR (has model.json), or a trained workdir (config.json + checkpoints/:
    the best checkpoint if best.json records one, else the latest; or `step`)."""
    path = pathlib.Path(path)
    if (path / MODEL_JSON).is_file():
      return cls(*load_converted_dir(path))
    if is_workdir(path):
      model_config, variables, inputs, resolved = load_workdir(path, step)
      retriever = cls(model_config, variables, inputs)
      retriever.source = f'{path} step {resolved}'
      return retriever
    if not path.exists():
      raise FileNotFoundError(f'{path} does not exist.')
    raise ValueError(f'{path} is neither a converted checkpoint directory (no {MODEL_JSON}) '
                     f'nor a trained workdir (no {WORKDIR_CONFIG} + checkpoints/); convert '
                     'released weights with `python -m conversion aahr|vse_infty --src '
                     'model_best.pth --out DIR`, or pass the --workdir of a training run.')

  # --- jitted bodies (static shapes; `valid` marks the real rows) ---

  def _images_fn(self, variables, regions, lengths, clip, valid):
    if self.uses_clip:
      return self.model.apply(variables, regions, lengths, clip, valid,
                              method=self.model.embed_images)
    return self.model.apply(variables, regions, lengths, valid, method=self.model.embed_images)

  def _captions_fn(self, variables, ids, lengths, clip, valid):
    if self.uses_clip:
      return self.model.apply(variables, ids, lengths, clip, valid,
                              method=self.model.embed_captions)
    return self.model.apply(variables, ids, lengths, method=self.model.embed_captions)

  # --- public API ---

  def embed_images(self, regions, region_lengths, clip_image=None) -> np.ndarray:
    """regions float32 [B, R, region_dim] zero-padded, region_lengths int [B] (1..R),
    clip_image float32 [B, clip_dim] (None for models without the CLIP branch) -> [B, D]."""
    regions = np.asarray(regions, np.float32)
    if regions.ndim != 3 or regions.shape[2] != self.inputs['region_dim']:
      raise ValueError(f'regions must be [B, R, {self.inputs["region_dim"]}], got '
                       f'{list(regions.shape)}.')
    lengths = self._lengths(region_lengths, regions.shape[0], regions.shape[1], 'region_lengths')
    clip = self._clip(clip_image, regions.shape[0], 'clip_image')
    return self._run(self._embed_images, regions, lengths, clip)

  def embed_captions(self, token_ids, lengths, clip_text=None) -> np.ndarray:
    """token_ids int [B, L] BERT ids ([CLS] ... [SEP], 0-padded), lengths [B] counting CLS and
    SEP, clip_text float32 [B, clip_dim] (None without CLIP branch) -> [B, D]. The batch is
    embedded as given (AAHR captions depend on the batch's longest caption, Q20)."""
    ids = np.asarray(token_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f'token_ids must be an integer array [B, L], got {ids.dtype} '
                       f'{list(ids.shape)}.')
    if ids.shape[1] > self.inputs['max_len']:
      raise ValueError(f'token_ids are {ids.shape[1]} wide; the BERT has '
                       f'{self.inputs["max_len"]} positions.')
    lengths = self._lengths(lengths, ids.shape[0], ids.shape[1], 'lengths')
    clip = self._clip(clip_text, ids.shape[0], 'clip_text')
    return self._run(self._embed_captions, ids.astype(np.int32), lengths, clip)

  def embed_texts(self, texts: list[str], clip_text=None) -> np.ndarray:
    """Free text -> [B, D] caption embeddings: BERT WordPiece ids as the evaluation makes them
    (truncated to the model's max_len) and, for CLIP models, CLIP text features (given, or
    computed with the CLIP checkpoint named by the workdir's config.model.clip_checkpoint)."""
    from input_pipeline import bert_tokenizer
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
      raise ValueError('embed_texts takes a list of strings, e.g. ["two dogs on a beach"].')
    tokenizer = bert_tokenizer.get_tokenizer(self.inputs.get('vocab_path'))
    max_len = self.inputs['max_len']
    rows = []
    for text in texts:
      ids = tokenizer.encode(text)
      rows.append(ids if len(ids) <= max_len else ids[:max_len - 1] + [bert_tokenizer.SEP_ID])
    width = max((len(r) for r in rows), default=2)
    ids = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
      ids[i, :len(r)] = r
    if self.uses_clip and clip_text is None:
      clip_text = self._clip_text_encoder().text_features(list(texts))
    return self.embed_captions(ids, np.asarray([len(r) for r in rows], np.int32), clip_text)

  def _clip_text_encoder(self):
    if getattr(self, '_clip_encoder', None) is None:
      checkpoint = self.inputs.get('clip_checkpoint')
      if not checkpoint:
        raise ValueError(f'this {self.config.name} model needs CLIP text features: pass '
                         'clip_text=[B, clip_dim] to embed_texts, or load a workdir whose '
                         'config.model.clip_checkpoint names the converted CLIP file.')
      from input_pipeline import clip_encoder
      self._clip_encoder = clip_encoder.ClipEncoder(checkpoint)
    return self._clip_encoder

  @staticmethod
  def similarity(image_embeddings, caption_embeddings) -> np.ndarray:
    """[N_img, N_cap] dot products, the evaluation's scores (AAHR does not re-normalise)."""
    return np.asarray(image_embeddings, np.float64) @ np.asarray(caption_embeddings,
                                                                 np.float64).T

  # --- helpers ---

  @staticmethod
  def _lengths(lengths, batch: int, width: int, name: str) -> np.ndarray:
    lengths = np.asarray(lengths)
    if lengths.shape != (batch,) or not np.issubdtype(lengths.dtype, np.integer):
      raise ValueError(f'{name} must be an integer array [{batch}], got {lengths.dtype} '
                       f'{list(lengths.shape)}.')
    if batch and (lengths.min() < 1 or lengths.max() > width):
      raise ValueError(f'{name} must lie in 1..{width} (the padded width), got '
                       f'{lengths.min()}..{lengths.max()}.')
    return lengths.astype(np.int32)

  def _clip(self, clip, batch: int, name: str) -> np.ndarray:
    if not self.uses_clip:
      return np.zeros((batch, 1), np.float32)  # ignored: the model has no CLIP branch
    if clip is None:
      raise ValueError(f'this {self.config.name} model needs {name} (CLIP global features '
                       f'[B, {self.inputs["clip_dim"]}]).')
    clip = np.asarray(clip, np.float32)
    if clip.shape != (batch, self.inputs['clip_dim']):
      raise ValueError(f'{name} must be [{batch}, {self.inputs["clip_dim"]}], got '
                       f'{list(clip.shape)}.')
    return clip

  def _run(self, fn, data: np.ndarray, lengths: np.ndarray, clip: np.ndarray) -> np.ndarray:
    batch = data.shape[0]
    if batch == 0:
      return np.zeros((0, self.config.embed_size), np.float32)
    padded = _bucket(batch)
    pad = lambda a, fill: np.concatenate(
        [a, np.full((padded - batch,) + a.shape[1:], fill, a.dtype)]) if padded > batch else a
    valid = np.arange(padded) < batch
    with jax.default_matmul_precision('highest'):
      out = fn(self.variables, pad(data, 0), pad(lengths, 1), pad(clip, 0), valid)
    return np.asarray(out[:batch], np.float32)
