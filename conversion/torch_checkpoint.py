"""Reads PyTorch checkpoints (.bin/.pt/.pth/.safetensors, HF folders, sharded HF folders) into
a flat {name: float32 numpy array} dict on the CPU."""

from __future__ import annotations

import json
import pathlib
from typing import Iterable

import numpy as np

from conversion import ConversionError, torch_load

WEIGHT_SUFFIXES = ('.safetensors', '.bin', '.pt', '.pth')
# Entries under which training scripts nest the weights ({'state_dict': ..., 'optimizer': ...}).
WRAPPER_KEYS = ('state_dict', 'model', 'module')


def short_list(names: Iterable[str], limit: int = 12) -> str:
  """`a, b, c ... (+N more)`: keeps error messages to one readable line."""
  names = list(names)
  shown = ', '.join(names[:limit])
  return shown + (f' ... (+{len(names) - limit} more)' if len(names) > limit else '')


def find_weights_file(src: pathlib.Path, preferred_names: Iterable[str]) -> pathlib.Path:
  """The weights file inside folder `src`, by preference order, else the only candidate."""
  for name in preferred_names:
    if (src / name).is_file():
      return src / name
  candidates = sorted(p for p in src.iterdir() if p.suffix in WEIGHT_SUFFIXES)
  if len(candidates) == 1:
    return candidates[0]
  raise ConversionError(
      f'cannot choose the weights file in folder {src}: found '
      f'{short_list(p.name for p in candidates) or "no .safetensors/.bin/.pt/.pth file"}; '
      f'pass the file itself as --src (expected one of {short_list(preferred_names)}).')


def read_state_dict(src: str | pathlib.Path, preferred_names: Iterable[str],
                    trust_pickle: bool = False) -> tuple[dict[str, np.ndarray], pathlib.Path]:
  """Returns (state dict as float32 numpy arrays, path of the file read).

  `src` may be a weights file or a folder holding one (or an HF `*.index.json` shard index).
  Pickled files are read by `torch_load.load`: nothing in them runs unless trust_pickle.
  """
  src = pathlib.Path(src)
  if not src.exists():
    raise ConversionError(f'--src {src} does not exist; pass a checkpoint file or model folder.')
  path = find_weights_file(src, preferred_names) if src.is_dir() else src
  if path.name.endswith('.index.json'):
    return _read_sharded(path, trust_pickle), path
  state = _read_one_file(path, trust_pickle)
  return _unwrap(state, path), path


def _read_sharded(index_path: pathlib.Path, trust_pickle: bool) -> dict[str, np.ndarray]:
  try:
    shards = sorted(set(json.loads(index_path.read_text())['weight_map'].values()))
  except (OSError, ValueError, KeyError) as e:
    raise ConversionError(f'cannot read shard index {index_path}: {e}; '
                          'pass a single weights file as --src instead.') from e
  state = {}
  for shard in shards:
    shard_path = index_path.parent / shard
    state.update(_unwrap(_read_one_file(shard_path, trust_pickle), shard_path))
  return state


def _read_one_file(path: pathlib.Path, trust_pickle: bool) -> dict:
  if path.suffix not in WEIGHT_SUFFIXES:
    raise ConversionError(f'--src {path} is not a {"/".join(WEIGHT_SUFFIXES)} file; '
                          'pass a PyTorch checkpoint or a model folder.')
  try:
    if path.suffix == '.safetensors':
      from safetensors.torch import load_file
      return load_file(str(path), device='cpu')
    return torch_load.load(path, trust_pickle)
  except ConversionError:
    raise
  except Exception as e:  # torch/safetensors raise many types for damaged files
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConversionError(
        f'cannot read checkpoint {path} ({type(e).__name__}: {reason}); the file is truncated, '
        'damaged or not a PyTorch checkpoint: download or save it again.') from e


def _unwrap(checkpoint, path: pathlib.Path) -> dict[str, np.ndarray]:
  """Finds the tensor dict inside a training checkpoint and strips DataParallel's 'module.'."""
  import torch
  if not isinstance(checkpoint, dict):
    raise ConversionError(f'{path} holds a {type(checkpoint).__name__}, not a state dict; '
                          'save `model.state_dict()` and convert that file.')
  for key in WRAPPER_KEYS:
    if isinstance(checkpoint.get(key), dict):
      checkpoint = checkpoint[key]
      break
  tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
  if not tensors:
    raise ConversionError(f'{path} contains no tensors (top-level keys: '
                          f'{short_list(map(str, checkpoint))}); pass a model checkpoint.')
  if all(k.startswith('module.') for k in tensors):
    tensors = {k[len('module.'):]: v for k, v in tensors.items()}
  return {k: _to_numpy(v) for k, v in tensors.items()}


def _to_numpy(t) -> np.ndarray:
  import torch
  t = t.detach().cpu()
  if t.is_floating_point():
    t = t.to(torch.float32)   # bf16/fp16 checkpoints are stored as fp32 params
  return t.numpy().copy()
