"""The SCAN precomp tfds builder on generated miniatures of the real layouts, and its errors."""

import os

import numpy as np
import pytest

from input_pipeline import loader
from input_pipeline import scan_files
from input_pipeline import synthetic
from input_pipeline.builders import scan_precomp

DIM = 8


def write_split(root, split, n_images, *, feature_rows='image', id_rows='image', first_id=0,
                seed=0):
  rng = np.random.default_rng(seed)
  feats = rng.normal(size=(n_images, 36, DIM)).astype(np.float32)
  ids = np.arange(first_id, first_id + n_images)
  caps = [f'image {first_id + i} caption {k} .' for i in range(n_images) for k in range(5)]
  np.save(os.path.join(root, f'{split}_ims.npy'),
          np.repeat(feats, 5, axis=0) if feature_rows == 'caption' else feats)
  with open(os.path.join(root, f'{split}_ids.txt'), 'w', encoding='utf-8') as f:
    f.write('\n'.join(str(x) for x in (np.repeat(ids, 5) if id_rows == 'caption' else ids)) + '\n')
  with open(os.path.join(root, f'{split}_caps.txt'), 'w', encoding='utf-8') as f:
    f.write('\n'.join(caps) + '\n')
  return feats, ids, caps


def test_builder_reads_every_granularity(tmp_path):
  raw = tmp_path / 'raw'
  raw.mkdir()
  expected = {
      'train': write_split(raw, 'train', 7, first_id=0, seed=1),
      'dev': write_split(raw, 'dev', 3, feature_rows='caption', id_rows='caption', first_id=7,
                         seed=2),
      'testall': write_split(raw, 'testall', 5, feature_rows='caption', id_rows='image',
                             first_id=10, seed=3),
  }
  builder = scan_precomp.build(str(raw), str(tmp_path / 'tfds'), 'butd', region_dim=DIM)
  assert set(builder.info.splits) == set(expected)
  for split, (feats, ids, caps) in expected.items():
    source = builder.as_data_source(split)
    assert len(source) == len(feats)
    for i in range(len(feats)):
      example = source[i]
      assert example['image_index'] == i
      assert example['image_id'] == ids[i]
      np.testing.assert_array_equal(example['regions'], feats[i])
      assert [c.decode() for c in example['captions']] == caps[5 * i:5 * i + 5]


def test_granularity_rules(tmp_path):
  write_split(tmp_path, 'test', 4, feature_rows='caption', id_rows='image')
  files = scan_files.open_split(str(tmp_path), 'test', expected_dim=DIM)
  assert (files.feature_div, files.id_div) == (1, 5)
  assert [files.image_row(i) for i in range(4)] == [0, 5, 10, 15]


def test_caption_count_not_five_per_image(tmp_path):
  write_split(tmp_path, 'test', 4)
  path = tmp_path / 'test_caps.txt'
  path.write_text('\n'.join(path.read_text().split('\n')[:-3]) + '\n')  # drop 2 captions
  with pytest.raises(scan_files.DataError, match=r'test_caps.txt: 18 caption lines'):
    scan_files.open_split(str(tmp_path), 'test')


def test_rows_fit_neither_granularity(tmp_path):
  write_split(tmp_path, 'test', 4)
  np.save(tmp_path / 'test_ims.npy', np.zeros((6, 36, DIM), np.float32))
  with pytest.raises(scan_files.DataError, match=r'test_ims.npy: 6 feature rows, expected 4'):
    scan_files.open_split(str(tmp_path), 'test')


def test_truncated_npy_and_missing_directory(tmp_path):
  write_split(tmp_path, 'test', 4)
  path = tmp_path / 'test_ims.npy'
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(scan_files.DataError, match='truncated'):
    scan_files.open_split(str(tmp_path), 'test')
  with pytest.raises(scan_files.DataError, match='data directory not found'):
    scan_files.available_splits(str(tmp_path / 'nope'))


def test_synthetic_world_goes_through_the_builder(tmp_path):
  raw = str(tmp_path / 'syn')
  synthetic.generate(raw, seed=3, splits={'train': 12, 'dev': 4, 'test': 6}, region_dim=16,
                     progress=False)
  assert sorted(os.listdir(os.path.join(raw, 'images')))[:2] == ['000000.jpg', '000001.jpg']
  builder = scan_precomp.build(raw, str(tmp_path / 'tfds'), 'synthetic', region_dim=16)
  dev = loader.SplitSource(builder.as_data_source('dev'))
  assert dev.num_images == 4 and dev.num_captions == 20
  example = dev.image(2)
  assert example['regions'].shape == (36, 16)
  assert example['image_file'].decode() == f'{example["image_id"]:06d}.jpg'
  captions = [c.decode() for c in example['captions']]
  assert len(set(captions)) == 5


def test_synthetic_captions_need_binding():
  rng = np.random.default_rng(0)
  captions = [c for _ in range(200) for c in synthetic.make_captions(synthetic._sample_scene(rng), rng)]  # pylint: disable=protected-access
  relational = [c for c in captions if ' of a ' in c or ' above a ' in c]
  partial = [c for c in captions if len(c.split()) <= 6 and ' of ' not in c and ':' not in c]
  assert len(relational) > 100 and len(partial) > 15
