"""Grain pipelines producing fixed-shape numpy batches with masks (data_eval_spec.md 2.7).

Training: one seeded permutation of the caption indices per epoch, floor(C / B) steps per epoch
(the originals' `drop_last`), word-level token augmentation and region dropout with a random
generator derived from (seed, global example position), so a run restarted at step s sees
exactly the batches it would have seen: the data position is a pure function of the step.
Each process reads only its slice of every global batch.

Evaluation: images once each, in split order; captions in file order; the last batch is padded
with rows whose `valid` is False.
"""

import dataclasses
import functools

import grain
import numpy as np

from input_pipeline import bert_tokenizer

REGION_KEEP_PROB = 0.8  # training region dropout: keep region r iff u_r > 0.2


@dataclasses.dataclass(frozen=True)
class TextOptions:
  max_len: int = 64  # static token width; captions longer are truncated (counted, see below)
  vocab_path: str | None = None


def _truncate(ids: list[int], max_len: int) -> tuple[list[int], bool]:
  if len(ids) <= max_len:
    return ids, False
  return ids[:max_len - 1] + [bert_tokenizer.SEP_ID], True


class SplitSource:
  """Random access to one split of a built SCAN precomp dataset (a tfds data source)."""

  def __init__(self, data_source, max_captions: int | None = None):
    self.source = data_source
    self.num_images = len(data_source)
    if max_captions is not None:  # `dev` is truncated to its first 5,000 captions by the originals
      self.num_images = min(self.num_images, max_captions // 5)
    self.num_captions = 5 * self.num_images

  def image(self, i: int) -> dict:
    return self.source[i]


def _caption_text(example: dict, k: int) -> str:
  text = example['captions'][k]
  return text.decode('utf-8') if isinstance(text, bytes) else text


class _TrainExample:
  """Global example position -> one augmented (image, caption) training example."""

  def __init__(self, split: SplitSource, *, batch_size: int, seed: int, text: TextOptions,
               size_augment: bool, word_augment: bool, local_batch: int, process_index: int):
    self.split = split
    self.batch_size = batch_size
    self.steps_per_epoch = split.num_captions // batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(f'batch size {batch_size} exceeds the {split.num_captions} training captions')
    self.seed = seed
    self.text = text
    self.size_augment = size_augment
    self.word_augment = word_augment
    self.local_batch = local_batch
    self.process_index = process_index
    self.tokenizer = bert_tokenizer.get_tokenizer(text.vocab_path)

  @functools.lru_cache(maxsize=2)
  def permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(self.split.num_captions)

  def __call__(self, local_position: int) -> dict:
    step, slot = divmod(int(local_position), self.local_batch)
    slot += self.process_index * self.local_batch
    epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
    caption = int(self.permutation(epoch)[step_in_epoch * self.batch_size + slot])
    rng = np.random.default_rng([self.seed, 1, step * self.batch_size + slot])
    example = self.split.image(caption // 5)
    regions = np.asarray(example['regions'], np.float32)
    n_regions = regions.shape[0]
    if self.size_augment:
      keep = rng.random(n_regions) > 1.0 - REGION_KEEP_PROB
      if keep.any():  # all dropped (p = 0.2^36): keep all; the original would crash
        kept = regions[keep]
        regions = np.zeros_like(regions)
        regions[:len(kept)] = kept
        n_regions = len(kept)
    words = self.tokenizer.word_pieces(_caption_text(example, caption % 5))
    if self.word_augment:
      pieces = bert_tokenizer.augment_words(words, rng, self.tokenizer.vocab_size)
    else:
      pieces = [i for w in words for i in w]
    ids, truncated = _truncate([bert_tokenizer.CLS_ID] + pieces + [bert_tokenizer.SEP_ID],
                               self.text.max_len)
    return {'regions': regions, 'region_len': n_regions, 'bert_ids': ids,
            'caption_index': caption, 'image_index': caption // 5, 'truncated': truncated}


def collate(examples: list[dict], max_len: int, valid: list[bool] | None = None) -> dict:
  """Stacks examples into the fixed-shape batch contract (spec 2.7)."""
  b = len(examples)
  bert_ids = np.zeros((b, max_len), np.int32)
  bert_len = np.zeros((b,), np.int32)
  for row, ex in enumerate(examples):
    ids = ex['bert_ids']
    bert_ids[row, :len(ids)] = ids
    bert_len[row] = len(ids)
  return {
      'regions': np.stack([ex['regions'] for ex in examples]).astype(np.float32),
      'region_len': np.asarray([ex['region_len'] for ex in examples], np.int32),
      'bert_ids': bert_ids,
      'bert_len': bert_len,
      'bert_mask': bert_ids != 0,
      'caption_index': np.asarray([ex['caption_index'] for ex in examples], np.int32),
      'image_index': np.asarray([ex['image_index'] for ex in examples], np.int32),
      'valid': np.asarray(valid if valid is not None else [True] * b, bool),
      'truncated': np.asarray([ex.get('truncated', False) for ex in examples], bool),
  }


def train_iterator(split: SplitSource, *, batch_size: int, num_steps: int, seed: int,
                   text: TextOptions, start_step: int = 0, size_augment: bool = True,
                   word_augment: bool = True, process_index: int = 0, process_count: int = 1,
                   num_threads: int = 2, prefetch: int = 4):
  """Batches for steps [start_step, num_steps) of this process: dicts of numpy arrays."""
  if batch_size % process_count:
    raise ValueError(f'batch size {batch_size} is not divisible by {process_count} processes')
  local_batch = batch_size // process_count
  make = _TrainExample(split, batch_size=batch_size, seed=seed, text=text,
                       size_augment=size_augment, word_augment=word_augment,
                       local_batch=local_batch, process_index=process_index)
  ds = (grain.MapDataset.range(start_step * local_batch, num_steps * local_batch)
        .map(make)
        .batch(local_batch, drop_remainder=True,
               batch_fn=functools.partial(collate, max_len=text.max_len)))
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                    prefetch_buffer_size=prefetch * local_batch)))


def steps_per_epoch(split: SplitSource, batch_size: int) -> int:
  return split.num_captions // batch_size


def _pad_batch(rows: list[dict], batch_size: int, max_len: int) -> dict:
  valid = [True] * len(rows) + [False] * (batch_size - len(rows))
  rows = rows + [rows[-1]] * (batch_size - len(rows))
  return collate(rows, max_len, valid)


def eval_image_batches(split: SplitSource, batch_size: int, max_len: int = 2):
  """Each image once, all regions, in split order; last batch padded (valid=False)."""
  for start in range(0, split.num_images, batch_size):
    rows = []
    for i in range(start, min(start + batch_size, split.num_images)):
      regions = np.asarray(split.image(i)['regions'], np.float32)
      rows.append({'regions': regions, 'region_len': regions.shape[0], 'bert_ids': [],
                   'caption_index': 5 * i, 'image_index': i})
    yield _pad_batch(rows, batch_size, max_len)


def eval_caption_batches(split: SplitSource, batch_size: int, text: TextOptions,
                         num_regions: int = 36, region_dim: int = 1):
  """Every caption in file order, no augmentation; last batch padded (valid=False)."""
  tokenizer = bert_tokenizer.get_tokenizer(text.vocab_path)
  empty_regions = np.zeros((num_regions, region_dim), np.float32)
  for start in range(0, split.num_captions, batch_size):
    rows = []
    for c in range(start, min(start + batch_size, split.num_captions)):
      text_str = _caption_text(split.image(c // 5), c % 5)
      ids, truncated = _truncate(tokenizer.encode(text_str), text.max_len)
      rows.append({'regions': empty_regions, 'region_len': num_regions, 'bert_ids': ids,
                   'caption_index': c, 'image_index': c // 5, 'truncated': truncated})
    yield _pad_batch(rows, batch_size, text.max_len)
