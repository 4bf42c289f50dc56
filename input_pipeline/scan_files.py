"""Reading and checking the raw SCAN precomp files of one split (data_eval_spec.md 1.2-1.3).

Row granularity is derived per file: `{split}_ims.npy` and `{split}_ids.txt` may each hold one
row per image or one per caption (five identical copies), independently of each other.
Region features are memory-mapped, never loaded whole.
"""

import dataclasses
import json
import os

import numpy as np

CAPTIONS_PER_IMAGE = 5
DEV_MAX_CAPTIONS = 5000  # every original loader truncates `dev` to its first 5,000 captions


class DataError(Exception):
  """Raised for missing or malformed data files; the message names the file and the expectation."""


@dataclasses.dataclass
class SplitFiles:
  """One split's files, checked for consistency. Caption c belongs to image c // 5."""
  split: str
  captions: list[str]
  features: np.ndarray  # memory map [R, 36, F]
  ids: list[int] | None
  feature_div: int  # 1 if the npy has a row per caption, 5 if a row per image
  id_div: int | None

  @property
  def num_images(self) -> int:
    return len(self.captions) // CAPTIONS_PER_IMAGE

  def image_row(self, i: int) -> int:
    return (CAPTIONS_PER_IMAGE * i) // self.feature_div

  def image_id(self, i: int) -> int:
    if self.ids is None:
      return i
    return self.ids[(CAPTIONS_PER_IMAGE * i) // self.id_div]


def _path(root: str, split: str, kind: str) -> str:
  return os.path.join(root, f'{split}_{kind}')


def available_splits(root: str) -> list[str]:
  """Splits that have a captions file, in a stable order (train, dev, test, testall, others)."""
  if not os.path.isdir(root):
    raise DataError(f'data directory not found: {root} (expected the SCAN precomp files '
                    '{split}_caps.txt, {split}_ims.npy, {split}_ids.txt)')
  names = sorted(f[:-len('_caps.txt')] for f in os.listdir(root) if f.endswith('_caps.txt'))
  preferred = [s for s in ('train', 'dev', 'test', 'testall') if s in names]
  return preferred + [s for s in names if s not in preferred]


def read_captions(path: str) -> list[str]:
  if not os.path.isfile(path):
    raise DataError(f'{path}: file not found (expected one caption per line, 5 per image)')
  try:
    with open(path, encoding='utf-8') as f:
      lines = f.read().split('\n')
  except UnicodeDecodeError as e:
    raise DataError(f'{path}: not UTF-8 text (byte {e.start}): {e.reason}') from None
  if lines and lines[-1] == '':
    lines.pop()  # the final newline
  captions = [line.strip() for line in lines]
  for n, text in enumerate(captions):
    if not text:
      raise DataError(f'{path}:{n + 1}: empty caption line (every line must hold one caption)')
  if len(captions) % CAPTIONS_PER_IMAGE:
    raise DataError(f'{path}: {len(captions)} caption lines, expected a multiple of 5 '
                    '(5 captions per image)')
  return captions


def _divisor(n_rows: int, n_captions: int, path: str, what: str) -> int:
  if n_rows == n_captions:
    return 1
  if n_rows * CAPTIONS_PER_IMAGE == n_captions:
    return CAPTIONS_PER_IMAGE
  raise DataError(f'{path}: {n_rows} {what}, expected {n_captions // CAPTIONS_PER_IMAGE} '
                  f'(one per image) or {n_captions} (one per caption) for the {n_captions} '
                  'captions of this split')


def open_features(path: str) -> np.ndarray:
  if not os.path.isfile(path):
    raise DataError(f'{path}: file not found (expected a float32 .npy of shape [R, 36, F])')
  try:
    feats = np.load(path, mmap_mode='r')
  except ValueError as e:  # a truncated file fails the memory map with a size message
    raise DataError(f'{path}: unreadable .npy ({e}); the file is probably truncated, '
                    'download it again') from None
  if feats.ndim != 3 or feats.dtype != np.float32:
    raise DataError(f'{path}: array of shape {feats.shape} and dtype {feats.dtype}, expected '
                    'float32 [R, 36, F]')
  return feats


def read_ids(path: str) -> list[int] | None:
  if not os.path.isfile(path):
    return None
  with open(path, encoding='utf-8') as f:
    lines = [line.strip() for line in f.read().split('\n')]
  if lines and lines[-1] == '':
    lines.pop()
  try:
    return [int(x) for x in lines]
  except ValueError as e:
    raise DataError(f'{path}: {e}; expected one integer image id per line') from None


def open_split(root: str, split: str, *, expected_regions: int | None = 36,
               expected_dim: int | None = None) -> SplitFiles:
  captions = read_captions(_path(root, split, 'caps.txt'))
  feats_path = _path(root, split, 'ims.npy')
  feats = open_features(feats_path)
  if expected_regions is not None and feats.shape[1] != expected_regions:
    raise DataError(f'{feats_path}: {feats.shape[1]} regions per row, expected {expected_regions}')
  if expected_dim is not None and feats.shape[2] != expected_dim:
    raise DataError(f'{feats_path}: feature dimension {feats.shape[2]}, expected {expected_dim} '
                    '(config data.region_dim)')
  feature_div = _divisor(feats.shape[0], len(captions), feats_path, 'feature rows')
  ids_path = _path(root, split, 'ids.txt')
  ids = read_ids(ids_path)
  id_div = None if ids is None else _divisor(len(ids), len(captions), ids_path, 'id lines')
  return SplitFiles(split, captions, feats, ids, feature_div, id_div)


def read_id_mapping(root: str) -> dict[str, str] | None:
  path = os.path.join(root, 'id_mapping.json')
  if not os.path.isfile(path):
    return None
  with open(path, encoding='utf-8') as f:
    return json.load(f)
