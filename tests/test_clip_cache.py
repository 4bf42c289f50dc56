"""The frozen-CLIP feature cache: parity with torch open_clip on the cached rows, alignment with
the dataset in training and evaluation batches, the online path, the demo CLIP, and errors."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

open_clip = pytest.importorskip('open_clip')

from configs import common
from conversion import __main__ as conversion_cli
from input_pipeline import clip_cache
from input_pipeline import datasets
from input_pipeline import loader
from input_pipeline import scan_files
from input_pipeline import synthetic

# Small random OpenCLIP with the real tokenizer (vocab 49,408, context 77) and a 64-pixel input.
SMALL_CLIP = {'embed_dim': 32,
              'vision_cfg': {'image_size': 64, 'patch_size': 16, 'width': 48, 'layers': 2,
                             'head_width': 24},
              'text_cfg': {'context_length': 77, 'vocab_size': 49408, 'width': 32, 'heads': 2,
                           'layers': 2}}


@pytest.fixture(scope='module')
def clip_files(tmp_path_factory):
  """(torch model, converted .safetensors) of one random CLIP, via `python -m conversion`."""
  folder = tmp_path_factory.mktemp('clip')
  torch.manual_seed(0)
  model = open_clip.model.CLIP(**SMALL_CLIP).eval()
  with torch.no_grad():   # random init leaves norms at (1, 0); perturb so mix-ups show
    for name, p in model.named_parameters():
      if p.ndim == 1 and 'embedding' not in name:
        p.add_(0.1 * torch.randn_like(p))
  torch.save(model.state_dict(), folder / 'small.bin')
  (folder / 'small.json').write_text(json.dumps(SMALL_CLIP))
  out = folder / 'small_clip.safetensors'
  assert conversion_cli.main(['open_clip', '--model', str(folder / 'small.json'), '--src',
                              str(folder / 'small.bin'), '--out', str(out)]) == 0
  return model, str(out)


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  raw = str(tmp_path_factory.mktemp('syn') / 'raw')
  synthetic.generate(raw, seed=1, splits={'train': 12, 'dev': 3, 'test': 4}, region_dim=8,
                     progress=False)
  # Non-square images of other modes exercise the resize / crop / RGB steps.
  Image.fromarray(np.arange(70 * 40, dtype=np.uint8).reshape(70, 40) % 251, 'L').save(
      os.path.join(raw, 'images', '000001.jpg'))
  return raw


def config_for(raw, tmp_path, checkpoint, **data):
  c = common.base_config()
  c.data.name = 'precomp'
  c.data.manual_dir = raw
  c.data.data_dir = str(tmp_path / 'tfds')
  c.data.region_dim = 8
  c.data.max_len = 32
  c.data.clip_batch_size = 8
  c.model.use_clip = True
  c.model.clip_checkpoint = checkpoint
  for key, value in data.items():
    c.data[key] = value
  return c


def torch_features(model, raw, split_source, images, captions):
  transform = open_clip.image_transform(64, is_train=False)
  with torch.no_grad():
    pixels = torch.stack([transform(Image.open(os.path.join(
        raw, split_source.image(i)['image_path'].decode()))) for i in images])
    text = open_clip.tokenize([split_source.captions[c] for c in captions])
    return model.encode_image(pixels).numpy(), model.encode_text(text).numpy()


def test_cache_matches_open_clip_and_feeds_the_batches(clip_files, world, tmp_path):
  model, checkpoint = clip_files
  config = config_for(world, tmp_path, checkpoint)
  workdir = str(tmp_path / 'w')
  folder = clip_cache.build(config, workdir)
  builder = datasets.build(config, workdir)
  train = datasets.open_split(builder, 'train')
  cached = train.clip
  assert cached.image.shape == (12, 32) and cached.text.shape == (60, 32)
  meta = json.load(open(os.path.join(folder, 'train', 'clip_cache.json'), encoding='utf-8'))
  assert meta['clip']['path'] == os.path.abspath(checkpoint) and meta['num_captions'] == 60

  images, captions = [0, 1, 7], [0, 6, 33, 59]
  want_image, want_text = torch_features(model, world, train, images, captions)
  np.testing.assert_allclose(cached.images(np.asarray(images)), want_image, atol=1e-4, rtol=0)
  np.testing.assert_allclose(cached.texts(np.asarray(captions)), want_text, atol=1e-4, rtol=0)

  text = loader.TextOptions(max_len=32)
  for batch in loader.train_iterator(train, batch_size=8, num_steps=3, seed=0, text=text,
                                     num_threads=1):
    np.testing.assert_array_equal(batch['clip_image'], cached.image[batch['image_index']])
    np.testing.assert_array_equal(batch['clip_text'], cached.text[batch['caption_index']])
    assert batch['clip_image'].dtype == np.float32
  test = datasets.open_split(builder, 'test')
  image_batch = next(loader.eval_image_batches(test, 8))
  np.testing.assert_array_equal(image_batch['clip_image'][:4], test.clip.image[:4])
  caption_batch = next(loader.eval_caption_batches(test, 8, text))
  np.testing.assert_array_equal(caption_batch['clip_text'], test.clip.text[:8])

  online = datasets.open_split(builder, 'train', config_for(world, tmp_path, checkpoint,
                                                            clip_online=True), workdir)
  np.testing.assert_allclose(online.clip.images(np.asarray(images)), want_image, atol=1e-4)
  np.testing.assert_allclose(online.clip.texts(np.asarray(captions)), want_text, atol=1e-4)


def test_missing_cache_names_the_command(clip_files, world, tmp_path):
  config = config_for(world, tmp_path, clip_files[1])
  builder = datasets.build(config, str(tmp_path / 'w'))
  with pytest.raises(scan_files.DataError, match='--mode clip_cache'):
    datasets.open_split(builder, 'train')


def test_corrupt_image_stops_the_cache_and_leaves_no_split(clip_files, world, tmp_path):
  raw = str(tmp_path / 'raw')
  synthetic.generate(raw, seed=2, splits={'train': 5, 'test': 3}, region_dim=8, progress=False)
  with open(os.path.join(raw, 'images', '000006.jpg'), 'wb') as f:
    f.write(b'\xff\xd8\xff\xe0 not really a jpeg')
  config = config_for(raw, tmp_path, clip_files[1])
  with pytest.raises(scan_files.DataError, match=r'000006.jpg: cannot decode the image'):
    clip_cache.build(config, str(tmp_path / 'w'))
  cache_root = os.path.join(str(tmp_path / 'tfds'), 'clip_cache')
  splits = sorted(os.listdir(os.path.join(cache_root, 'small_clip', 'butd_d8')))
  assert splits == ['train']   # train completed; test (the broken image) left nothing


def test_demo_clip_is_deterministic_and_loads(tmp_path):
  a = clip_cache.ensure_demo_clip(str(tmp_path / 'a.safetensors'))
  b = clip_cache.ensure_demo_clip(str(tmp_path / 'b.safetensors'))
  from safetensors.numpy import load_file
  from input_pipeline import clip_encoder
  params_a, params_b = load_file(a), load_file(b)
  assert sorted(params_a) == sorted(params_b)
  for name, value in params_a.items():
    np.testing.assert_array_equal(value, params_b[name])
  encoder = clip_encoder.ClipEncoder(a, batch_size=4)
  assert encoder.dim == 512 and encoder.image_size == 64
  assert encoder.text_features(['a red circle .']).shape == (1, 512)
