"""Protocol ranks from embeddings, tile by tile on the device (docs/data.md 3.2, 3.5).

The similarity matrix S = V T^T is never held whole: it is computed in tiles of `tile` images x
`5 * tile` captions by one jitted matmul, and each tile is reduced at once to counts

  i2t: entries of the image's row above (and equal to) its best own caption's score,
  t2i: entries of the caption's column above (and equal to) its own image's score.

The diagonal tiles hold every positive (caption c belongs to image c // 5), so they are done
first; every other tile is computed once. Tiles restart at each segment boundary (COCO folds),
so a fold's tiles are the 5K matrix's diagonal-block tiles: one pass over S gives the 5K ranks
and all five fold ranks, and every value equals the exported matrix's (same tile computation).

Counting gives the original's rank unless a non-positive ties with the positive; then the
original's `np.argsort(row)[::-1]` decides, so those few rows are recomputed and ranked on the
host by `aahr_jax.metrics` (float64, exactly as when re-scoring the exported matrix).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from aahr_jax import metrics

CAPTIONS = metrics.CAPTIONS_PER_IMAGE
DEFAULT_TILE = 1024  # images per tile: a 1024 x 5120 fp32 tile is 21 MB


@jax.jit
def _tile_scores(images, captions):
  """The one computation every similarity value comes from (also the exported matrix's)."""
  return jnp.matmul(images, captions.T, precision=jax.lax.Precision.HIGHEST)


@jax.jit
def _positives(scores, caption_valid):
  """From a diagonal tile: each image's best own score, each caption's own-image score, and
  how many of an image's own captions reach its best (to tell positive from non-positive ties)."""
  b = scores.shape[0]
  own = scores.reshape(b, b, CAPTIONS)[jnp.arange(b), jnp.arange(b)]  # own[r, j] = S[r, 5r + j]
  own_valid = caption_valid.reshape(b, CAPTIONS)
  best = jnp.max(jnp.where(own_valid, own, -jnp.inf), axis=1)
  own_at_best = jnp.sum((own == best[:, None]) & own_valid, axis=1, dtype=jnp.int32)
  return best, own.reshape(-1), own_at_best


# Counts are packed into one int32 per row / column: (number equal) * EQUAL + (number greater).
# A tile has at most 5 * 1024 columns, so both parts fit (5120 < EQUAL, 5120 * EQUAL < 2**31).
EQUAL = 1 << 16
MAX_TILE = 1024


def _packed(greater, equal):
  return jnp.where(greater, 1, jnp.where(equal, EQUAL, 0))


# Rows and columns are reduced by two separate programs: one program doing both is 5x slower
# on the CPU. Padding enters as an additive -inf bias (never greater, never equal).
@jax.jit
def _row_counts(scores, best, caption_bias):
  scores = scores + caption_bias[None, :]
  return jnp.sum(_packed(scores > best[:, None], scores == best[:, None]), axis=1,
                 dtype=jnp.int32)


@jax.jit
def _column_counts(scores, positive, image_bias):
  scores = scores + image_bias[:, None]
  return jnp.sum(_packed(scores > positive[None, :], scores == positive[None, :]), axis=0,
                 dtype=jnp.int32)


def _unpack(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  counts = np.asarray(counts, np.int64)
  return counts % EQUAL, counts // EQUAL


@dataclasses.dataclass(frozen=True)
class Ranks:
  """0-based ranks of one evaluation block (the full split or one fold)."""
  i2t: np.ndarray              # the original's ranks (argsort order inside tied groups)
  t2i: np.ndarray
  i2t_pessimistic: np.ndarray  # tied non-positives placed before the positive
  t2i_pessimistic: np.ndarray
  i2t_optimistic: np.ndarray   # tied non-positives placed after it (strictly-greater count)
  t2i_optimistic: np.ndarray

  @property
  def ties(self) -> dict[str, int]:
    """Rows (images) and columns (captions) where a non-positive ties with the positive."""
    return {'i2t_tied': int(np.sum(self.i2t_pessimistic != self.i2t_optimistic)),
            't2i_tied': int(np.sum(self.t2i_pessimistic != self.t2i_optimistic))}


def tile_size(images_per_segment: int, target: int = DEFAULT_TILE) -> int:
  """Near-equal tiles of at most `target` images covering one segment with little padding."""
  n_tiles = math.ceil(images_per_segment / target)
  return math.ceil(images_per_segment / n_tiles)


class TiledScores:
  """Similarities of n images and 5n captions on a tile grid aligned to `segments` equal parts.

  `ranks(first, last)` gives the ranks of the block made of segments first..last-1 (the full
  split: 0..segments; COCO fold f: f..f+1), all from one pass over the tiles.
  """

  def __init__(self, image_embs, caption_embs, *, segments: int = 1, tile: int = DEFAULT_TILE):
    image_embs = np.asarray(image_embs, np.float32)
    caption_embs = np.asarray(caption_embs, np.float32)
    n = image_embs.shape[0]
    if (image_embs.ndim != 2 or caption_embs.ndim != 2 or caption_embs.shape[0] != CAPTIONS * n
        or caption_embs.shape[1] != image_embs.shape[1]):
      raise ValueError(f'embeddings must be images [n, D] and captions [5n, D] (caption c of '
                       f'image c // 5), got {image_embs.shape} and {caption_embs.shape}')
    if n == 0 or n % segments:
      raise ValueError(f'{n} images cannot be split into {segments} equal non-empty segments')
    if tile > MAX_TILE:
      raise ValueError(f'tile = {tile} images exceeds {MAX_TILE} (the packed counts need '
                       f'5 * tile < {EQUAL})')
    self.num_images = n
    self.segments = segments
    per_segment = n // segments
    self.tile = tile_size(per_segment, tile)
    self.tiles_per_segment = math.ceil(per_segment / self.tile)
    self.num_tiles = segments * self.tiles_per_segment
    padded = self.num_tiles * self.tile
    # Padded position of each real image / caption: every segment starts on a tile boundary.
    image = np.arange(n)
    self.image_rows = (image // per_segment) * self.tiles_per_segment * self.tile + image % per_segment
    caption = np.arange(CAPTIONS * n)
    self.caption_cols = ((caption // (CAPTIONS * per_segment)) * CAPTIONS * self.tiles_per_segment
                         * self.tile + caption % (CAPTIONS * per_segment))
    images = np.zeros((padded, image_embs.shape[1]), np.float32)
    images[self.image_rows] = image_embs
    captions = np.zeros((CAPTIONS * padded, image_embs.shape[1]), np.float32)
    captions[self.caption_cols] = caption_embs
    self.image_valid = np.zeros(padded, bool)
    self.image_valid[self.image_rows] = True
    self.caption_valid = np.zeros(CAPTIONS * padded, bool)
    self.caption_valid[self.caption_cols] = True
    # One device array per tile, made from host slices: slicing device arrays would copy each
    # tile again on every use and compile one program per distinct slice.
    self._image_tiles = [jax.device_put(images[self._rows(a)]) for a in range(self.num_tiles)]
    self._caption_tiles = [jax.device_put(captions[self._cols(b)])
                           for b in range(self.num_tiles)]
    self._counted = None

  # --- tiles ---

  def _rows(self, a: int) -> slice:
    return slice(a * self.tile, (a + 1) * self.tile)

  def _cols(self, b: int) -> slice:
    return slice(CAPTIONS * b * self.tile, CAPTIONS * (b + 1) * self.tile)

  def tile_scores(self, a: int, b: int) -> jax.Array:
    """S for image tile a x caption tile b (padded positions included)."""
    return _tile_scores(self._image_tiles[a], self._caption_tiles[b])

  def _segment(self, tile_index: int) -> int:
    return tile_index // self.tiles_per_segment

  # --- the counting pass ---

  def _count(self):
    """Counts per (image, caption segment) and (caption, image segment), summed over tiles."""
    padded = self.num_tiles * self.tile
    s = self.segments
    row_gt = np.zeros((s, padded), np.int64)
    row_eq = np.zeros((s, padded), np.int64)
    col_gt = np.zeros((s, CAPTIONS * padded), np.int64)
    col_eq = np.zeros((s, CAPTIONS * padded), np.int64)
    image_bias = np.where(self.image_valid, 0.0, -np.inf).astype(np.float32)
    caption_bias = np.where(self.caption_valid, 0.0, -np.inf).astype(np.float32)
    image_bias = [jax.device_put(image_bias[self._rows(a)]) for a in range(self.num_tiles)]
    caption_bias = [jax.device_put(caption_bias[self._cols(b)]) for b in range(self.num_tiles)]
    best, positive, own_at_best, pending = [], [], [], []

    def count(a, b, scores):
      pending.append((a, b, _row_counts(scores, best[a], caption_bias[b]),
                      _column_counts(scores, positive[b], image_bias[a])))
      if len(pending) >= 2:  # at most two tiles in flight: bounded memory
        collect(pending.pop(0))

    def collect(item):
      a, b, rows, columns = item
      gt, eq = _unpack(jax.device_get(rows))
      row_gt[self._segment(b), self._rows(a)] += gt
      row_eq[self._segment(b), self._rows(a)] += eq
      gt, eq = _unpack(jax.device_get(columns))
      col_gt[self._segment(a), self._cols(b)] += gt
      col_eq[self._segment(a), self._cols(b)] += eq

    for a in range(self.num_tiles):  # diagonal tiles first: they hold every positive
      scores = self.tile_scores(a, a)
      b_a, p_a, o_a = _positives(scores, self.caption_valid[self._cols(a)])
      best.append(b_a)
      positive.append(p_a)
      own_at_best.append(o_a)
      count(a, a, scores)
    for a in range(self.num_tiles):
      for b in range(self.num_tiles):
        if a != b:
          count(a, b, self.tile_scores(a, b))
    for item in pending:
      collect(item)
    own = np.concatenate(jax.device_get(own_at_best)).astype(np.int64)
    self._counted = (row_gt, row_eq, col_gt, col_eq, own)

  # --- ranks of a block of segments ---

  def ranks(self, first: int = 0, last: int | None = None) -> Ranks:
    last = self.segments if last is None else last
    if not 0 <= first < last <= self.segments:
      raise ValueError(f'segments {first}..{last} outside 0..{self.segments}')
    if self._counted is None:
      self._count()
    row_gt, row_eq, col_gt, col_eq, own = self._counted
    per_segment = self.num_images // self.segments
    images = np.arange(first * per_segment, last * per_segment)
    captions = np.arange(CAPTIONS * first * per_segment, CAPTIONS * last * per_segment)
    rows, cols = self.image_rows[images], self.caption_cols[captions]
    i2t_gt = row_gt[first:last, rows].sum(0)
    i2t_ties = row_eq[first:last, rows].sum(0) - own[rows]  # non-positives equal to the best
    t2i_gt = col_gt[first:last, cols].sum(0)
    t2i_ties = col_eq[first:last, cols].sum(0) - 1  # minus the positive itself
    i2t, t2i = i2t_gt.copy(), t2i_gt.copy()
    for local in np.flatnonzero(i2t_ties > 0):  # the original's argsort on the tied rows
      row = self._image_row(images[local], first, last)
      i2t[local] = metrics.argsort_rank_i2t(row, local)
    for local in np.flatnonzero(t2i_ties > 0):
      column = self._caption_column(captions[local], first, last)
      t2i[local] = metrics.argsort_rank_t2i(column, local // CAPTIONS)
    return Ranks(i2t=i2t, t2i=t2i, i2t_pessimistic=i2t_gt + i2t_ties,
                 t2i_pessimistic=t2i_gt + t2i_ties, i2t_optimistic=i2t_gt, t2i_optimistic=t2i_gt)

  def _tile_range(self, first: int, last: int) -> range:
    return range(first * self.tiles_per_segment, last * self.tiles_per_segment)

  def _image_row(self, image: int, first: int, last: int) -> np.ndarray:
    """Row of `image` over the block's captions, float64 (tiles recomputed: same values)."""
    a, r = divmod(int(self.image_rows[image]), self.tile)
    parts = []
    for b in self._tile_range(first, last):
      row = np.asarray(self.tile_scores(a, b)[r])
      parts.append(row[self.caption_valid[self._cols(b)]])
    return np.concatenate(parts).astype(np.float64)

  def _caption_column(self, caption: int, first: int, last: int) -> np.ndarray:
    """Column of `caption` over the block's images, float64."""
    b, c = divmod(int(self.caption_cols[caption]), CAPTIONS * self.tile)
    parts = []
    for a in self._tile_range(first, last):
      column = np.asarray(self.tile_scores(a, b)[:, c])
      parts.append(column[self.image_valid[self._rows(a)]])
    return np.concatenate(parts).astype(np.float64)

  # --- export ---

  def matrix(self) -> np.ndarray:
    """The full [n, 5n] float64 matrix, assembled from the same tiles (for results_*.npy)."""
    out = np.empty((self.num_images, CAPTIONS * self.num_images), np.float64)
    for a in range(self.num_tiles):
      row_valid = self.image_valid[self._rows(a)]
      first_image = int(np.searchsorted(self.image_rows, a * self.tile))
      rows = slice(first_image, first_image + int(row_valid.sum()))
      for b in range(self.num_tiles):
        col_valid = self.caption_valid[self._cols(b)]
        first_caption = int(np.searchsorted(self.caption_cols, CAPTIONS * b * self.tile))
        cols = slice(first_caption, first_caption + int(col_valid.sum()))
        out[rows, cols] = np.asarray(self.tile_scores(a, b))[row_valid][:, col_valid]
    return out
