"""Retrieval metrics exactly as the original VSE/HREM/AAHR evaluators compute them.

docs/data.md section 3. Ranks are 0-based; i2t takes the best of an image's five captions;
medr = floor(median) + 1, meanr = mean + 1; recalls in percent.

Ranks are found by counting the entries that score higher than the positive (no sort). Where an
exact tie touches a positive, the position inside the tied group is what the original's
`np.argsort(row)[::-1]` gives, so those rows (and only those) are ranked with that very call: the
result equals the original on every matrix, ties included, at the cost of a sort per tied row.
"""

import numpy as np

METRIC_KEYS = ('i2t_r1', 'i2t_r5', 'i2t_r10', 'i2t_medr', 'i2t_meanr',
               't2i_r1', 't2i_r5', 't2i_r10', 't2i_medr', 't2i_meanr', 'rsum')
CAPTIONS_PER_IMAGE = 5
_ROW_BLOCK = 256  # rows per counting block: bounds the temporary boolean matrices


def _check_shape(sims: np.ndarray) -> int:
  if sims.ndim != 2 or sims.shape[1] != CAPTIONS_PER_IMAGE * sims.shape[0]:
    raise ValueError(
        f'similarity matrix must be [n_images, 5 * n_images] (rows images, columns captions in '
        f'file order), got shape {sims.shape}')
  return sims.shape[0]


def argsort_rank_i2t(row: np.ndarray, image: int) -> int:
  """The original's i2t rank of one row: best position of the image's captions in the
  reversed `np.argsort` (which orders exactly tied scores in an unspecified but fixed way)."""
  order = np.argsort(row)[::-1]
  return int(min(np.where(order == c)[0][0] for c in range(5 * image, 5 * image + 5)))


def argsort_rank_t2i(column: np.ndarray, image: int) -> int:
  """The original's t2i rank of one caption's column: position of its own image."""
  order = np.argsort(column)[::-1]
  return int(np.where(order == image)[0][0])


def i2t_ranks(sims: np.ndarray) -> tuple[np.ndarray, int]:
  """0-based rank of each image's best caption; also the number of rows with a tie at it."""
  n = _check_shape(sims)
  ranks = np.zeros(n, dtype=np.int64)
  tied_rows = []
  for start in range(0, n, _ROW_BLOCK):
    rows = sims[start:start + _ROW_BLOCK]
    idx = np.arange(start, start + rows.shape[0])
    own = np.stack([rows[np.arange(rows.shape[0]), 5 * idx + j] for j in range(5)], axis=1)
    best = own.max(axis=1, keepdims=True)
    greater = (rows > best).sum(axis=1)
    equal = (rows == best).sum(axis=1) - (own == best).sum(axis=1)  # non-positives tied with it
    ranks[start:start + rows.shape[0]] = greater
    tied_rows.extend(idx[equal > 0].tolist())
  for i in tied_rows:
    ranks[i] = argsort_rank_i2t(sims[i], i)
  return ranks, len(tied_rows)


def t2i_ranks(sims: np.ndarray) -> tuple[np.ndarray, int]:
  """0-based rank of each caption's own image; also the number of captions with a tie at it."""
  n = _check_shape(sims)
  sims_t = sims.T
  ranks = np.zeros(5 * n, dtype=np.int64)
  tied_cols = []
  for start in range(0, 5 * n, _ROW_BLOCK):
    cols = sims_t[start:start + _ROW_BLOCK]
    caption = np.arange(start, start + cols.shape[0])
    own = cols[np.arange(cols.shape[0]), caption // 5][:, None]
    ranks[start:start + cols.shape[0]] = (cols > own).sum(axis=1)
    tied = (cols == own).sum(axis=1) > 1
    tied_cols.extend(caption[tied].tolist())
  for c in tied_cols:
    ranks[c] = argsort_rank_t2i(sims_t[c], c // 5)
  return ranks, len(tied_cols)


def metrics_from_ranks(ranks_i2t: np.ndarray, ranks_t2i: np.ndarray) -> dict[str, float]:
  out = {}
  for name, ranks in (('i2t', ranks_i2t), ('t2i', ranks_t2i)):
    ranks = np.asarray(ranks, dtype=np.float64)
    for k in (1, 5, 10):
      out[f'{name}_r{k}'] = float(100.0 * np.mean(ranks < k))
    out[f'{name}_medr'] = float(np.floor(np.median(ranks)) + 1)
    out[f'{name}_meanr'] = float(ranks.mean() + 1)
  out['rsum'] = sum(out[f'{d}_r{k}'] for d in ('i2t', 't2i') for k in (1, 5, 10))
  return {key: out[key] for key in METRIC_KEYS}


def recall_metrics(sims: np.ndarray) -> dict[str, float]:
  """R@1/5/10, medr, meanr in both directions and rSum for one [n, 5n] similarity matrix."""
  sims = np.asarray(sims)
  ranks_i2t, _ = i2t_ranks(sims)
  ranks_t2i, _ = t2i_ranks(sims)
  return metrics_from_ranks(ranks_i2t, ranks_t2i)


def count_ties(sims: np.ndarray) -> dict[str, int]:
  """How many i2t rows / t2i columns have an exact tie at their positive (docs/data.md 3.5)."""
  sims = np.asarray(sims)
  return {'i2t_tied': i2t_ranks(sims)[1], 't2i_tied': t2i_ranks(sims)[1]}


def fold_metrics(sims: np.ndarray, n_folds: int = 5) -> list[dict[str, float]]:
  """Metrics of each diagonal block: fold f = images [f*n/k, (f+1)*n/k), their captions."""
  n = _check_shape(np.asarray(sims))
  if n % n_folds:
    raise ValueError(f'{n} images cannot be split into {n_folds} equal folds')
  size = n // n_folds
  return [recall_metrics(sims[f * size:(f + 1) * size, 5 * f * size:5 * (f + 1) * size])
          for f in range(n_folds)]


def mean_metrics(per_fold: list[dict[str, float]]) -> dict[str, float]:
  return {key: float(np.mean([m[key] for m in per_fold])) for key in METRIC_KEYS}


def coco_metrics(sims: np.ndarray) -> dict[str, dict[str, float]]:
  """COCO protocol on the testall matrix [5000, 25000]: {'1k': mean of 5 folds, '5k': full}.

  The fold size is n/5 images (the originals hard-code 1,000), so miniatures work too.
  """
  sims = np.asarray(sims)
  _check_shape(sims)
  return {'1k': mean_metrics(fold_metrics(sims, 5)), '5k': recall_metrics(sims)}
