"""Grain pipelines producing fixed-shape numpy batches with masks (docs/data.md 2.7).

Training: one seeded permutation of the caption indices per epoch, floor(C / B) steps per epoch
(the originals' `drop_last`); word-level token augmentation and region dropout drawn from a
generator seeded by (seed, step) for the whole global batch. Each process computes the small
per-caption draws of the global batch (so `batch_max_len`, `batch_max_regions` and `repeat` are
global) and gathers the regions and CLIP features of its own slice only (per-host sharding).

Iterator state: the data position is a pure function of the step. Batch s depends only on
(seed, s, batch size, the split); `train_iterator(..., start_step=s)` continues a run exactly
where a checkpoint taken after step s left it, so the checkpointed step number *is* the iterator
state (`iterator_state` gives the derived epoch and position for logs and metadata).

Evaluation: images once each, in split order; captions in file order without augmentation; the
last batch is padded with rows whose `valid` is False (they do not enter the batch maxima).

Captions longer than the static width `max_len` are cut (their last token becomes [SEP]) and
flagged in `truncated`; `length_bucket` picks a width that covers a given share of captions.
"""

import dataclasses
import functools

import grain
import numpy as np

from input_pipeline import caption_tokens

DEFAULT_COVERAGE = 0.999
# Every float16 bit pattern as float32: a table lookup widens stored float16 regions quickly.
_HALF_TO_FLOAT = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(
    np.float32)


@dataclasses.dataclass(frozen=True)
class TextOptions:
  max_len: int = 64  # static token width; captions longer are truncated (counted, see above)
  vocab_path: str | None = None
  augment: caption_tokens.WordAugment = caption_tokens.WordAugment()  # training only


class SplitSource:
  """Random access to one split of a built SCAN precomp dataset.

  `data_source` is the builder's data source (examples plus a `regions` memory map); `clip`, when
  set, gives CLIP features by index (`images(idx)`, `texts(idx)`: clip_cache.py).
  """

  def __init__(self, data_source, max_captions: int | None = None, clip=None):
    self.source = data_source
    self.regions = getattr(data_source, 'regions', None)   # memory map [n, R, D] or None
    self.num_images = len(data_source)
    if max_captions is not None:  # `dev` is truncated to its first 5,000 captions by the originals
      self.num_images = min(self.num_images, max_captions // 5)
    self.num_captions = 5 * self.num_images
    self.clip = clip
    self._tokens = {}

  def image(self, i: int) -> dict:
    return self.source[i]

  @functools.cached_property
  def captions(self) -> list[str]:
    """The split's captions in file order (caption c belongs to image c // 5)."""
    examples = getattr(self.source, 'source', self.source)   # skip the regions join
    out = []
    for i in range(self.num_images):
      out.extend(_text(t) for t in examples[i]['captions'])
    return out

  def tokens(self, vocab_path: str | None = None) -> caption_tokens.CaptionTokens:
    if vocab_path not in self._tokens:
      self._tokens[vocab_path] = caption_tokens.tokenize(self.captions, vocab_path)
    return self._tokens[vocab_path]

  def region_rows(self, images: np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
    """float32 [n, R, D] regions of the given images; with `order` [n, R], row i holds regions
    order[i] of image i (one gather from the memory map, no intermediate copy)."""
    images = np.asarray(images, np.int64)
    if self.regions is None:
      rows = np.stack([np.asarray(self.image(int(i))['regions'], np.float32) for i in images])
      return rows if order is None else np.take_along_axis(rows, order[:, :, None], axis=1)
    n, r, d = self.regions.shape
    rows = images if order is None else (images[:, None] * r + order).reshape(-1)
    source = self.regions if order is None else self.regions.reshape(n * r, d)
    if self.regions.dtype == np.float16:   # numpy's own float16 -> float32 cast is ~10x slower
      return _HALF_TO_FLOAT[source.view(np.uint16)[rows]].reshape(len(images), r, d)
    return np.asarray(source[rows], np.float32).reshape(len(images), r, d)


def _text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else value


def length_bucket(lengths: np.ndarray, coverage: float = DEFAULT_COVERAGE, multiple: int = 8) -> int:
  """Smallest multiple of `multiple` that holds at least `coverage` of the lengths."""
  ordered = np.sort(np.asarray(lengths))
  needed = int(ordered[max(int(np.ceil(coverage * len(ordered))), 1) - 1]) if len(ordered) else 2
  return max(multiple, -(-needed // multiple) * multiple)


def iterator_state(step: int, split: SplitSource, batch_size: int, seed: int) -> dict:
  """What the iterator state amounts to at `step` (the next batch to produce)."""
  epoch, position = divmod(step, steps_per_epoch(split, batch_size))
  return {'step': step, 'epoch': epoch, 'batch_in_epoch': position, 'seed': seed,
          'caption_position': position * batch_size}


def _drop_regions(u: np.ndarray, keep_prob: float) -> tuple[np.ndarray, np.ndarray]:
  """(region order with kept ones first, kept count) per row: region r is kept iff
  u_r > 1 - keep_prob (the original's test); all kept if none survives."""
  keep = u > 1.0 - keep_prob
  keep[~keep.any(axis=1)] = True   # p = 0.2^36: keep all (the original would crash)
  order = np.argsort(~keep, axis=1, kind='stable')
  return order, keep.sum(axis=1).astype(np.int32)


def _gather_regions(split: SplitSource, images: np.ndarray, order: np.ndarray | None,
                    counts: np.ndarray) -> np.ndarray:
  regions = split.region_rows(images, order)
  if order is not None:
    regions[np.arange(regions.shape[1])[None, :] >= counts[:, None]] = 0.0
  return regions


def _clip_fields(split: SplitSource, images: np.ndarray, captions: np.ndarray | None) -> dict:
  if split.clip is None:
    return {}
  out = {'clip_image': split.clip.images(images)}
  if captions is not None:
    out['clip_text'] = split.clip.texts(captions)
  return out


class _TrainBatch:
  """Global step -> this process's slice of the augmented training batch."""

  def __init__(self, split: SplitSource, *, batch_size: int, seed: int, text: TextOptions,
               size_augment: bool, word_augment: bool, local_batch: int, process_index: int,
               region_keep_prob: float):
    self.split = split
    self.batch_size = batch_size
    self.steps_per_epoch = split.num_captions // batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(f'batch size {batch_size} exceeds the {split.num_captions} training captions')
    self.seed = seed
    self.text = text
    self.size_augment = size_augment
    self.region_keep_prob = region_keep_prob
    self.word_augment = word_augment
    self.local = slice(process_index * local_batch, (process_index + 1) * local_batch)
    self.tokens = split.tokens(text.vocab_path)
    self.num_regions = (split.regions.shape[1] if split.regions is not None
                        else np.asarray(split.image(0)['regions']).shape[0])

  @functools.lru_cache(maxsize=2)
  def permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(self.split.num_captions)

  def __call__(self, step: int) -> dict:
    step = int(step)
    epoch, in_epoch = divmod(step, self.steps_per_epoch)
    start = in_epoch * self.batch_size
    captions = self.permutation(epoch)[start:start + self.batch_size]
    rng = np.random.default_rng([self.seed, 1, step])
    b = len(captions)
    if self.size_augment:
      order, counts = _drop_regions(rng.random((b, self.num_regions)), self.region_keep_prob)
    else:
      order, counts = None, np.full(b, self.num_regions, np.int32)
    ids, lengths, truncated = caption_tokens.encode_batch(
        self.tokens, captions, self.text.max_len, rng if self.word_augment else None,
        self.text.augment)
    images = captions // 5
    mine = captions[self.local]
    batch = {
        'regions': _gather_regions(self.split, images[self.local],
                                   None if order is None else order[self.local],
                                   counts[self.local]),
        'region_len': counts[self.local],
        'bert_ids': ids[self.local],
        'bert_len': lengths[self.local],
        'bert_mask': ids[self.local] != 0,
        'caption_index': mine.astype(np.int32),
        'image_index': (mine // 5).astype(np.int32),
        'valid': np.ones(len(mine), bool),
        'truncated': truncated[self.local],
        'batch_max_len': np.int32(lengths.max()),
        'batch_max_regions': np.int32(counts.max()),
        'repeat': np.int32(b - len(np.unique(images))),
    }
    batch.update(_clip_fields(self.split, mine // 5, mine))
    return batch


def train_iterator(split: SplitSource, *, batch_size: int, num_steps: int, seed: int,
                   text: TextOptions, start_step: int = 0, size_augment: bool = True,
                   word_augment: bool = True, process_index: int = 0, process_count: int = 1,
                   num_threads: int = 2, prefetch: int = 4, region_keep_prob: float = 0.8):
  """Batches for steps [start_step, num_steps) of this process: dicts of numpy arrays.
  Word augmentation follows `text.augment`; region dropout keeps each region w.p.
  `region_keep_prob`."""
  if batch_size % process_count:
    raise ValueError(f'batch size {batch_size} is not divisible by {process_count} processes')
  make = _TrainBatch(split, batch_size=batch_size, seed=seed, text=text,
                     size_augment=size_augment, word_augment=word_augment,
                     local_batch=batch_size // process_count, process_index=process_index,
                     region_keep_prob=region_keep_prob)
  ds = grain.MapDataset.range(start_step, num_steps).map(make)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                    prefetch_buffer_size=prefetch)))


def steps_per_epoch(split: SplitSource, batch_size: int) -> int:
  return split.num_captions // batch_size


def _add_maxima(batch: dict) -> dict:
  valid = batch['valid']
  batch['batch_max_len'] = np.int32(batch['bert_len'][valid].max(initial=0))
  batch['batch_max_regions'] = np.int32(batch['region_len'][valid].max(initial=0))
  batch['repeat'] = np.int32(valid.sum() - len(np.unique(batch['image_index'][valid])))
  return batch


def _padded(indices: range, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(indices padded to batch_size by repeating the last one, valid mask)."""
  idx = np.asarray(indices, np.int64)
  valid = np.arange(batch_size) < len(idx)
  return np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])]), valid


def eval_image_batches(split: SplitSource, batch_size: int, max_len: int = 2):
  """Each image once, all regions, in split order; last batch padded (valid=False)."""
  for start in range(0, split.num_images, batch_size):
    images, valid = _padded(range(start, min(start + batch_size, split.num_images)), batch_size)
    regions = split.region_rows(images)
    n = len(images)
    batch = {
        'regions': regions,
        'region_len': np.full(n, regions.shape[1], np.int32),
        'bert_ids': np.zeros((n, max_len), np.int32),
        'bert_len': np.zeros(n, np.int32),
        'bert_mask': np.zeros((n, max_len), bool),
        'caption_index': (5 * images).astype(np.int32),
        'image_index': images.astype(np.int32),
        'valid': valid,
        'truncated': np.zeros(n, bool),
    }
    batch.update(_clip_fields(split, images, None))
    yield _add_maxima(batch)


def eval_caption_batches(split: SplitSource, batch_size: int, text: TextOptions,
                         num_regions: int = 36, region_dim: int = 1):
  """Every caption in file order, no augmentation; last batch padded (valid=False)."""
  tokens = split.tokens(text.vocab_path)
  for start in range(0, split.num_captions, batch_size):
    captions, valid = _padded(range(start, min(start + batch_size, split.num_captions)),
                              batch_size)
    ids, lengths, truncated = caption_tokens.encode_batch(tokens, captions, text.max_len)
    n = len(captions)
    batch = {
        'regions': np.zeros((n, num_regions, region_dim), np.float32),
        'region_len': np.full(n, num_regions, np.int32),
        'bert_ids': ids,
        'bert_len': lengths,
        'bert_mask': ids != 0,
        'caption_index': captions.astype(np.int32),
        'image_index': (captions // 5).astype(np.int32),
        'valid': valid,
        'truncated': truncated & valid,
    }
    if split.clip is not None:
      batch['clip_text'] = split.clip.texts(captions)
    yield _add_maxima(batch)
