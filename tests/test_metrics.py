"""Retrieval metrics against hand-computed values and a transcription of the original loops."""

import os

import numpy as np
import pytest

from aahr_jax import evaluate
from aahr_jax import metrics

# docs/data.md 3.7: two images, ten captions.
WORKED = np.array([
    [0.62, 0.15, 0.40, 0.68, 0.12, 0.55, 0.33, 0.05, 0.48, 0.27],
    [0.71, 0.85, 0.70, 0.64, 0.66, 0.10, 0.52, 0.30, 0.50, 0.61]])
WORKED_EXPECTED = {'i2t_r1': 50.0, 'i2t_r5': 50.0, 'i2t_r10': 100.0, 'i2t_medr': 3.0,
                   'i2t_meanr': 3.5, 't2i_r1': 50.0, 't2i_r5': 100.0, 't2i_r10': 100.0,
                   't2i_medr': 1.0, 't2i_meanr': 1.5, 'rsum': 450.0}


def original_i2t_t2i(sims):
  """The VSE/HREM/AAHR `i2t` and `t2i` loops (argsort, reverse, first position)."""
  npts = sims.shape[0]
  ranks = np.zeros(npts)
  for index in range(npts):
    inds = np.argsort(sims[index])[::-1]
    rank = 1e20
    for i in range(5 * index, 5 * index + 5):
      tmp = np.where(inds == i)[0][0]
      rank = min(rank, tmp)
    ranks[index] = rank
  r = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
  i2t = r + [np.floor(np.median(ranks)) + 1, ranks.mean() + 1]
  ranks_t = np.zeros(5 * npts)
  sims_t = sims.T
  for index in range(npts):
    for i in range(5):
      inds = np.argsort(sims_t[5 * index + i])[::-1]
      ranks_t[5 * index + i] = np.where(inds == index)[0][0]
  r = [100.0 * len(np.where(ranks_t < k)[0]) / len(ranks_t) for k in (1, 5, 10)]
  t2i = r + [np.floor(np.median(ranks_t)) + 1, ranks_t.mean() + 1]
  keys = ('r1', 'r5', 'r10', 'medr', 'meanr')
  out = {f'i2t_{k}': v for k, v in zip(keys, i2t)}
  out.update({f't2i_{k}': v for k, v in zip(keys, t2i)})
  out['rsum'] = sum(i2t[:3]) + sum(t2i[:3])
  return out


def assert_same(got, want):
  assert set(got) == set(metrics.METRIC_KEYS)
  for k in metrics.METRIC_KEYS:
    assert got[k] == pytest.approx(want[k], abs=1e-9), k


def test_worked_example():
  assert_same(evaluate.recall_metrics(WORKED), WORKED_EXPECTED)
  assert_same(original_i2t_t2i(WORKED), WORKED_EXPECTED)


def test_five_fold_blocks_and_full_matrix():
  sims = -np.ones((10, 50))
  for f in range(5):
    sims[2 * f:2 * f + 2, 10 * f:10 * f + 10] = WORKED
  result = evaluate.coco_metrics(sims)
  assert_same(result['1k'], WORKED_EXPECTED)
  assert_same(result['5k'], original_i2t_t2i(sims))


def test_fold_mean_is_mean_of_fold_values():
  rng = np.random.default_rng(0)
  sims = rng.normal(size=(50, 250))
  folds = [original_i2t_t2i(sims[10 * f:10 * f + 10, 50 * f:50 * f + 50]) for f in range(5)]
  result = evaluate.coco_metrics(sims)
  assert_same(result['1k'], {k: np.mean([m[k] for m in folds]) for k in metrics.METRIC_KEYS})
  assert_same(result['5k'], original_i2t_t2i(sims))


@pytest.mark.parametrize('seed,n,dtype', [(1, 37, np.float32), (2, 200, np.float64),
                                          (3, 64, np.float32)])
def test_random_matrices_equal_original(seed, n, dtype):
  rng = np.random.default_rng(seed)
  sims = rng.normal(size=(n, 5 * n)).astype(dtype)
  sims[np.arange(n), 5 * np.arange(n)] += 1.5  # make the positives matter
  assert_same(evaluate.recall_metrics(sims), original_i2t_t2i(sims))


@pytest.mark.parametrize('seed', [0, 1, 2, 3])
def test_ties_equal_original(seed):
  rng = np.random.default_rng(seed)
  n = 40
  sims = rng.integers(0, 6, size=(n, 5 * n)).astype(np.float32) / 5.0  # heavy exact ties
  sims[:, 7] = sims[:, 3]  # identical caption columns, as for duplicate captions
  want = original_i2t_t2i(sims)
  assert_same(evaluate.recall_metrics(sims), want)
  ties = metrics.count_ties(sims)
  assert ties['i2t_tied'] > 0 and ties['t2i_tied'] > 0


def test_bad_shape_is_a_clear_error():
  with pytest.raises(ValueError, match=r'\[n_images, 5 \* n_images\]'):
    evaluate.recall_metrics(np.zeros((3, 14)))
  with pytest.raises(ValueError, match='5 equal folds'):
    evaluate.coco_metrics(np.zeros((7, 35)))
