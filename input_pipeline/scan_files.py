"""Reading and checking the raw SCAN precomp files of one split (docs/data.md 1.2-1.3).

Row granularity is derived per file: `{split}_ims.npy` and `{split}_ids.txt` may each hold one
row per image or one per caption (five identical copies), independently of each other.
Region features are memory-mapped, never loaded whole.
"""

import dataclasses
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


def npy_header(path: str) -> tuple[tuple, np.dtype, bool, int]:
  """(shape, dtype, fortran_order, header bytes) of a .npy file, read without touching its data."""
  try:
    with open(path, 'rb') as f:
      version = np.lib.format.read_magic(f)
      read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
              else np.lib.format.read_array_header_2_0)
      shape, fortran, dtype = read(f, max_header_size=1 << 20)
      return tuple(shape), np.dtype(dtype), bool(fortran), f.tell()
  except (ValueError, OSError, SyntaxError) as e:
    raise DataError(f'{path}: not a .npy file or its header is damaged ({e}); expected a '
                    'float32 array of shape [R, 36, F] saved with numpy.save') from None


def open_features(path: str) -> np.ndarray:
  """Memory map of a region-feature file after checking its header and exact byte size."""
  if not os.path.isfile(path):
    raise DataError(f'{path}: file not found (expected a float32 .npy of shape [R, 36, F])')
  shape, dtype, _, header = npy_header(path)
  if len(shape) != 3 or dtype.kind != 'f' or dtype.itemsize not in (2, 4):
    raise DataError(f'{path}: array of shape {shape} and dtype {dtype}, expected float32 '
                    '[R, 36, F]')
  expected = header + int(np.prod(shape)) * dtype.itemsize
  size = os.path.getsize(path)
  if size != expected:
    row = int(np.prod(shape[1:])) * dtype.itemsize
    raise DataError(f'{path}: {size:,} bytes, expected {expected:,} (header {header} + '
                    f'{shape[0]:,} rows x {row:,} bytes for shape {shape}); the file is '
                    f'{"truncated" if size < expected else "longer than its header says"} '
                    f'(about {max(size - header, 0) // row:,} complete rows), download it again')
  return np.load(path, mmap_mode='r')


def read_ids(path: str) -> list[int] | None:
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      lines = [line.strip() for line in f.read().split('\n')]
  except UnicodeDecodeError as e:
    raise DataError(f'{path}: not UTF-8 text (byte {e.start}); expected one integer image id '
                    'per line') from None
  if lines and lines[-1] == '':
    lines.pop()
  for n, line in enumerate(lines):
    if not line.lstrip('-').isdigit():
      raise DataError(f'{path}:{n + 1}: {line!r} is not an integer; expected one integer image '
                      'id per line')
  return [int(x) for x in lines]


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
  if id_div == 1:
    check_id_blocks(ids, ids_path)
  return SplitFiles(split, captions, feats, ids, feature_div, id_div)


def check_id_blocks(ids: list[int], path: str) -> None:
  """A per-caption ids file repeats each image's id on its 5 consecutive lines."""
  for start in range(0, len(ids), CAPTIONS_PER_IMAGE):
    block = ids[start:start + CAPTIONS_PER_IMAGE]
    if len(set(block)) != 1:
      raise DataError(f'{path}:{start + 1}-{start + 5}: ids {block} differ; a per-caption ids '
                      'file must repeat one image id on each block of 5 lines')


def granularity_note(files: SplitFiles) -> str | None:
  """The warning of docs/data.md 1.3 when the npy and ids files differ in granularity."""
  if files.id_div is None or files.id_div == files.feature_div:
    return None
  kind = {1: 'per caption', 5: 'per image'}
  return (f'{files.split}: {files.split}_ims.npy is {kind[files.feature_div]} but '
          f'{files.split}_ids.txt is {kind[files.id_div]}; read correctly here, but the original '
          'AAHR loader would pair CLIP images with the wrong captions on this split')
