"""The consistency oracle of the synthetic world: caption parsing, truth, expected recalls."""

import numpy as np
import pytest

from input_pipeline import synthetic
from input_pipeline import synthetic_oracle as oracle

RED_CIRCLE = {'colour': 'red', 'shape': 'circle', 'size': 'small', 'row': 0, 'col': 0}
BLUE_SQUARE = {'colour': 'blue', 'shape': 'square', 'size': 'large', 'row': 1, 'col': 2}


def test_every_generated_caption_parses_and_is_true_of_its_image():
  scenes, captions = synthetic.scenes('dev', splits={'train': 1, 'dev': 60, 'test': 1},
                                      region_dim=8)
  kinds = set()
  for c, caption in enumerate(captions):
    parsed = oracle.parse_caption(caption)
    kinds.add(parsed['kind'])
    assert oracle.is_true_of(parsed, scenes[c // 5]), caption
  assert kinds == {'relation', 'statement', 'list', 'pair', 'partial'}


def test_truth_matrix_is_is_true_of_on_every_pair():
  scenes, captions = synthetic.scenes('dev', splits={'train': 1, 'dev': 80, 'test': 1},
                                      region_dim=8)
  expected = [[oracle.is_true_of(oracle.parse_caption(c), s) for c in captions] for s in scenes]
  truth = oracle.truth_matrix(scenes, captions)
  assert truth.tolist() == expected
  assert 1.0 < truth.sum(axis=0).mean() < 80  # captions true of other images too, not of all
  two = 'two shapes : a blue square and a red circle .'
  assert oracle.truth_matrix([[RED_CIRCLE, BLUE_SQUARE], [RED_CIRCLE, BLUE_SQUARE, dict(
      RED_CIRCLE, row=2)]], [two]).tolist() == [[True], [False]]  # a list names every object


def test_parse_and_truth_on_hand_made_scenes():
  scene = [RED_CIRCLE, BLUE_SQUARE]
  swapped = [dict(RED_CIRCLE, colour='blue'), dict(BLUE_SQUARE, colour='red')]
  caption = 'a picture of a tiny red disc to the left of a blue box .'
  parsed = oracle.parse_caption(caption)
  assert parsed == {'kind': 'relation', 'relation': 'left', 'objects': [
      {'colour': 'red', 'shape': 'circle', 'size': 'small'}, {'colour': 'blue', 'shape': 'square'}]}
  assert oracle.is_true_of(parsed, scene)
  assert not oracle.is_true_of(parsed, swapped)  # attribute binding
  assert not oracle.is_true_of(oracle.parse_caption('the red circle is right of the blue square .'),
                               scene)
  two = oracle.parse_caption('two shapes : a blue square and a red circle .')
  assert oracle.is_true_of(two, scene) and not oracle.is_true_of(two, scene + [RED_CIRCLE])
  assert not oracle.is_true_of(oracle.parse_caption('a red circle and a red circle .'), scene)
  with pytest.raises(ValueError, match='cannot read caption'):
    oracle.parse_caption('a golden circle .')


def test_expected_recalls_by_hand():
  # 2 images, 10 captions. Caption 0 (image 0) is also true of image 1; caption 5 (image 1) is
  # also true of image 0; every other caption is true of its own image only.
  truth = np.zeros((2, 10), bool)
  truth[0, :5] = truth[1, 5:] = True
  truth[1, 0] = truth[0, 5] = True
  r = oracle.oracle_recalls(truth)
  # t2i: captions 0 and 5 find their image at R@1 with probability 1/2, the other 8 surely.
  assert r['t2i_r1'] == pytest.approx(100 * (8 + 0.5 + 0.5) / 10)
  assert r['t2i_r5'] == 100.0
  # i2t: each image's own captions 1-4 (score 1) outrank the shared ones (score 1/2).
  assert r['i2t_r1'] == 100.0
  truth[0, 3] = False  # a caption false of its own image: the parser is out of date
  with pytest.raises(ValueError, match='not true of its own image'):
    oracle.oracle_recalls(truth)
