"""Flax OpenCLIP vs open_clip's PyTorch CLIP: same image and text features."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

open_clip = pytest.importorskip('open_clip')

from aahr_jax.models import clip
from conversion import open_clip as convert_open_clip
from conversion import verify

SMALL = {'embed_dim': 24,
         'vision_cfg': {'image_size': 32, 'patch_size': 8, 'width': 64, 'layers': 2,
                        'head_width': 16},
         'text_cfg': {'context_length': 12, 'vocab_size': 99, 'width': 32, 'heads': 4,
                      'layers': 2}}


def variant(quick_gelu=False, vision=None, text=None):
  cfg = copy.deepcopy(SMALL)
  cfg['quick_gelu'] = quick_gelu
  cfg['vision_cfg'].update(vision or {})
  cfg['text_cfg'].update(text or {})
  return cfg


VARIANTS = {
    'gelu': variant(),
    'quick_gelu': variant(quick_gelu=True),
    'layer_scale_avg_pool': variant(vision={'ls_init_value': 0.5, 'pool_type': 'avg'},
                                    text={'ls_init_value': 0.5}),
    'ln_after_pool_no_ln_pre_rectangular_text_bias': variant(
        vision={'final_ln_after_pool': True, 'no_ln_pre': True, 'image_size': [32, 48]},
        text={'proj_bias': True}),
    'eos_pool': variant(text={'pool_type': 'eos', 'eos_id': 98}),
}


def torch_clip(cfg, seed=0):
  torch.manual_seed(seed)
  model = open_clip.model.CLIP(**cfg).eval()
  # Random init leaves LayerNorms at (1, 0) and biases at 0; perturb them so mix-ups show.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 and 'embedding' not in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def convert(model, cfg, name='test'):
  state = convert_open_clip.normalize_keys(
      {k: v.numpy() for k, v in model.state_dict().items()}, name)
  config = convert_open_clip.clip_config(cfg, name)
  flat = convert_open_clip.convert_state_dict(state, config)
  return clip.CLIP(config), traverse_util.unflatten_dict(flat, sep='/')


def features(module, params, model=None, dtype=jnp.float32):
  """(flax image, flax text[, torch image, torch text]) on fixed random inputs."""
  config = module.config
  images = np.random.default_rng(0).standard_normal((2, *config.vision.image_size, 3))
  images = images.astype(np.float32)
  ids = verify.clip_text_inputs(config.text)
  module = clip.CLIP(config, dtype=dtype)
  with jax.default_matmul_precision('float32'):
    out = (module.apply({'params': params}, images, method=module.encode_image),
           module.apply({'params': params}, ids, method=module.encode_text))
  if model is None:
    return out
  with torch.no_grad():
    return out + (model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy(),
                  model.encode_text(torch.from_numpy(ids)).numpy())


def max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.mark.parametrize('name', list(VARIANTS))
def test_small_configs_match_open_clip(name):
  cfg = VARIANTS[name]
  model = torch_clip(cfg)
  image, text, want_image, want_text = features(*convert(model, cfg), model)
  assert image.shape == want_image.shape and text.shape == want_text.shape
  assert max_diff(image, want_image) <= 1e-5
  assert max_diff(text, want_text) <= 1e-5


def test_wrong_activation_is_detected():
  cfg = VARIANTS['quick_gelu']
  model = torch_clip(cfg)
  module, params = convert(model, VARIANTS['gelu'])   # converted as if it were exact GELU
  image, text, want_image, want_text = features(module, params, model)
  assert max_diff(image, want_image) > 1e-4 and max_diff(text, want_text) > 1e-4


def test_parameter_names_follow_open_clip():
  module, params = convert(torch_clip(SMALL), SMALL)
  names = set(traverse_util.flatten_dict(params, sep='/'))
  for name in ('visual/conv1/kernel', 'visual/class_embedding', 'visual/positional_embedding',
               'visual/ln_pre/scale', 'visual/transformer/resblocks.1/attn/query/kernel',
               'visual/transformer/resblocks.0/mlp/c_fc/kernel', 'visual/ln_post/bias',
               'visual/proj/kernel', 'text/token_embedding/embedding',
               'text/transformer/resblocks.1/attn/out/kernel', 'text/ln_final/scale',
               'text/text_projection/kernel', 'logit_scale'):
    assert name in names, name


def test_bf16_compute_is_close_to_fp32():
  module, params = convert(torch_clip(SMALL), SMALL)
  fp32 = features(module, params)
  bf16 = features(module, params, dtype=jnp.bfloat16)
  for a, b in zip(bf16, fp32):
    assert a.dtype == jnp.bfloat16
    a, b = np.asarray(a, np.float32), np.asarray(b)
    cosine = np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cosine.min() >= 0.999, cosine


def test_shorter_token_rows_use_the_causal_prefix():
  # With a causal mask, features pooled at the EOT depend only on the tokens before it.
  module, params = convert(torch_clip(SMALL), SMALL)
  ids = verify.clip_text_inputs(module.config.text)[:1]   # EOT at position 1
  full = module.apply({'params': params}, ids, method=module.encode_text)
  short = module.apply({'params': params}, ids[:, :4], method=module.encode_text)
  np.testing.assert_allclose(short, full, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['ViT-B-32', 'ViT-B-32-quickgelu'])
def test_full_size_vit_b_32_matches_open_clip(name):
  cfg = open_clip.get_model_config(name)
  model = torch_clip(cfg)
  image, text, want_image, want_text = features(*convert(model, cfg, name), model)
  assert max_diff(image, want_image) <= 1e-4
  assert max_diff(text, want_text) <= 1e-4
