"""Resolving a config's data: generate the synthetic world if needed, build tfds, open splits.

`build(config, workdir)` returns the prepared builder and remembers the config on it
(`builder.run_config`), so `open_split(builder, split)` can attach what the config asks for:
the `dev` truncation and, when the model takes CLIP features, the cached (or online) features.
"""

import os

from input_pipeline import caption_tokens
from input_pipeline import clip_features
from input_pipeline import layouts
from input_pipeline import loader
from input_pipeline import scan_files
from input_pipeline import synthetic
from input_pipeline import verify
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
                    'files: pass --config.data.manual_dir=/path/to/data')
  path = _synthetic_dir(config, workdir)
  if not os.path.isdir(path):
    syn = config.data.synthetic
    print(f'Generating the synthetic dataset into {path} ...', flush=True)
    synthetic.generate(path, seed=syn.seed, region_dim=config.data.region_dim,
                       splits={'train': syn.train, 'dev': syn.dev, 'test': syn.test})
  return path


def data_dir(config, workdir: str) -> str:
  return config.data.data_dir or os.path.join(workdir, 'data', 'tfds')


def dataset_name(config) -> str:
  """The folder naming of docs/data.md 1.1: f30k, coco, synthetic, or a generic precomp."""
  if config.data.name in ('f30k', 'coco'):
    return config.data.name
  if config.data.name == 'synthetic' and not config.data.manual_dir:
    return 'synthetic'
  return 'precomp'


def builder_config_name(config) -> str:
  name = dataset_name(config)
  return {'f30k': 'f30k_precomp', 'coco': 'coco_precomp', 'synthetic': 'synthetic'}.get(name,
                                                                                        'butd')


def layout(config, workdir: str) -> layouts.Layout:
  return layouts.find(manual_dir(config, workdir), dataset_name(config),
                      config.data.get('layout', 'auto'))


def build(config, workdir: str):
  """The prepared tfds builder of the config's dataset."""
  raw = manual_dir(config, workdir)
  name, dtype = builder_config_name(config), config.data.get('feature_dtype', 'float32')
  if not scan_precomp.is_built(data_dir(config, workdir), name, config.data.region_dim, dtype):
    verify.cheap_checks(config, raw)   # every problem of the raw files at once, before building
  builder = scan_precomp.build(
      raw, data_dir(config, workdir), name, region_dim=config.data.region_dim,
      feature_dtype=dtype, layout=config.data.get('layout', 'auto'),
      require_images=clip_features.clip_wanted(config))
  builder.run_config = config
  builder.run_workdir = workdir
  return builder


def open_split(builder, split: str, config=None, workdir: str | None = None) -> loader.SplitSource:
  """One split, `dev` truncated to its first dev_captions captions as the originals do, with the
  CLIP features attached when the config's model takes them."""
  if split not in builder.info.splits:
    raise DataError(f'split {split!r} not in the dataset at {builder.data_dir}; available: '
                    f'{sorted(builder.info.splits)}')
  config = config or getattr(builder, 'run_config', None)
  workdir = workdir or getattr(builder, 'run_workdir', None)
  dev_captions = scan_files.DEV_MAX_CAPTIONS
  if config is not None:
    dev_captions = config.data.get('dev_captions', dev_captions)
  source = open_source(builder, split)
  result = loader.SplitSource(source, max_captions=dev_captions if split == 'dev' else None)
  if config is not None and clip_features.clip_wanted(config):
    result.clip = clip_for_split(config, workdir, builder, split, source)
  return result


REBUILD_COMMAND = 'python main.py --config <your config> --workdir <workdir> --mode build_data'


def open_source(builder, split: str):
  """The split's data source, its first and last records read once: a shard that was deleted,
  truncated or overwritten (most often at its end) is named here, not deep in a loader thread."""
  try:
    source = builder.as_data_source(split)
    if len(source):
      source[0], source[len(source) - 1]  # pylint: disable=pointless-statement
  except DataError:
    raise
  except (OSError, RuntimeError, ValueError) as e:  # array_record and numpy's messages
    raise DataError(f'the built dataset in {builder.data_dir} is damaged (split {split}: '
                    f'{str(e).splitlines()[0][:300]}); delete {builder.data_dir} and build it '
                    f'again with `{REBUILD_COMMAND}`') from None
  return source


def clip_for_split(config, workdir: str, builder, split: str, source):
  """CachedClip (the default) or OnlineClip (config.data.clip_online) for one split."""
  root = data_dir(config, workdir)
  checkpoint = clip_features.checkpoint_path(config, root)
  if clip_features.clip_online(config):
    from input_pipeline import clip_encoder   # pylint: disable=import-outside-toplevel
    encoder = clip_encoder.ClipEncoder(checkpoint, batch_size=config.data.get('clip_batch_size',
                                                                              256))
    return clip_features.OnlineClip(encoder, source.source, layout(config, workdir))
  folder = os.path.join(clip_features.cache_dir(config, root, builder.builder_config.name,
                                                checkpoint), split)
  info = builder.info.splits[split]
  return clip_features.CachedClip(folder, info.num_examples, 5 * info.num_examples, checkpoint)


def text_options(config) -> loader.TextOptions:
  """Tokenisation and training augmentation settings (workdirs written before the augmentation
  fields existed get the released code's values)."""
  augment = caption_tokens.WordAugment()
  probs = config.data.get('token_aug_probs')
  if probs is not None:
    augment = caption_tokens.WordAugment(
        select=probs['select'], mask=probs['mask'], random=probs['random'],
        delete=probs['delete'], exclude_special=config.data.token_aug_exclude_special)
  return loader.TextOptions(max_len=config.data.max_len, vocab_path=config.data.vocab_path or None,
                            augment=augment)


def fold_ranges(split: loader.SplitSource, folds: int = 5) -> list[tuple[range, range]]:
  """(images, captions) of each contiguous fold (COCO 5-fold 1K on testall, docs/data.md 3)."""
  if split.num_images % folds:
    raise DataError(f'{split.num_images} images do not split into {folds} equal folds')
  n = split.num_images // folds
  return [(range(f * n, (f + 1) * n), range(5 * f * n, 5 * (f + 1) * n)) for f in range(folds)]


def check_eval_protocol(config, split_name: str, split: loader.SplitSource) -> None:
  """Refuses, before anything is encoded, the protocol/split pairs whose numbers no paper
  reports: COCO 1K is the mean of the 5 folds of the 5,000-image testall (never an evaluation of
  the 1,000-image `test`), COCO 5K is testall; Flickr30K is its 1,000-image test, one fold."""
  protocol, dataset = config.eval.protocol, config.data.name
  coco_fix = ('evaluate COCO with --config.data.eval_split=testall --config.eval.protocol=coco '
              '(5K and the 5-fold 1K)')
  if protocol == 'coco':
    if dataset == 'f30k':
      raise DataError(f'eval.protocol=coco on Flickr30K split {split_name!r}: the 5-fold protocol '
                      'is COCO\'s; Flickr30K is evaluated with --config.eval.protocol=single')
    if dataset == 'coco' and split.num_images != 5000:
      raise DataError(f'eval.protocol=coco needs the 5,000-image testall split; {split_name!r} has '
                      f'{split.num_images:,} images (COCO 1K results are the mean of the 5 folds '
                      'of testall, never an evaluation of `test`)')
    fold_ranges(split)
  elif protocol == 'single':
    if dataset == 'coco' and split_name == 'test':
      raise DataError(f'COCO split \'test\' ({split.num_images:,} images) is not an evaluation '
                      f'protocol of the papers (it over-states COCO 1K by several points): '
                      f'{coco_fix}')
  else:
    raise DataError(f"config.eval.protocol = {protocol!r}; expected 'single' or 'coco'")


def check_caption_lengths(config, split_name: str, split: loader.SplitSource) -> None:
  """Refuses to train when config.data.max_len would cut captions of the split (the originals
  never truncate), unless config.data.allow_truncation is set."""
  lengths = split.tokens(config.data.vocab_path or None).lengths
  max_len = config.data.max_len
  longer = int((lengths > max_len).sum())
  allowed = config.data.get('allow_truncation', False)
  if longer and not allowed:
    longest = int(lengths.max())
    raise DataError(
        f'{longer:,} of the {len(lengths):,} {split_name} captions are longer than '
        f'config.data.max_len = {max_len} BERT tokens (the longest has {longest} with '
        f'[CLS]/[SEP]) and would be truncated: set --config.data.max_len={-(-longest // 8) * 8}, '
        'or --config.data.allow_truncation=True to train on truncated captions')
