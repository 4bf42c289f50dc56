"""Writes a Flax parameter tree as one .safetensors file with the model config in its metadata.

Read back by `aahr_jax.models.<model>.load(path)`: tensors are named by '/'-joined parameter
paths; metadata has 'model' (which loader), 'config' (JSON) and 'source' (the checkpoint read).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from conversion import ConversionError

FORMAT = 'aahr_jax.flax_params.v1'


def check_out_path(out: str | pathlib.Path) -> pathlib.Path:
  """Validates --out before any slow work."""
  out = pathlib.Path(out)
  if out.suffix != '.safetensors':
    raise ConversionError(f'--out {out} must end in .safetensors (one file of Flax parameters).')
  return out


def write(out: str | pathlib.Path, flat_params: dict[str, np.ndarray], model: str,
          config: dict, source: str) -> None:
  from safetensors.numpy import save_file
  out = check_out_path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in flat_params.items()}
  metadata = {'format': FORMAT, 'model': model, 'config': json.dumps(config, sort_keys=True),
              'source': str(source)}
  save_file(tensors, str(out), metadata=metadata)
