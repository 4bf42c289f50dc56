"""Explicit key tables: every PyTorch key maps to named Flax paths, nothing is guessed.

A table is a list of `Rule(source, target, transform)`. `apply_table` fails on a source key the
checkpoint lacks (missing) and on a checkpoint key no rule uses and no ignore pattern excuses
(unused); `check_shapes` compares the result with the Flax model's own parameter shapes.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable

import numpy as np

from conversion import ConversionError
from conversion.torch_checkpoint import short_list


@dataclasses.dataclass(frozen=True)
class Rule:
  source: str                                   # PyTorch state-dict key
  target: str                                   # '/'-joined Flax parameter path
  transform: Callable[[np.ndarray], np.ndarray] = lambda a: a


def transpose(a: np.ndarray) -> np.ndarray:
  """torch Linear weight (out, in) -> Flax Dense kernel (in, out)."""
  return a.T


def conv_oihw_to_hwio(a: np.ndarray) -> np.ndarray:
  return a.transpose(2, 3, 1, 0)


def apply_table(state: dict[str, np.ndarray], table: list[Rule], ignore: Iterable[str],
                what: str) -> dict[str, np.ndarray]:
  """Maps `state` through `table`; `ignore` are regexes of keys deliberately dropped."""
  targets = [r.target for r in table]
  assert len(targets) == len(set(targets)), 'a key table assigns a Flax path twice'
  missing = sorted({r.source for r in table} - set(state))
  if missing:
    raise ConversionError(f'{what} lacks {len(missing)} key(s) the model needs: '
                          f'{short_list(missing)}; the checkpoint is incomplete or of another '
                          'configuration (check --model/--config).')
  used = {r.source for r in table}
  ignore_res = [re.compile(p) for p in ignore]
  unused = sorted(k for k in state if k not in used and not any(p.fullmatch(k) for p in ignore_res))
  if unused:
    raise ConversionError(f'{what} has {len(unused)} key(s) the model does not use: '
                          f'{short_list(unused)}; the checkpoint is of another architecture or '
                          'configuration (check --model/--config).')
  return {r.target: np.asarray(r.transform(state[r.source]), np.float32) for r in table}


def check_shapes(flat: dict[str, np.ndarray], expected: dict[str, tuple], what: str) -> None:
  """Fails unless `flat` has exactly the expected paths and shapes."""
  missing = sorted(set(expected) - set(flat))
  extra = sorted(set(flat) - set(expected))
  wrong = sorted(f'{k} {tuple(flat[k].shape)} vs {tuple(expected[k])}'
                 for k in set(flat) & set(expected) if tuple(flat[k].shape) != tuple(expected[k]))
  if missing or extra or wrong:
    parts = [f'{name}: {short_list(keys)}' for name, keys in
             (('not filled', missing), ('not in the model', extra), ('checkpoint vs model shape',
                                                                      wrong)) if keys]
    raise ConversionError(f'{what} does not match the model configuration ({"; ".join(parts)}); '
                          'pick the configuration the checkpoint was trained with.')


def check_dimensions(found: dict, expected: dict, what: str, hint: str) -> None:
  """Compares headline sizes read off the checkpoint with the configuration's, before the
  key-by-key check, so a wrong configuration is reported as such."""
  wrong = [f'{name}: checkpoint {found[name]}, config {expected[name]}'
           for name in expected if name in found and found[name] != expected[name]]
  if wrong:
    raise ConversionError(f'{what} does not match the configuration ({"; ".join(wrong)}); {hint}')


def count_layers(state, pattern: str) -> int:
  """Number of distinct layer indices, `pattern` having one (\\d+) group."""
  return len({m.group(1) for k in state if (m := re.match(pattern, k))})
