"""Tiled on-device evaluation against the original procedure; results files, ensembles, ties,
zero-shot CLIP scoring, model-selection helpers, the report files."""

import json
import os

import numpy as np
import pytest

from aahr_jax import blockwise_ranks
from aahr_jax import clip_zeroshot
from aahr_jax import evaluate
from aahr_jax import metrics
from aahr_jax import results_file
from configs import demo
from test_metrics import WORKED, WORKED_EXPECTED, assert_same, original_i2t_t2i


def fast(images, captions, protocol='single', tile=blockwise_ranks.DEFAULT_TILE):
  return evaluate.metrics_from_embeddings(images, captions, protocol, tile)


def embeddings_of(sims):
  """Embeddings whose products are exactly `sims` (fp32): identity images, captions = S^T."""
  return np.eye(sims.shape[0], dtype=np.float32), np.asarray(sims, np.float32).T.copy()


def test_public_metric_api_is_importable():
  assert evaluate.recall_metrics is metrics.recall_metrics
  assert evaluate.coco_metrics is metrics.coco_metrics


def test_worked_example_from_embeddings():
  results, _ = fast(*embeddings_of(WORKED))
  assert_same(results['all'], WORKED_EXPECTED)
  assert results['ties'] == {'i2t_tied': 0, 't2i_tied': 0}


def test_worked_example_on_five_diagonal_blocks():
  sims = -np.ones((10, 50))
  for f in range(5):
    sims[2 * f:2 * f + 2, 10 * f:10 * f + 10] = WORKED
  results, _ = fast(*embeddings_of(sims), protocol='coco')
  assert_same(results['fold_mean'], WORKED_EXPECTED)
  for fold in results['folds']:
    assert_same(fold, WORKED_EXPECTED)
  assert_same(results['all'], original_i2t_t2i(np.float32(sims).astype(np.float64)))


@pytest.mark.parametrize('n,protocol,tile', [(37, 'single', 8), (200, 'single', 64),
                                             (50, 'coco', 4), (60, 'coco', 1024)])
def test_random_embeddings_equal_the_original_on_the_exported_matrix(n, protocol, tile):
  rng = np.random.default_rng(n)
  images = rng.normal(size=(n, 24)).astype(np.float32)
  captions = (np.repeat(images, 5, axis=0) + rng.normal(size=(5 * n, 24))).astype(np.float32)
  results, scores = fast(images, captions, protocol, tile)
  sims = scores.matrix()
  assert sims.dtype == np.float64 and sims.shape == (n, 5 * n)
  np.testing.assert_allclose(sims, images.astype(np.float64) @ captions.T.astype(np.float64),
                             rtol=1e-5, atol=1e-4)
  reference = evaluate.metrics_for_protocol(sims, protocol)
  assert results['all'] == reference['all']
  assert_same(results['all'], original_i2t_t2i(sims))
  if protocol == 'coco':
    assert results['folds'] == reference['folds']
    assert results['fold_mean'] == reference['fold_mean']
    assert_same(results['fold_mean'], metrics.coco_metrics(sims)['1k'])


@pytest.mark.parametrize('seed,protocol,tile', [(0, 'single', 7), (1, 'single', 1024),
                                                (2, 'coco', 3), (3, 'coco', 1024)])
def test_ties_follow_the_original_argsort(seed, protocol, tile):
  # Small integer embeddings: every product is exact, so S is the same however it is summed,
  # and ties are everywhere (plus duplicate captions and images, as in COCO).
  rng = np.random.default_rng(seed)
  n = 40
  images = rng.integers(-2, 3, size=(n, 6)).astype(np.float32)
  captions = rng.integers(-2, 3, size=(5 * n, 6)).astype(np.float32)
  captions[7] = captions[3]
  images[5] = images[9]
  exact = images.astype(np.float64) @ captions.T.astype(np.float64)
  results, scores = fast(images, captions, protocol, tile)
  np.testing.assert_array_equal(scores.matrix(), exact)
  assert_same(results['all'], original_i2t_t2i(exact))
  assert results['ties'] == metrics.count_ties(exact)
  assert results['ties']['i2t_tied'] > 0 and results['ties']['t2i_tied'] > 0
  bounds = results['tie_bounds']['all']
  assert bounds['pessimistic']['rsum'] <= results['all']['rsum'] <= bounds['optimistic']['rsum']
  optimistic, pessimistic = tie_ranks_by_hand(exact)
  assert_tie_ranks(scores.ranks(), optimistic, pessimistic)
  assert bounds['optimistic'] == metrics.metrics_from_ranks(*optimistic)
  assert bounds['pessimistic'] == metrics.metrics_from_ranks(*pessimistic)
  if protocol == 'coco':
    m = n // 5
    blocks = [exact[f * m:(f + 1) * m, 5 * f * m:5 * (f + 1) * m] for f in range(5)]
    for got, want in zip(results['folds'], [original_i2t_t2i(b) for b in blocks]):
      assert_same(got, want)
    for f, block in enumerate(blocks):
      assert_tie_ranks(scores.ranks(f, f + 1), *tie_ranks_by_hand(block))


def tie_ranks_by_hand(sims):
  """((i2t, t2i) optimistic, (i2t, t2i) pessimistic) 0-based ranks, one loop per row and column:
  optimistic counts the scores above the positive (an image's best own caption, a caption's own
  image), pessimistic also every non-positive equal to it."""
  n = sims.shape[0]
  i2t_opt, i2t_pes = [], []
  for i in range(n):
    own = set(range(5 * i, 5 * i + 5))
    best = max(sims[i, c] for c in own)
    above = sum(1 for c in range(5 * n) if sims[i, c] > best)
    tied = sum(1 for c in range(5 * n) if sims[i, c] == best and c not in own)
    i2t_opt.append(above)
    i2t_pes.append(above + tied)
  t2i_opt, t2i_pes = [], []
  for c in range(5 * n):
    positive = sims[c // 5, c]
    above = sum(1 for i in range(n) if sims[i, c] > positive)
    tied = sum(1 for i in range(n) if sims[i, c] == positive and i != c // 5)
    t2i_opt.append(above)
    t2i_pes.append(above + tied)
  return (np.array(i2t_opt), np.array(t2i_opt)), (np.array(i2t_pes), np.array(t2i_pes))


def assert_tie_ranks(ranks, optimistic, pessimistic):
  np.testing.assert_array_equal(ranks.i2t_optimistic, optimistic[0])
  np.testing.assert_array_equal(ranks.t2i_optimistic, optimistic[1])
  np.testing.assert_array_equal(ranks.i2t_pessimistic, pessimistic[0])
  np.testing.assert_array_equal(ranks.t2i_pessimistic, pessimistic[1])
  assert np.any(pessimistic[0] > optimistic[0]) and np.any(pessimistic[1] > optimistic[1])


def test_results_file_round_trip_and_layout(tmp_path):
  rng = np.random.default_rng(4)
  images = rng.normal(size=(20, 8)).astype(np.float32)
  captions = rng.normal(size=(100, 8)).astype(np.float32)
  written = evaluate.evaluate_embeddings(
      images, captions, split_name='testall', protocol='coco', workdir=str(tmp_path),
      header_extra={'checkpoint': 'unit test'}, save_sims=True, dataset='coco')
  path = tmp_path / 'results_coco.npy'
  content = np.load(path, allow_pickle=True).tolist()  # how the original tools read it
  assert set(content) == {'npts', 'sims'} and isinstance(content['npts'], int)
  assert content['npts'] == 20 and content['sims'].dtype == np.float64
  assert content['sims'].shape == (20, 100)
  reread = evaluate.evaluate_results_files([str(path)], protocol='coco', workdir=str(tmp_path),
                                           split_name='testall')
  rescored = json.loads((tmp_path / 'eval' / 'testall_reference.json').read_text())
  assert rescored['mode'] == 'reference' and rescored['all'] == written['all']
  for key in ('all', 'folds', 'fold_mean'):
    assert reread[key] == written[key]
  saved = json.loads((tmp_path / 'eval' / 'testall.json').read_text())
  assert saved['all'] == written['all'] and saved['fold_mean'] == written['fold_mean']
  assert saved['protocol'] == 'coco' and saved['mode'] == 'fast'
  assert len(saved['curves']['all']['k']) == 100
  png = (tmp_path / 'eval' / 'testall_recall.png').read_bytes()
  assert png.startswith(b'\x89PNG')


def test_results_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='results file not found'):
    results_file.read(str(tmp_path / 'missing.npy'))
  bad = tmp_path / 'bad.npy'
  np.save(bad, {'npts': 3, 'sims': np.zeros((3, 10))})
  with pytest.raises(ValueError, match=r'npts = 3 needs \(3, 15\)'):
    results_file.read(str(bad))
  a, b = tmp_path / 'a.npy', tmp_path / 'b.npy'
  results_file.write(str(a), np.zeros((2, 10)))
  results_file.write(str(b), np.zeros((3, 15)))
  with pytest.raises(ValueError, match='same split'):
    results_file.read_average([str(a), str(b)])


def test_ensemble_of_results_files_averages_matrices(tmp_path):
  rng = np.random.default_rng(5)
  first, second = rng.normal(size=(10, 50)), rng.normal(size=(10, 50))
  results_file.write(str(tmp_path / 'a.npy'), first)
  results_file.write(str(tmp_path / 'b.npy'), second)
  paths = [str(tmp_path / 'a.npy'), str(tmp_path / 'b.npy')]
  np.testing.assert_array_equal(results_file.read_average(paths), (first + second) / 2)
  got = evaluate.evaluate_results_files(paths, protocol='single', workdir=None, split_name='t')
  assert got['all'] == metrics.recall_metrics((first + second) / 2)


def test_ensemble_of_embeddings_averages_similarities():
  rng = np.random.default_rng(6)
  members = [(rng.normal(size=(30, 8)).astype(np.float32),
              rng.normal(size=(150, 8)).astype(np.float32)) for _ in range(3)]
  images, captions = evaluate.ensemble_embeddings(members)
  mean = np.mean([v.astype(np.float64) @ t.T.astype(np.float64) for v, t in members], axis=0)
  results, scores = fast(images, captions)
  np.testing.assert_allclose(scores.matrix(), mean, atol=1e-5)
  assert results['all'] == metrics.recall_metrics(scores.matrix())
  assert_same(results['all'], original_i2t_t2i(mean))  # no near-ties at this size
  with pytest.raises(ValueError, match='different splits'):
    evaluate.ensemble_embeddings([members[0], (members[1][0][:10], members[1][1][:50])])


def test_zero_shot_normalisation(tmp_path):
  rng = np.random.default_rng(7)
  image_feat = rng.normal(size=(12, 16)) * rng.uniform(0.5, 20, size=(12, 1))
  text_feat = np.repeat(image_feat, 5, axis=0) + rng.normal(size=(60, 16))
  images, texts = clip_zeroshot.zero_shot_embeddings(image_feat, text_feat)
  np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, rtol=1e-6)
  cosine = (image_feat / np.linalg.norm(image_feat, axis=1, keepdims=True)) @ (
      text_feat / np.linalg.norm(text_feat, axis=1, keepdims=True)).T
  normalised = clip_zeroshot.evaluate_features(image_feat, text_feat, normalize=True,
                                               protocol='single', split_name='test', workdir=None)
  assert_same(normalised['all'], original_i2t_t2i(cosine))
  raw = clip_zeroshot.evaluate_features(image_feat, text_feat, normalize=False,
                                        protocol='single', split_name='test',
                                        workdir=str(tmp_path), save_sims=True, dataset='f30k')
  # Its own file names, so that a zero-shot run in a model's workdir leaves the model's alone.
  assert sorted(os.listdir(tmp_path / 'eval')) == ['test_clip_zeroshot.json',
                                                   'test_clip_zeroshot_recall.png']
  assert sorted(os.listdir(tmp_path)) == ['eval', 'results_f30k_clip_zeroshot.npy']
  assert_same(raw['all'], original_i2t_t2i(image_feat @ text_feat.T))  # clip_eval.py scoring
  assert raw['all'] != normalised['all']  # image norms vary 40x: the two protocols differ
  with pytest.raises(ValueError, match='5 per image'):
    clip_zeroshot.zero_shot_embeddings(image_feat, text_feat[:59])


def test_selection_and_best_checkpoint(tmp_path):
  workdir = str(tmp_path)
  config = demo.get_config()
  assert evaluate.selection_split(config) == 'dev'
  config.eval.selection_split = 'test'
  assert evaluate.selection_split(config) == config.data.eval_split
  config.eval.selection_split = 'val'
  with pytest.raises(ValueError, match="expected 'dev'"):
    evaluate.selection_split(config)

  def results(rsum):
    return {'all': dict.fromkeys(metrics.METRIC_KEYS, 0.0) | {'rsum': rsum}}

  assert evaluate.read_best(workdir) is None
  assert evaluate.default_checkpoint(workdir, None) is None  # -> latest
  assert evaluate.update_best(workdir, 100, results(300.0), 'dev')
  assert not evaluate.update_best(workdir, 200, results(250.0), 'dev')
  assert evaluate.update_best(workdir, 300, results(310.0), 'dev')
  best = evaluate.read_best(workdir)
  assert best['step'] == 300 and best['rsum'] == 310.0 and best['selection_split'] == 'dev'
  assert evaluate.default_checkpoint(workdir, None) == '300'
  assert evaluate.default_checkpoint(workdir, 'best') == '300'
  assert evaluate.default_checkpoint(workdir, '100') == '100'
  with pytest.raises(ValueError, match="selected on 'dev'"):
    evaluate.update_best(workdir, 400, results(500.0), 'test')


def test_shape_errors_are_clear():
  with pytest.raises(ValueError, match=r'captions \[5n, D\]'):
    fast(np.zeros((3, 4), np.float32), np.zeros((14, 4), np.float32))
  with pytest.raises(ValueError, match='5 equal non-empty segments'):
    fast(np.zeros((7, 4), np.float32), np.zeros((35, 4), np.float32), 'coco')
  with pytest.raises(ValueError, match="expected 'single' or 'coco'"):
    fast(np.zeros((5, 4), np.float32), np.zeros((25, 4), np.float32), '1k')
