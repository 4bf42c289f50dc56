"""f30k/coco precomp builders on miniatures of the real layouts: pairing, dev truncation, COCO
testall folds, HREM and VSE-infinity folders, float16 storage, restartable builds, the training
batches (augmentation rules, length bucket, per-host slices, resume by step)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from configs import common
from input_pipeline import bert_tokenizer
from input_pipeline import caption_tokens
from input_pipeline import datasets
from input_pipeline import layouts
from input_pipeline import loader
from input_pipeline import scan_files
from input_pipeline.builders import scan_precomp

DIM = 8
WORDS = ('man', 'dog', 'red', 'ball', 'park', 'runs', 'green', 'tree', 'water', 'boat')


def caption(image_id: int, k: int) -> str:
  words = [WORDS[(image_id * 7 + k * 3 + j) % len(WORDS)] for j in range(3 + k)]
  return f'picture {image_id} number {k} : a ' + ' '.join(words) + ' .'


def write_split(folder, split, ids, *, rows='image', id_rows='image', seed=0):
  """A SCAN split of the given image ids; the features encode the id (row [0, 0] = id)."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  feats = rng.random((len(ids), 36, DIM)).astype(np.float32)
  feats[:, 0, 0] = ids
  np.save(os.path.join(folder, f'{split}_ims.npy'),
          np.repeat(feats, 5, axis=0) if rows == 'caption' else feats)
  listed = np.repeat(ids, 5) if id_rows == 'caption' else np.asarray(ids)
  with open(os.path.join(folder, f'{split}_ids.txt'), 'w', encoding='utf-8') as f:
    f.write('\n'.join(str(x) for x in listed) + '\n')
  with open(os.path.join(folder, f'{split}_caps.txt'), 'w', encoding='utf-8') as f:
    f.write('\n'.join(caption(i, k) for i in ids for k in range(5)) + '\n')
  return feats


def write_images(dataset_dir, ids, dataset):
  """id_mapping.json and JPEGs as F30K (flickr30k-images/<n>.jpg) or COCO (images/val2014/...)."""
  mapping = {}
  for i in ids:
    name = (f'{1000 + i}.jpg' if dataset == 'f30k'
            else f'val2014/COCO_val2014_{i:012d}.jpg')
    folder = 'flickr30k-images' if dataset == 'f30k' else 'images'
    path = os.path.join(dataset_dir, folder, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((20, 30, 3), i % 255, np.uint8)).save(path)
    mapping[str(i)] = name
  with open(os.path.join(dataset_dir, 'id_mapping.json'), 'w', encoding='utf-8') as f:
    json.dump(mapping, f)


def f30k_aahr(root):
  """F30K in the AAHR layout: train per image, dev (7 images, per caption), test per caption."""
  precomp = os.path.join(root, 'f30k', 'precomp')
  splits = {'train': list(range(0, 12)), 'dev': list(range(12, 19)), 'test': list(range(19, 24))}
  feats = {'train': write_split(precomp, 'train', splits['train'], seed=1),
           'dev': write_split(precomp, 'dev', splits['dev'], rows='caption', id_rows='caption',
                              seed=2),
           'test': write_split(precomp, 'test', splits['test'], rows='caption',
                               id_rows='caption', seed=3)}
  write_images(os.path.join(root, 'f30k'), sum(splits.values(), []), 'f30k')
  return splits, feats


def config_for(dataset, root, tmp_path, **data):
  c = common.base_config()
  c.data.name = dataset
  c.data.manual_dir = str(root)
  c.data.data_dir = str(tmp_path / 'tfds')
  c.data.region_dim = DIM
  c.data.max_len = 24
  c.data.dev_captions = 25   # miniature of the 5,000-caption truncation
  for key, value in data.items():
    c.data[key] = value
  return c


def assert_pairing(split: loader.SplitSource, ids, feats):
  assert split.num_images == len(ids)
  for i, image_id in enumerate(ids):
    example = split.image(i)
    assert example['image_id'] == image_id
    assert list(example['caption_indices']) == list(range(5 * i, 5 * i + 5))
    assert [c.decode() for c in example['captions']] == [caption(image_id, k) for k in range(5)]
    np.testing.assert_array_equal(example['regions'], feats[i])
  assert split.captions[17] == caption(ids[3], 2)


def test_f30k_aahr_layout_pairs_everything_and_truncates_dev(tmp_path):
  splits, feats = f30k_aahr(tmp_path / 'data')
  config = config_for('f30k', tmp_path / 'data', tmp_path)
  builder = datasets.build(config, str(tmp_path / 'w'))
  assert builder.builder_config.name == 'f30k_precomp_d8'
  for name in ('train', 'test'):
    assert_pairing(datasets.open_split(builder, name), splits[name], feats[name])
  dev = datasets.open_split(builder, 'dev')
  assert (dev.num_images, dev.num_captions) == (5, 25)   # 7 images stored, first 25 captions used
  assert builder.info.splits['dev'].num_examples == 7
  example = dev.image(4)
  assert example['image_file'].decode() == '1016.jpg'
  assert example['image_path'].decode() == 'flickr30k-images/1016.jpg'


def test_coco_hrem_layout_testall_folds_and_per_caption_ids(tmp_path):
  root = tmp_path / 'data'
  precomp = root / 'coco_precomp'
  train = write_split(precomp, 'train', [500 + i for i in range(10)])
  testall_ids = [100 + i for i in range(10)]
  testall = write_split(precomp, 'testall', testall_ids, rows='image', id_rows='caption')
  write_split(precomp, 'test', testall_ids[:2], rows='caption', id_rows='caption')
  config = config_for('coco', root, tmp_path, feature_dtype='float16')
  builder = datasets.build(config, str(tmp_path / 'w'))
  assert datasets.layout(config, str(tmp_path / 'w')).name == 'hrem'
  assert builder.builder_config.name == 'coco_precomp_d8_fp16'
  split = datasets.open_split(builder, 'testall')
  assert split.regions.dtype == np.float16
  for i, image_id in enumerate(testall_ids):
    example = split.image(i)
    assert example['image_id'] == image_id
    np.testing.assert_allclose(example['regions'], testall[i], atol=1e-3)
  assert datasets.open_split(builder, 'train').image(3)['image_id'] == 503
  np.testing.assert_allclose(datasets.open_split(builder, 'train').image(3)['regions'], train[3],
                             atol=1e-3)
  folds = datasets.fold_ranges(split)
  assert folds[1] == (range(2, 4), range(10, 20))
  config.eval.protocol = 'coco'
  with pytest.raises(scan_files.DataError, match='5,000-image testall'):
    datasets.check_eval_protocol(config, 'test', datasets.open_split(builder, 'test'))


def test_vse_infty_layout_and_karpathy_json(tmp_path):
  root = tmp_path / 'f30k'
  write_split(root / 'precomp', 'test', [3, 4], rows='caption', id_rows='caption')
  with open(root / 'dataset_flickr30k.json', 'w', encoding='utf-8') as f:
    json.dump({'images': [{'filename': f'{n}.jpg', 'imgid': n} for n in range(6)]}, f)
  found = layouts.find(str(root), 'f30k')
  assert found.name == 'vse_infty' and found.mapping_path.endswith('dataset_flickr30k.json')
  assert layouts.read_mapping(found.mapping_path, 'f30k')['4'] == '4.jpg'
  with pytest.raises(scan_files.DataError, match=r'aahr: .*coco/precomp.*hrem: .*coco_precomp'):
    layouts.find(str(tmp_path), 'coco')


def test_interrupted_build_leaves_nothing_and_is_restartable(tmp_path, monkeypatch):
  splits, _ = f30k_aahr(tmp_path / 'data')
  config = config_for('f30k', tmp_path / 'data', tmp_path)

  def fail(*args, **kwargs):
    raise KeyboardInterrupt('killed mid-build')
  original = scan_precomp.copy_regions
  calls = []

  def fail_on_second(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      fail()
    return original(*args, **kwargs)
  monkeypatch.setattr(scan_precomp, 'copy_regions', fail_on_second)
  with pytest.raises(KeyboardInterrupt):
    datasets.build(config, str(tmp_path / 'w'))
  leftovers = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / 'tfds') for f in files
               if '.config' not in d]   # tfds's record of the builder config, not data
  assert leftovers == []
  assert not scan_precomp.is_built(config.data.data_dir, 'f30k_precomp', DIM)
  monkeypatch.setattr(scan_precomp, 'copy_regions', original)
  builder = datasets.build(config, str(tmp_path / 'w'))
  assert builder.info.splits['train'].num_examples == len(splits['train'])


def test_training_batches_on_the_miniature(tmp_path):
  splits, feats = f30k_aahr(tmp_path / 'data')
  config = config_for('f30k', tmp_path / 'data', tmp_path)
  split = datasets.open_split(datasets.build(config, str(tmp_path / 'w')), 'train')
  text = loader.TextOptions(max_len=12)
  kwargs = dict(batch_size=8, num_steps=6, seed=3, text=text, num_threads=1)
  batches = list(loader.train_iterator(split, **kwargs))
  assert len(batches) == 6   # 60 captions // 8 = 7 steps per epoch
  for b in batches:
    assert b['regions'].shape == (8, 36, DIM) and b['bert_ids'].shape == (8, 12)
    for row in range(8):
      image = b['caption_index'][row] // 5
      assert b['image_index'][row] == image
      n = b['region_len'][row]
      kept = b['regions'][row, :n]
      assert (b['regions'][row, n:] == 0).all()
      # kept regions are rows of this image's features, in their original order
      order = [int(np.where((feats['train'][image] == r).all(axis=1))[0][0]) for r in kept]
      assert order == sorted(order)
    assert b['batch_max_len'] == b['bert_len'].max()
    assert b['batch_max_regions'] == b['region_len'].max()
    assert b['repeat'] == 8 - len(set(b['image_index']))
    assert (b['bert_ids'][:, 0] == bert_tokenizer.CLS_ID).all()
    assert (b['bert_ids'][np.arange(8), b['bert_len'] - 1] == bert_tokenizer.SEP_ID).all()
    np.testing.assert_array_equal(b['bert_mask'], b['bert_ids'] != 0)
  assert any(b['truncated'].any() for b in batches)   # captions of 13-18 tokens, width 12
  # The iterator state is the step: resuming at step 4 gives the same batches.
  resumed = list(loader.train_iterator(split, start_step=4, **kwargs))
  for a, b in zip(batches[4:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  # Per-host slices of the same global batch.
  halves = [list(loader.train_iterator(split, process_index=p, process_count=2, **kwargs))
            for p in range(2)]
  for step, whole in enumerate(batches):
    for key in ('regions', 'bert_ids', 'caption_index'):
      np.testing.assert_array_equal(
          np.concatenate([halves[0][step][key], halves[1][step][key]]), whole[key])
    assert halves[1][step]['batch_max_len'] == whole['batch_max_len']


def reference_augment(words, u, random_ids):
  """docs/data.md 2.1, word by word: u < .1 mask, < .12 random, < .2 delete."""
  out = []
  for word, draw, rand in zip(words, u, random_ids):
    if draw < 0.1:
      out += [bert_tokenizer.MASK_ID] * len(word)
    elif draw < 0.12:
      out += list(rand)
    elif draw >= 0.2:
      out += list(word)
  return [bert_tokenizer.CLS_ID] + out + [bert_tokenizer.SEP_ID]


def test_word_augmentation_is_the_original_rule_per_word():
  texts = ['a playground unbelievable kaleidoscope', 'two dogs .', 'snowboarders jump'] * 700
  tokens = caption_tokens.tokenize(texts)
  captions = np.arange(len(texts))
  ids, lengths, _ = caption_tokens.encode_batch(tokens, captions, 32, np.random.default_rng(5))
  rng = np.random.default_rng(5)   # the same draws, in the documented order
  u = rng.random(int(tokens.num_words.sum()))
  random_ids = rng.integers(0, tokens.vocab_size, size=int(tokens.piece_start[-1]))
  word_offset = piece_offset = 0
  tokenizer = bert_tokenizer.get_tokenizer()
  counts = np.zeros(4)
  for c, text in enumerate(texts):
    words = tokenizer.word_pieces(text)
    n_pieces = sum(len(w) for w in words)
    rand, k = [], piece_offset
    for w in words:
      rand.append(random_ids[k:k + len(w)])
      k += len(w)
    draws = u[word_offset:word_offset + len(words)]
    want = reference_augment(words, draws, rand)
    assert list(ids[c, :lengths[c]]) == want
    counts += [(draws < .1).sum(), ((draws >= .1) & (draws < .12)).sum(),
               ((draws >= .12) & (draws < .2)).sum(), len(draws)]
    word_offset += len(words)
    piece_offset += n_pieces
  assert any(len(w) > 1 for w in tokenizer.word_pieces(texts[0]))   # multi-piece words occur
  rates = counts[:3] / counts[3]
  assert 0.08 < rates[0] < 0.12 and 0.01 < rates[1] < 0.03 and 0.06 < rates[2] < 0.10


def test_length_bucket_covers_requested_share():
  lengths = np.concatenate([np.full(998, 15), [40, 90]])
  assert loader.length_bucket(lengths, 0.998) == 16
  assert loader.length_bucket(lengths, 0.999) == 40
  assert loader.length_bucket(lengths, 1.0) == 96
