"""tfds builders for the SCAN precomp data: `f30k_precomp`, `coco_precomp`, generic `butd`, `synthetic`.

One example per image, in split order (`disable_shuffling=True`: the evaluator relies on captions
5i..5i+4 belonging to image i and on contiguous COCO folds). Each example names its captions
explicitly (`caption_indices`), the row it came from in `<split>_ims.npy` and the image file found
through `id_mapping.json` (or the Karpathy json). Splits are whatever `<split>_caps.txt` files exist
(train, dev, test, testall, ...); `dev` is stored whole and truncated when opened (datasets.py).

Region features do not go through the tfds records: they are copied once, one row per image, into
`regions-<split>.npy` next to them (float32, or float16 with `feature_dtype='float16'`) and read
back as a memory map (`as_data_source` joins them to the examples). Reading a 36 x 2048 record
costs ~0.4 ms, a memory-mapped row ~0.05 ms.

Builds are all or nothing: tfds writes into an `incomplete.*` folder that is renamed when the build
succeeds and removed when it fails; folders left by a killed build are removed by the next one.
Every raw file is checked before anything is written.
"""

import dataclasses
import glob
import os
import shutil
import time

import numpy as np
import tensorflow_datasets as tfds

from input_pipeline import layouts
from input_pipeline import scan_files

VERSION = '2.0.0'
FEATURE_DTYPES = ('float32', 'float16')
COPY_CHUNK_ROWS = 512


@dataclasses.dataclass
class ScanPrecompConfig(tfds.core.BuilderConfig):
  dataset: str = 'precomp'   # f30k | coco pick the folder and image names of docs/data.md 1.1
  region_dim: int = 2048
  num_regions: int = 36
  feature_dtype: str = 'float32'


def regions_path(data_dir: str, split: str) -> str:
  return os.path.join(data_dir, f'regions-{split}.npy')


class RegionSource:
  """A tfds data source whose examples also carry `regions`, read from the memory map."""

  def __init__(self, source, regions: np.ndarray):
    if len(source) != len(regions):
      raise scan_files.DataError(f'{regions.filename}: {len(regions)} rows, expected '
                                 f'{len(source)} (one per image); rebuild the dataset')
    self.source = source
    self.regions = regions

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict:
    return dict(self.source[i], regions=np.asarray(self.regions[i], np.float32))


class ScanPrecomp(tfds.core.GeneratorBasedBuilder):
  """Region features, five captions, ids and image files of every image of SCAN precomp splits."""

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {'2.0.0': 'regions in a memory-mapped .npy; explicit caption and row indices; '
                            'image paths; layouts of AAHR, VSE-infinity and HREM'}
  BUILDER_CONFIGS = [
      ScanPrecompConfig(name='f30k_precomp', dataset='f30k', description='Flickr30K, BUTD'),
      ScanPrecompConfig(name='coco_precomp', dataset='coco', description='MS-COCO, BUTD'),
      ScanPrecompConfig(name='butd', description='a precomp folder of any dataset (2048-d)'),
      ScanPrecompConfig(name='synthetic', dataset='synthetic', region_dim=64,
                        description='the embedded synthetic world (64-d regions)'),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Point manual_dir at the SCAN precomp files in the AAHR layout (<dir>/<f30k|coco>/precomp/, '
      'id_mapping.json, images), the VSE-infinity layout (<dir>/precomp/) or the HREM layout '
      '(<dir>/<f30k|coco>_precomp/); see docs/data.md section 1.')

  def __init__(self, *, layout: str = 'auto', require_images: bool = False,
               progress: bool = True, **kwargs):
    self._layout_name = layout
    self._require_images = require_images
    self._progress = progress
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'image_index': np.int64,
            'image_id': np.int64,
            'image_row': np.int64,      # row of <split>_ims.npy the regions came from
            'caption_indices': tfds.features.Tensor(shape=(scan_files.CAPTIONS_PER_IMAGE,),
                                                    dtype=np.int64),
            'captions': tfds.features.Sequence(tfds.features.Text(),
                                               length=scan_files.CAPTIONS_PER_IMAGE),
            'image_file': tfds.features.Text(),   # the id_mapping.json value ('' if none)
            'image_path': tfds.features.Text(),   # relative to the dataset folder ('' if none)
        }),
        disable_shuffling=True,
    )

  def as_data_source(self, split=None, *args, **kwargs):
    if split is None:
      return {s: self.as_data_source(s, *args, **kwargs) for s in self.info.splits}
    source = super().as_data_source(split, *args, **kwargs)
    path = regions_path(str(self.data_dir), str(split))
    if not os.path.isfile(path):
      raise scan_files.DataError(f'{path}: region features missing from the built dataset; '
                                 f'delete {self.data_dir} and build again (--mode build_data)')
    return RegionSource(source, np.load(path, mmap_mode='r'))

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    layout = layouts.find(str(dl_manager.manual_dir), cfg.dataset, self._layout_name)
    opened = open_all(layout, cfg)
    mapping = layouts.read_mapping(layout.mapping_path, cfg.dataset)
    images = {s: resolve_images(files, layout, mapping, self._require_images)
              for s, files in opened.items()}
    for split, files in opened.items():   # self.data_dir is tfds's incomplete folder here
      copy_regions(files, regions_path(str(self.data_dir), split), cfg.feature_dtype,
                   self._progress)
    return {s: self._generate_examples(files, images[s]) for s, files in opened.items()}

  def _generate_examples(self, files: scan_files.SplitFiles, images: list[tuple[str, str]]):
    for i in range(files.num_images):
      first = scan_files.CAPTIONS_PER_IMAGE * i
      yield i, {
          'image_index': i,
          'image_id': files.image_id(i),
          'image_row': files.image_row(i),
          'caption_indices': np.arange(first, first + scan_files.CAPTIONS_PER_IMAGE),
          'captions': files.captions[first:first + scan_files.CAPTIONS_PER_IMAGE],
          'image_file': images[i][0],
          'image_path': images[i][1],
      }


def open_all(layout: layouts.Layout, cfg: ScanPrecompConfig) -> dict[str, scan_files.SplitFiles]:
  splits = scan_files.available_splits(layout.precomp_dir)
  if not splits:
    raise scan_files.DataError(f'{layout.precomp_dir}: no {{split}}_caps.txt file found')
  opened = {s: scan_files.open_split(layout.precomp_dir, s, expected_regions=cfg.num_regions,
                                     expected_dim=cfg.region_dim) for s in splits}
  for files in opened.values():
    note = scan_files.granularity_note(files)
    if note:
      print(f'warning: {note}', flush=True)
  return opened


def resolve_images(files: scan_files.SplitFiles, layout: layouts.Layout, mapping,
                   require: bool) -> list[tuple[str, str]]:
  """(mapping value, path relative to the dataset folder) of every image of the split.

  With `require` (CLIP features are needed), an id missing from the mapping or a missing file is
  an error naming both; otherwise such images get '' and are counted in a warning.
  """
  ids_file = os.path.join(layout.precomp_dir, f'{files.split}_ids.txt')
  if require and files.ids is None:
    raise scan_files.DataError(f'{ids_file}: file not found; it is needed to find the raw image '
                               'of every row (one integer image id per line)')
  if require and (mapping is None or layout.image_dir is None):
    what = ('id_mapping.json (or the Karpathy json)' if mapping is None
            else 'the image folder (flickr30k-images/ or images/)')
    raise scan_files.DataError(f'{layout.dataset_dir}: {what} not found; the raw images are '
                               'needed for the CLIP features (docs/data.md 1.5)')
  out, missing = [], 0
  for i in range(files.num_images):
    image_id = files.image_id(i)
    name = (mapping or {}).get(str(image_id), '')
    path = layout.image_path(name) if name else None
    if require and not name:
      line = scan_files.CAPTIONS_PER_IMAGE * i // files.id_div + 1
      raise scan_files.DataError(f'{layout.mapping_path}: no entry for image id {image_id} '
                                 f'({ids_file} line {line}); every id must map to an image file')
    if require and not os.path.isfile(path):
      raise scan_files.DataError(f'{path}: image file not found (image id {image_id} of split '
                                 f'{files.split}, via {layout.mapping_path})')
    if not name:
      missing += 1
    rel = os.path.relpath(path, layout.dataset_dir) if path else ''
    out.append((name, rel))
  if missing and mapping is not None:
    print(f'warning: {missing} of {files.num_images} {files.split} image ids are not in '
          f'{layout.mapping_path} (fine for region-only models)', flush=True)
  return out


def copy_regions(files: scan_files.SplitFiles, path: str, dtype: str, progress: bool) -> None:
  """One row per image from the (possibly per-caption) source memory map, in chunks."""
  if dtype not in FEATURE_DTYPES:
    raise scan_files.DataError(f'config.data.feature_dtype={dtype!r}: expected one of '
                               f'{FEATURE_DTYPES}')
  n = files.num_images
  out = np.lib.format.open_memmap(path, mode='w+', dtype=np.dtype(dtype),
                                  shape=(n, *files.features.shape[1:]))
  start = last = time.time()
  for lo in range(0, n, COPY_CHUNK_ROWS):
    hi = min(lo + COPY_CHUNK_ROWS, n)
    rows = np.arange(lo, hi) * scan_files.CAPTIONS_PER_IMAGE // files.feature_div
    out[lo:hi] = files.features[rows[0]:rows[-1] + 1:5 // files.feature_div]
    if progress and (time.time() - last > 10 or hi == n) and n > COPY_CHUNK_ROWS:
      last = time.time()
      print(f'  regions {files.split}: {hi:,}/{n:,} images ({hi / (last - start):,.0f}/s)',
            flush=True)
  out.flush()
  del out


def remove_stale_builds(version_dir: str) -> None:
  """Folders left by an interrupted build (tfds names them incomplete.XXXXXX_<version>)."""
  parent, version = os.path.split(version_dir.rstrip('/'))
  for stale in glob.glob(os.path.join(parent, f'incomplete.*_{version}')):
    print(f'Removing {stale} (left by an interrupted build).', flush=True)
    shutil.rmtree(stale, ignore_errors=True)


def make_config(config_name: str, region_dim: int | None = None,
                feature_dtype: str = 'float32') -> ScanPrecompConfig:
  """A named config, or a variant of it (`<name>_d<dim>`, `_fp16`) for other dims and dtypes."""
  known = {c.name: c for c in ScanPrecomp.BUILDER_CONFIGS}
  if config_name not in known:
    raise ValueError(f'unknown builder config {config_name!r}; known: {sorted(known)}')
  base = known[config_name]
  if feature_dtype not in FEATURE_DTYPES:
    raise scan_files.DataError(f'config.data.feature_dtype={feature_dtype!r}: expected one of '
                               f'{FEATURE_DTYPES}')
  dim = base.region_dim if region_dim is None else region_dim
  if dim == base.region_dim and feature_dtype == base.feature_dtype:
    return base
  name = config_name + (f'_d{dim}' if dim != base.region_dim else '')
  name += '_fp16' if feature_dtype == 'float16' else ''
  return ScanPrecompConfig(name=name, dataset=base.dataset, region_dim=dim,
                           num_regions=base.num_regions, feature_dtype=feature_dtype,
                           description=base.description)


def is_built(data_dir: str, config_name: str, region_dim: int | None = None,
             feature_dtype: str = 'float32') -> bool:
  config = make_config(config_name, region_dim, feature_dtype)
  return ScanPrecomp(config=config, data_dir=data_dir, file_format='array_record').is_prepared()


def build(manual_dir: str, data_dir: str, config_name: str = 'butd', region_dim: int | None = None,
          *, feature_dtype: str = 'float32', layout: str = 'auto', require_images: bool = False,
          progress: bool = True):
  """Builds (if needed) and returns the builder. Raw files are checked before anything is written."""
  config = make_config(config_name, region_dim, feature_dtype)
  builder = ScanPrecomp(config=config, data_dir=data_dir, file_format='array_record',
                        layout=layout, require_images=require_images, progress=progress)
  if not builder.is_prepared():
    remove_stale_builds(str(builder.data_dir))
    found = layouts.find(manual_dir, config.dataset, layout)
    opened = open_all(found, config)   # fail fast, with a precise message, before writing
    mapping = layouts.read_mapping(found.mapping_path, config.dataset)
    for files in opened.values():
      resolve_images(files, found, mapping, require_images)
    if progress:
      print(f'Building the tfds dataset {builder.info.full_name} from {found.precomp_dir} '
            f'({found.name} layout; splits {", ".join(opened)}) ...', flush=True)
    tfds.disable_progress_bar()
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder
