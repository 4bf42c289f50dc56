"""`--verify`: run the PyTorch reference and the converted Flax model on the same inputs (fp32, CPU)
and report the max abs difference per output."""

from __future__ import annotations

import numpy as np

from conversion import ConversionError


def report(differences: dict[str, float], tolerance: float) -> int:
  worst = max(differences.values())
  for name, diff in differences.items():
    print(f'verify: {name} max abs diff {diff:.3g}')
  if not worst <= tolerance:   # also catches NaN
    print(f'verify FAILED: max abs diff {worst:.3g} exceeds tolerance {tolerance:g}')
    return 1
  print(f'verify OK: all differences <= {tolerance:g}')
  return 0


def max_abs_diff(a, b, mask=None) -> float:
  """Max |a - b|; with `mask` (batch, length) only over the positions where it is 1."""
  diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
  if mask is not None:
    diff = diff[np.asarray(mask).astype(bool)]
  return float(np.max(diff))


def _load_torch(module, state: dict[str, np.ndarray], what: str):
  import torch
  result = module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
  missing = [k for k in result.missing_keys if not k.endswith(('position_ids', 'token_type_ids'))]
  if missing:
    raise ConversionError(f'the {what} reference model needs keys the checkpoint lacks: '
                          f'{", ".join(missing[:12])}')
  return module.eval()


def bert_inputs(config, batch: int = 3, length: int = 16, seed: int = 0):
  """Token ids with padding (rows of different lengths) and random token types."""
  rng = np.random.default_rng(seed)
  length = min(length, config.max_position_embeddings)
  ids = rng.integers(1, config.vocab_size, (batch, length))
  mask = np.ones_like(ids)
  for row in range(1, batch):
    mask[row, max(1, length - 5 * row):] = 0
  ids = np.where(mask == 1, ids, config.pad_token_id)
  types = rng.integers(0, config.type_vocab_size, ids.shape)
  return ids, mask, types


def bert_differences(out_path: str, state: dict[str, np.ndarray]) -> dict[str, float]:
  """transformers.BertModel with `state` vs aahr_jax BertModel from the converted file."""
  import jax
  import torch
  import transformers
  from aahr_jax.models import bert

  module, params = bert.load(out_path)
  hf_config = transformers.BertConfig(**module.config.to_dict())
  reference = _load_torch(
      transformers.BertModel(hf_config, add_pooling_layer=module.add_pooling_layer), state, 'BERT')
  ids, mask, types = bert_inputs(module.config)
  with torch.no_grad():
    want = reference(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                     token_type_ids=torch.from_numpy(types))
  with jax.default_matmul_precision('float32'):
    got = module.apply({'params': params}, ids, mask, types)
  # Checked on real tokens: outputs at padding positions are unused and ill-conditioned (with
  # real weights the [PAD] embedding is near-constant, so LayerNorm amplifies rounding there;
  # torch's own eager and sdpa attention differ by ~3e-5 at those positions).
  diffs = {'last_hidden_state (non-padding tokens)': max_abs_diff(got.last_hidden_state, want.last_hidden_state, mask)}
  if module.add_pooling_layer:
    diffs['pooler_output'] = max_abs_diff(got.pooler_output, want.pooler_output)
  return diffs


def clip_text_inputs(text_config, batch: int = 3, seed: int = 0) -> np.ndarray:
  """Random token rows whose largest id (the EOT, where CLIP pools) sits at varied positions."""
  rng = np.random.default_rng(seed)
  length, eot = text_config.context_length, text_config.vocab_size - 1
  ids = np.zeros((batch, length), np.int64)
  for row, end in enumerate(np.linspace(1, length - 1, batch).astype(int)):
    ids[row, :end] = rng.integers(1, eot, end)
    ids[row, end] = eot
  return ids


def open_clip_differences(out_path: str, state: dict[str, np.ndarray],
                          model_cfg: dict) -> dict[str, float]:
  """open_clip's CLIP with `state` vs aahr_jax CLIP from the converted file."""
  import inspect

  import jax
  import open_clip
  import torch
  from aahr_jax.models import clip

  module, params = clip.load(out_path)
  accepted = inspect.signature(open_clip.model.CLIP.__init__).parameters
  reference = open_clip.model.CLIP(**{k: v for k, v in model_cfg.items() if k in accepted})
  wanted = reference.state_dict()
  state = {k: v.reshape(wanted[k].shape) if k in wanted else v for k, v in state.items()}
  result = reference.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()},
                                     strict=False)
  # Keys of a tower the checkpoint does not have stay at their random init and are not compared.
  present = lambda k: (module.config.vision if k.startswith('visual.') else module.config.text)
  needed = [k for k in result.missing_keys
            if present(k) is not None and k not in ('logit_scale', 'logit_bias')]
  if needed:
    raise ConversionError(f'the open_clip reference needs keys the checkpoint lacks: '
                          f'{", ".join(needed[:12])}')
  reference.eval()
  diffs = {}
  with torch.no_grad(), jax.default_matmul_precision('float32'):
    if module.config.vision is not None:
      rng = np.random.default_rng(0)
      images = rng.standard_normal((2, *module.config.vision.image_size, 3)).astype(np.float32)
      want = reference.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2)))
      got = module.apply({'params': params}, images, method=module.encode_image)
      diffs['image features'] = max_abs_diff(got, want)
    if module.config.text is not None:
      ids = clip_text_inputs(module.config.text)
      want = reference.encode_text(torch.from_numpy(ids))
      got = module.apply({'params': params}, ids, method=module.encode_text)
      diffs['text features'] = max_abs_diff(got, want)
  return diffs
