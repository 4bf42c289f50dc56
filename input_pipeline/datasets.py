"""Resolving a config's data: generate the synthetic world if needed, build tfds, open splits."""

import os

from input_pipeline import loader
from input_pipeline import scan_files
from input_pipeline import synthetic
from input_pipeline.builders import scan_precomp

DataError = scan_files.DataError


def _synthetic_dir(config, workdir: str) -> str:
  syn = config.data.synthetic
  name = (f'synthetic_seed{syn.seed}_{syn.train}-{syn.dev}-{syn.test}'
          f'_d{config.data.region_dim}')
  return os.path.join(workdir, 'data', name)


def manual_dir(config, workdir: str) -> str:
  """Where the raw SCAN-layout files are; generates the synthetic world on first use."""
  if config.data.manual_dir:
    if not os.path.isdir(config.data.manual_dir):
      raise DataError(f'data directory not found: {config.data.manual_dir} (config.data.manual_dir; '
                      'expected the SCAN precomp files {split}_caps.txt/_ims.npy/_ids.txt)')
    return config.data.manual_dir
  if config.data.name != 'synthetic':
    raise DataError(f'config.data.manual_dir is empty but dataset {config.data.name!r} needs its '
                    'files: pass --config.data.manual_dir=/path/to/precomp')
  path = _synthetic_dir(config, workdir)
  if not os.path.isdir(path):
    syn = config.data.synthetic
    print(f'Generating the synthetic dataset into {path} ...', flush=True)
    synthetic.generate(path, seed=syn.seed, region_dim=config.data.region_dim,
                       splits={'train': syn.train, 'dev': syn.dev, 'test': syn.test})
  return path


def build(config, workdir: str):
  """The prepared tfds builder of the config's dataset."""
  raw = manual_dir(config, workdir)
  data_dir = config.data.data_dir or os.path.join(workdir, 'data', 'tfds')
  name = 'synthetic' if config.data.name == 'synthetic' and not config.data.manual_dir else 'butd'
  return scan_precomp.build(raw, data_dir, name, region_dim=config.data.region_dim)


def open_split(builder, split: str) -> loader.SplitSource:
  if split not in builder.info.splits:
    raise DataError(f'split {split!r} not in the dataset at {builder.data_dir}; available: '
                    f'{sorted(builder.info.splits)}')
  max_captions = scan_files.DEV_MAX_CAPTIONS if split == 'dev' else None
  return loader.SplitSource(builder.as_data_source(split), max_captions=max_captions)


def text_options(config) -> loader.TextOptions:
  return loader.TextOptions(max_len=config.data.max_len, vocab_path=config.data.vocab_path or None)
