"""tfds builder for the SCAN precomp layout (`{split}_ims.npy`, `_caps.txt`, `_ids.txt`).

One example per image, in split order (`disable_shuffling=True`: the evaluator relies on caption
5i..5i+4 belonging to image i and on contiguous COCO folds). The raw files are read from
`manual_dir`; splits are whatever `{split}_caps.txt` files exist there (train, dev, test, testall,
...). Granularity of the npy and ids files is derived per file (input_pipeline/scan_files.py).
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from input_pipeline import scan_files

VERSION = '1.0.0'


@dataclasses.dataclass
class ScanPrecompConfig(tfds.core.BuilderConfig):
  region_dim: int = 2048
  num_regions: int = 36


class ScanPrecomp(tfds.core.GeneratorBasedBuilder):
  """Region features, five captions and the image id of every image of a SCAN precomp split."""

  VERSION = tfds.core.Version(VERSION)
  BUILDER_CONFIGS = [
      ScanPrecompConfig(name='butd', description='BUTD region features (2048-d)'),
      ScanPrecompConfig(name='synthetic', region_dim=64,
                        description='the embedded synthetic world (64-d regions)'),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Place {split}_caps.txt, {split}_ims.npy and {split}_ids.txt (and id_mapping.json) in '
      'manual_dir; see data_eval_spec.md section 1.')

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'image_index': np.int64,
            'image_id': np.int64,
            'regions': tfds.features.Tensor(shape=(cfg.num_regions, cfg.region_dim),
                                            dtype=np.float32),
            'captions': tfds.features.Sequence(tfds.features.Text(),
                                               length=scan_files.CAPTIONS_PER_IMAGE),
            'image_file': tfds.features.Text(),
        }),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    root = str(dl_manager.manual_dir)
    splits = scan_files.available_splits(root)
    if not splits:
      raise scan_files.DataError(f'{root}: no {{split}}_caps.txt file found')
    cfg = self.builder_config
    opened = {s: scan_files.open_split(root, s, expected_regions=cfg.num_regions,
                                       expected_dim=cfg.region_dim) for s in splits}
    mapping = scan_files.read_id_mapping(root)
    return {s: self._generate_examples(files, mapping) for s, files in opened.items()}

  def _generate_examples(self, files: scan_files.SplitFiles, mapping):
    for i in range(files.num_images):
      image_id = files.image_id(i)
      yield i, {
          'image_index': i,
          'image_id': image_id,
          'regions': np.asarray(files.features[files.image_row(i)], dtype=np.float32),
          'captions': files.captions[5 * i:5 * i + 5],
          'image_file': (mapping or {}).get(str(image_id), ''),
      }


def build(manual_dir: str, data_dir: str, config_name: str = 'butd', region_dim: int | None = None):
  """Builds (if needed) and returns the builder. Split files are checked before anything is written."""
  if region_dim is not None and config_name not in ('butd', 'synthetic'):
    raise ValueError(config_name)
  config = next(c for c in ScanPrecomp.BUILDER_CONFIGS if c.name == config_name)
  if region_dim is not None and region_dim != config.region_dim:
    config = ScanPrecompConfig(name=f'{config_name}{region_dim}', region_dim=region_dim)
  builder = ScanPrecomp(config=config, data_dir=data_dir, file_format='array_record')
  if not builder.is_prepared():
    for split in scan_files.available_splits(manual_dir):  # fail fast with a precise message
      scan_files.open_split(manual_dir, split, expected_regions=config.num_regions,
                            expected_dim=config.region_dim)
    print(f'Building the tfds dataset {builder.info.full_name} from {manual_dir} ...', flush=True)
    tfds.disable_progress_bar()
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder
