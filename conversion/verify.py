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
