"""Where a dataset's files are, for the directory layouts users arrive with (docs/data.md 1.1).

`manual_dir` may be any of
  aahr       <manual_dir>/<f30k|coco>/precomp/<split>_*          (AAHR: the parent of f30k/ and coco/)
  vse_infty  <manual_dir>/precomp/<split>_*                      (VSE-infinity / CHAN: the dataset dir)
  hrem       <manual_dir>/<f30k|coco>_precomp/<split>_*          (HREM / SCAN: the parent dir)
  flat       <manual_dir>/<split>_*                              (the precomp folder itself; the demo)
The raw images and `id_mapping.json` live in the dataset dir (`<manual_dir>/<dataset>` for aahr, the
precomp folder's parent otherwise): F30K `flickr30k-images/<name>`, COCO `images/<train2014|val2014>/...`.
Without `id_mapping.json`, Karpathy's `dataset_flickr30k.json` / `dataset_coco.json` provides the ids.
"""

import dataclasses
import json
import os

from input_pipeline.scan_files import DataError

LAYOUTS = ('aahr', 'vse_infty', 'hrem', 'flat')
IMAGE_FOLDERS = {'f30k': ('flickr30k-images', 'images'), 'coco': ('images',)}
DEFAULT_IMAGE_FOLDERS = ('images', 'flickr30k-images')
KARPATHY_FILES = {'f30k': 'dataset_flickr30k.json', 'coco': 'dataset_coco.json'}


@dataclasses.dataclass(frozen=True)
class Layout:
  name: str
  precomp_dir: str           # holds <split>_caps.txt, <split>_ims.npy, <split>_ids.txt
  dataset_dir: str           # holds id_mapping.json and the image folder
  mapping_path: str | None   # id_mapping.json or a Karpathy json, None if neither exists
  image_dir: str | None      # the folder the mapping's values are relative to

  def image_path(self, mapped_name: str) -> str | None:
    return None if self.image_dir is None else os.path.join(self.image_dir, mapped_name)


def _has_captions(folder: str) -> bool:
  return os.path.isdir(folder) and any(f.endswith('_caps.txt') for f in os.listdir(folder))


def candidates(manual_dir: str, dataset: str) -> list[tuple[str, str, str]]:
  """(layout, precomp folder, dataset folder) in the order they are tried."""
  return [
      ('aahr', os.path.join(manual_dir, dataset, 'precomp'), os.path.join(manual_dir, dataset)),
      ('vse_infty', os.path.join(manual_dir, 'precomp'), manual_dir),
      ('hrem', os.path.join(manual_dir, f'{dataset}_precomp'), manual_dir),
      ('flat', manual_dir, manual_dir),
  ]


def _dataset_dir_for_hrem(manual_dir: str, dataset: str) -> str:
  # HREM does not read images; users who have them usually keep them in <root>/<dataset>/.
  nested = os.path.join(manual_dir, dataset)
  return nested if os.path.isdir(nested) else manual_dir


def find(manual_dir: str, dataset: str, layout: str = 'auto') -> Layout:
  """The layout found under `manual_dir` (or the one named); DataError listing what was tried."""
  if not os.path.isdir(manual_dir):
    raise DataError(f'data directory not found: {manual_dir} (config.data.manual_dir; expected '
                    'the SCAN precomp files {split}_caps.txt/_ims.npy/_ids.txt in one of the '
                    f'layouts {", ".join(LAYOUTS)})')
  if layout != 'auto' and layout not in LAYOUTS:
    raise DataError(f'config.data.layout={layout!r}: expected auto or one of {LAYOUTS}')
  tried = []
  for name, precomp, dataset_dir in candidates(manual_dir, dataset):
    if layout not in ('auto', name):
      continue
    tried.append(f'{name}: {precomp}')
    if _has_captions(precomp):
      if name == 'hrem':
        dataset_dir = _dataset_dir_for_hrem(manual_dir, dataset)
      mapping = find_mapping(dataset, [dataset_dir, precomp])
      return Layout(name, precomp, dataset_dir, mapping, find_image_dir(dataset, dataset_dir))
  raise DataError(f'{manual_dir}: no {{split}}_caps.txt found for dataset {dataset!r}; looked in '
                  + '; '.join(tried))


def find_mapping(dataset: str, folders: list[str]) -> str | None:
  names = ['id_mapping.json'] + ([KARPATHY_FILES[dataset]] if dataset in KARPATHY_FILES else [])
  for name in names:
    for folder in folders:
      path = os.path.join(folder, name)
      if os.path.isfile(path):
        return path
  return None


def find_image_dir(dataset: str, dataset_dir: str) -> str | None:
  for folder in IMAGE_FOLDERS.get(dataset, DEFAULT_IMAGE_FOLDERS):
    path = os.path.join(dataset_dir, folder)
    if os.path.isdir(path):
      return path
  return None


def read_mapping(path: str | None, dataset: str) -> dict[str, str] | None:
  """{image id as a decimal string: file name relative to the image folder}."""
  if path is None:
    return None
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError(f'{path}: not valid UTF-8 JSON ({e}); expected an object '
                    '{"<image id>": "<image file>"}') from None
  if os.path.basename(path) == 'id_mapping.json':
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
      raise DataError(f'{path}: expected a JSON object {{"<image id>": "<image file>", ...}}')
    return data
  return _karpathy_mapping(data, dataset, path)


def _karpathy_mapping(data, dataset: str, path: str) -> dict[str, str]:
  """F30K ids are `imgid` (position in the list), COCO ids are `cocoid` (docs/data.md 1.6)."""
  if not isinstance(data, dict) or not isinstance(data.get('images'), list):
    raise DataError(f'{path}: expected a Karpathy split file {{"images": [...]}}')
  mapping = {}
  for position, entry in enumerate(data['images']):
    if dataset == 'coco':
      mapping[str(entry['cocoid'])] = f'{entry["filepath"]}/{entry["filename"]}'
    else:
      mapping[str(entry.get('imgid', position))] = entry['filename']
  return mapping
