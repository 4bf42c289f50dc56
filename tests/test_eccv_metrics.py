"""Multi-positive metrics: ECCV Caption / CxC on the library's real COCO 5K test ids, the
alignment check, the tie rule of the ranked lists, and the synthetic world's exact positives."""

import copy
import dataclasses
import json
import os
import types

import numpy as np
import pytest

from aahr_jax import blockwise_ranks
from aahr_jax import evaluate
from aahr_jax import multi_positive
from configs import demo
from input_pipeline import synthetic
from input_pipeline import synthetic_oracle

STEP = 30000.0  # bonus spacing: above every plain score x + y (all sums exact in float32)


def _library_ids():
  metrics = multi_positive.library().Metrics()
  caption_ids = np.asarray(metrics.coco_ids, np.int64)
  image_ids = np.array([metrics.coco_gts['t2i'][int(c)][0] for c in caption_ids[::5]], np.int64)
  return image_ids, caption_ids


class FabricatedCoco:
  """S[i, c] = x_i + y_c + u_i w_c + a_i b_c over the COCO 5K test split, built from 4-d
  embeddings so that every ranked list is known without the 5,000 x 25,000 matrix:
  plain rows and columns keep the split order (x, y decrease with the index); one image query
  (u = 1) puts a chosen caption order first (w); one caption query (b = 1) a chosen image order
  (a). Scores are distinct multiples of 1/2 below 2^21 in each row and column: no ties."""

  def __init__(self):
    self.gt = multi_positive.coco_ground_truth(_library_ids()[0])
    image_row = {int(v): i for i, v in enumerate(self.gt.image_ids)}
    caption_row = {int(v): c for c, v in enumerate(self.gt.caption_ids)}
    eccv = self.gt.metrics.eccv_gts
    # The image query: the first ECCV image query whose positives are all test captions.
    self.image = next(k for k, v in eccv['i2t'].items() if set(v) <= caption_row.keys())
    positives = [caption_row[c] for c in sorted(set(eccv['i2t'][self.image]))]
    negative = next(c for c in range(25000) if c not in positives)
    # Its list: two positives, one negative, then the other positives (the last one at R + 1).
    self.image_order = positives[:2] + [negative] + positives[2:]
    # The caption query: an ECCV caption query whose positives avoid the image query.
    qi = image_row[self.image]
    self.caption = next(k for k, v in eccv['t2i'].items()
                        if qi not in {image_row[i] for i in v} and len(set(v)) >= 3
                        and caption_row[k] not in self.image_order)
    image_positives = [image_row[i] for i in sorted(set(eccv['t2i'][self.caption]))]
    other = next(i for i in range(5000) if i not in image_positives and i != qi)
    self.caption_order = [other] + image_positives  # a negative first: R@1 = 0
    x, y = 5000.0 - np.arange(5000), 25000.0 - np.arange(25000)
    u, w = np.zeros(5000), np.zeros(25000)
    a, b = np.zeros(5000), np.zeros(25000)
    u[qi] = 1.0
    w[self.image_order] = STEP * np.arange(len(self.image_order), 0, -1) + 0.5
    b[caption_row[self.caption]] = 1.0
    a[self.caption_order] = STEP * np.arange(len(self.caption_order), 0, -1) + 0.5
    self.rows = (qi, caption_row[self.caption])
    self.vectors = (x, y, u, w, a, b)
    self.scores = blockwise_ranks.TiledScores(
        np.stack([np.ones(5000), x, u, a], 1).astype(np.float32),
        np.stack([y, np.ones(25000), w, b], 1).astype(np.float32), segments=5)

  def expected_lists(self, depth: int) -> dict:
    """The library's input, built from the construction alone."""
    x, y, u, w, a, b = self.vectors
    plain_i2t, plain_t2i = np.arange(depth), np.arange(depth)
    i2t, t2i = {}, {}
    for i in range(5000):
      order = plain_i2t if u[i] == 0 and a[i] == 0 else np.argsort(-(y + u[i] * w + a[i] * b))
      i2t[int(self.gt.image_ids[i])] = self.gt.caption_ids[order[:depth]].tolist()
    for c in range(25000):
      order = plain_t2i if w[c] == 0 and b[c] == 0 else np.argsort(-(x + u * w[c] + a * b[c]))
      t2i[int(self.gt.caption_ids[c])] = self.gt.image_ids[order[:depth]].tolist()
    return {'i2t': i2t, 't2i': t2i}


@pytest.fixture(scope='module')
def coco():
  return FabricatedCoco()


def test_coco_metrics_by_hand_on_two_queries(coco):
  eccv = coco.gt.metrics.eccv_gts
  library = copy.copy(coco.gt.metrics)  # the library's own object, with two ECCV queries
  library.eccv_gts = {'i2t': {coco.image: eccv['i2t'][coco.image]},
                      't2i': {coco.caption: eccv['t2i'][coco.caption]}}
  gt = dataclasses.replace(coco.gt, metrics=library, families=('eccv',))
  m = gt.evaluate(coco.scores)['metrics']
  r = len(set(eccv['i2t'][coco.image]))
  # i2t list: pos, pos, neg, pos, ... : precisions at the positives 1, 1, then (k-1)/k, k >= 4.
  assert m['i2t_r1'] == 100.0
  assert m['i2t_r_precision'] == pytest.approx(100 * (r - 1) / r)
  assert m['i2t_map_at_r'] == pytest.approx(100 * (2 + sum((k - 1) / k for k in range(4, r + 1))) / r)
  # t2i list: neg, pos, pos, ...: precision (k-1)/k at every position k >= 2 up to R.
  r = len(set(eccv['t2i'][coco.caption]))
  assert m['t2i_r1'] == 0.0
  assert m['t2i_r_precision'] == pytest.approx(100 * (r - 1) / r)
  assert m['t2i_map_at_r'] == pytest.approx(100 * sum((k - 1) / k for k in range(2, r + 1)) / r)


def test_coco_metrics_equal_the_library_called_directly(coco):
  result = coco.gt.evaluate(coco.scores)
  assert result['ties'] == {'i2t_tied': 0, 't2i_tied': 0}
  assert result['depth'] == {'i2t': 48, 't2i': 19}  # the largest ECCV / CxC positive sets
  lists = coco.expected_lists(64)
  library = coco.gt.metrics
  eccv = library.eccv_metrics(lists, 'all')
  m = result['metrics']
  for d in ('i2t', 't2i'):
    assert m[f'{d}_map_at_r'] == pytest.approx(100 * eccv['eccv_map_at_r'][d], abs=1e-9)
    assert m[f'{d}_r_precision'] == pytest.approx(100 * eccv['eccv_rprecision'][d], abs=1e-9)
    assert m[f'{d}_r1'] == pytest.approx(100 * eccv['eccv_r1'][d], abs=1e-9)
    for k in (1, 5, 10):
      assert m[f'{d}_cxc_r{k}'] == pytest.approx(
          100 * library.cxc_recalls(lists, 'all', K=k)[d], abs=1e-9)
  # The split order itself is a poor ranking, the two fabricated queries aside.
  assert 0 < m['i2t_cxc_r10'] < 5 and m['t2i_map_at_r'] < 1


def test_misaligned_precomp_order_is_refused():
  image_ids, _ = _library_ids()
  swapped = image_ids.copy()
  swapped[[7, 8]] = swapped[[8, 7]]
  with pytest.raises(multi_positive.MultiPositiveError,
                     match=rf'testall_ids.txt: image row 7 \(caption row 35\) is image '
                           rf'{image_ids[8]}, but .* has image {image_ids[7]} there .* 10 of '
                           r'25,000 caption rows differ'):
    multi_positive.coco_ground_truth(swapped)
  with pytest.raises(multi_positive.MultiPositiveError, match='this split has 1,000'):
    multi_positive.coco_ground_truth(image_ids[:1000])
  with pytest.raises(multi_positive.MultiPositiveError, match='pm_image_to_caption.json not found'):
    multi_positive.coco_ground_truth(image_ids, pmrp_dir=os.path.dirname(__file__))


def test_ranked_lists_follow_the_recall_protocol_tie_rule():
  rng = np.random.default_rng(0)
  sims = rng.integers(0, 6, size=(6, 30)).astype(np.float64)  # many exact ties
  sims[0] = np.arange(30)  # no tie: the order is the scores'
  lists, tied = multi_positive.ranked_lists(sims, {'i2t': 4, 't2i': 3})
  assert tied['i2t_tied'] == 5
  assert lists['i2t'][0].tolist() == [29, 28, 27, 26]
  for i in range(1, 6):
    assert lists['i2t'][i].tolist() == np.argsort(sims[i])[::-1][:4].tolist()
  for c in range(30):
    assert lists['t2i'][c].tolist() == np.argsort(sims[:, c])[::-1][:3].tolist()


def _hand_truth():
  """2 images, 10 captions; caption 0 is also true of image 1, caption 9 also of image 0."""
  truth = np.zeros((2, 10), bool)
  truth[0, :5] = truth[1, 5:] = True
  truth[1, 0] = truth[0, 9] = True
  return truth


def test_tiled_lists_equal_the_matrix_lists_with_padding_and_ties():
  rng = np.random.default_rng(1)
  # 3 images in tiles of 2 (one padded row and five padded columns, scoring 0); every real
  # score is below 0 (last coordinate), and captions 3 and 4 are copies (tied columns).
  images = np.concatenate([rng.normal(size=(3, 3)), np.ones((3, 1))], 1).astype(np.float32)
  captions = np.concatenate([rng.normal(size=(15, 3)), -20 * np.ones((15, 1))], 1)
  captions[4] = captions[3]
  captions = captions.astype(np.float32)
  scores = blockwise_ranks.TiledScores(images, captions, tile=2)
  assert scores.tile == 2 and not scores.caption_valid.all()
  sims = scores.matrix()
  depth = {'i2t': 6, 't2i': 2}
  tiled, tiled_ties = multi_positive.ranked_lists(scores, depth)
  listed, listed_ties = multi_positive.ranked_lists(sims, depth)
  for d in ('i2t', 't2i'):
    assert tiled[d].tolist() == listed[d].tolist()
  assert tiled_ties == listed_ties and tiled_ties['i2t_tied'] > 0  # the copies tie in some row
  # A tied image pair in a column: image 2 copied onto image 1 (the column fallback too).
  images[2] = images[1]
  scores = blockwise_ranks.TiledScores(images, captions, tile=2)
  tiled, tiled_ties = multi_positive.ranked_lists(scores, depth)
  listed, listed_ties = multi_positive.ranked_lists(scores.matrix(), depth)
  assert tiled['t2i'].tolist() == listed['t2i'].tolist()
  assert tiled_ties == listed_ties and tiled_ties['t2i_tied'] == 15


def test_synthetic_positives_by_hand():
  gt = multi_positive.synthetic_ground_truth(_hand_truth())
  # A hand-made matrix: image 0 ranks c9, c5, c0, c1, c2, c3, c4, ...; 6 positives.
  sims = np.zeros((2, 10))
  sims[0] = [8, 7, 6, 5, 4, 9.5, 0, 0.1, 0.2, 10]
  sims[1] = [1, 0, 0, 0, 0, 5, 4, 3, 2, 0.5]  # positives 5..9 and 0: c0 comes 6th
  sims[:, 0] += [0, 2]  # caption 0: image 1 (1 + 2 = 3) below image 0 (8)
  m = gt.evaluate(sims)['metrics']
  # i2t image 0, R = 6: c9 + , c5 - , c0 + , c1 + , c2 + , c3 + -> precisions 1, 0, 2/3, 3/4,
  # 4/5, 5/6. Image 1, R = 6: c5..c8 +, c0 (3) +, c9 + -> all 1.
  ap0 = (1 + 2 / 3 + 3 / 4 + 4 / 5 + 5 / 6) / 6
  assert m['i2t_map_at_r'] == pytest.approx(100 * (ap0 + 1) / 2)
  assert m['i2t_r_precision'] == pytest.approx(100 * (5 / 6 + 1) / 2)
  # t2i: caption 0 has both images as positives (R = 2): all right. Caption 5 ranks image 0
  # (9.5) above image 1 (5): R = 1 -> 0. Every other caption puts its single own image first,
  # except caption 9 (both images true, R = 2: fine) and captions 6..8 (image 1 above 0).
  assert m['t2i_r1'] == pytest.approx(100 * 9 / 10)
  assert m['t2i_map_at_r'] == pytest.approx(100 * 9 / 10)


def test_synthetic_oracle_is_the_ceiling():
  truth = _hand_truth()
  sims = truth / truth.sum(axis=0, keepdims=True)  # the consistency oracle's scores
  m = multi_positive.synthetic_ground_truth(truth).evaluate(sims)['metrics']
  assert set(m.values()) == {100.0}


def test_synthetic_ground_truth_of_a_config_split(capsys):
  config = demo.get_config()
  config.data.synthetic.update(train=1, dev=1, test=4)
  scenes, captions = synthetic.scenes('test', seed=0, region_dim=config.data.region_dim,
                                      splits={'train': 1, 'dev': 1, 'test': 4})
  split = types.SimpleNamespace(num_images=4, captions=captions)
  gt = multi_positive.for_config(config, '/nonexistent', 'test', split)
  truth = synthetic_oracle.truth_matrix(scenes, captions)
  assert gt.metrics.eccv_gts['t2i'] == {c: np.flatnonzero(truth[:, c]).tolist() for c in range(20)}
  split.captions = captions[:5] + captions[6:] + captions[5:6]
  assert multi_positive.for_config(config, '/nonexistent', 'test', split) is None
  assert 'Multi-positive metrics skipped' in capsys.readouterr().out


def test_evaluation_reports_the_block(tmp_path, capsys):
  gt = multi_positive.synthetic_ground_truth(_hand_truth())
  rng = np.random.default_rng(2)
  evaluate.evaluate_embeddings(rng.normal(size=(2, 4)), rng.normal(size=(10, 4)),
                               split_name='test', protocol='single', workdir=str(tmp_path),
                               ground_truth=gt)
  out = capsys.readouterr().out
  assert 'Multi-positive (every true match of the synthetic world' in out
  assert 'mAP@R' in out and 'Text to image' in out.split('Multi-positive')[1]
  with open(tmp_path / 'eval' / 'test.json', encoding='utf-8') as f:
    saved = json.load(f)['multi_positive']
  assert set(saved['metrics']) == {f'{d}_{k}' for d in ('i2t', 't2i')
                                   for k in ('map_at_r', 'r_precision', 'r1')}
  assert (tmp_path / 'eval' / 'test_multi_positive.png').stat().st_size > 0
  assert any(name.startswith('events') for name in os.listdir(tmp_path / 'tensorboard'))


def test_coco_configs_evaluate_eccv_on_testall_only(capsys):
  from configs import gpo_coco  # pylint: disable=import-outside-toplevel
  image_ids, _ = _library_ids()
  split = types.SimpleNamespace(num_images=5000, source=[{'image_id': i} for i in image_ids])
  config = gpo_coco.get_config()
  gt = multi_positive.for_config(config, '/nonexistent', 'testall', split)
  assert gt.families == ('eccv', 'cxc') and gt.image_ids.tolist() == image_ids.tolist()
  assert multi_positive.for_config(config, '/nonexistent', 'test', split) is None
  assert "they score COCO testall, not 'test'" in capsys.readouterr().out
  config.eval.eccv = False
  assert multi_positive.for_config(config, '/nonexistent', 'testall', split) is None
