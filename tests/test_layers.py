"""LayerNorm and exact GELU with hand-written backward passes (aahr_jax/models/layers.py):
the same values and gradients as flax's nn.LayerNorm and autodiff of jax.nn.gelu, and fewer
bytes kept for the backward pass of a training BERT layer. Dropout with 16-bit keep draws:
the keep rate, unbiased scaling, independence of neighbouring draws, and its edge cases."""

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aahr_jax.models import bert
from aahr_jax.models import layers
from benchmarks import bert_layer


def _inputs(dtype, shape=(3, 5, 16)):
  rng = np.random.default_rng(0)
  x = rng.normal(size=shape) * 3 + 1
  x[0, 0] = 2.5       # a constant row: zero variance (the clipped branch of the fast variance)
  x[1, 2] = 1e4 + rng.normal(size=shape[-1]) * 1e-2   # large mean, tiny spread
  scale = rng.normal(size=shape[-1]) + 1
  bias = rng.normal(size=shape[-1])
  cotangent = rng.normal(size=shape)
  return (jnp.asarray(x, dtype), {'params': {'scale': jnp.asarray(scale, jnp.float32),
                                             'bias': jnp.asarray(bias, jnp.float32)}},
          jnp.asarray(cotangent, jnp.float32))


def _value_and_grads(module, x, params, cotangent):
  def loss(params, x):
    y = module.apply(params, x)
    return jnp.sum(y.astype(jnp.float32) * cotangent), y
  (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
  return y, grads


@pytest.mark.parametrize('fast_variance', [True, False])
@pytest.mark.parametrize('in_dtype, out_dtype, rtol', [
    ('float32', None, 1e-5), ('bfloat16', 'bfloat16', 2e-2), ('bfloat16', None, 2e-2)])
def test_layer_norm_matches_flax(fast_variance, in_dtype, out_dtype, rtol):
  x, params, cotangent = _inputs(jnp.dtype(in_dtype))
  kwargs = dict(epsilon=1e-12, dtype=out_dtype and jnp.dtype(out_dtype),
                use_fast_variance=fast_variance)
  y_ref, (dp_ref, dx_ref) = _value_and_grads(nn.LayerNorm(**kwargs), x, params, cotangent)
  y, (dp, dx) = _value_and_grads(layers.LayerNorm(**kwargs), x, params, cotangent)
  assert y.dtype == y_ref.dtype and dx.dtype == x.dtype
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
  # Gradients: the same maths in another order; bf16 inputs get bf16 input gradients.
  scale_of = lambda g: np.abs(np.asarray(g, np.float32)).max()
  for mine, ref in [(dx, dx_ref), (dp['params']['scale'], dp_ref['params']['scale']),
                    (dp['params']['bias'], dp_ref['params']['bias'])]:
    np.testing.assert_allclose(np.asarray(mine, np.float32), np.asarray(ref, np.float32),
                               rtol=rtol, atol=rtol * scale_of(ref))


def test_layer_norm_float64_and_zero_variance_row():
  with jax.enable_x64(True):
    x, params, cotangent = _inputs(jnp.float64)
    for fast in (True, False):
      kwargs = dict(epsilon=1e-5, use_fast_variance=fast)
      y_ref, (dp_ref, dx_ref) = _value_and_grads(nn.LayerNorm(**kwargs), x, params, cotangent)
      y, (dp, dx) = _value_and_grads(layers.LayerNorm(**kwargs), x, params, cotangent)
      assert y.dtype == jnp.float64
      np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-13, atol=1e-13)
      # 1e-7: the large-mean row's fast variance cancels about 8 of float64's 16 digits.
      np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_ref), rtol=1e-7, atol=1e-9)
      np.testing.assert_allclose(np.asarray(dp['params']['scale']),
                                 np.asarray(dp_ref['params']['scale']), rtol=1e-9, atol=1e-9)
      # The constant row (zero variance) normalises to the bias; its gradients are among those
      # compared with autodiff above.
      np.testing.assert_allclose(np.asarray(y[0, 0]), np.asarray(params['params']['bias']),
                                 atol=1e-12)


def test_layer_norm_keeps_parameter_names_and_init():
  x = jnp.ones((2, 7))
  ours = layers.LayerNorm().init(jax.random.key(0), x)
  theirs = nn.LayerNorm().init(jax.random.key(0), x)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), ours) == \
      jax.tree.map(lambda a: (a.shape, a.dtype), theirs)
  jax.tree.map(np.testing.assert_array_equal, ours, theirs)


@pytest.mark.parametrize('dtype, rtol', [('float32', 1e-6), ('bfloat16', 1e-2)])
def test_gelu_exact_matches_jax(dtype, rtol):
  x = jnp.asarray(np.linspace(-9, 9, 1001), jnp.dtype(dtype))
  np.testing.assert_array_equal(np.asarray(layers.gelu_exact(x), np.float32),
                                np.asarray(jax.nn.gelu(x, approximate=False), np.float32))
  grad = jax.grad(lambda t: layers.gelu_exact(t).astype(jnp.float32).sum())(x)
  # Reference: autodiff of jax's GELU in float32 (ours computes its derivative in float32).
  ref = jax.grad(lambda t: jax.nn.gelu(t, approximate=False).sum())(x.astype(jnp.float32))
  assert grad.dtype == x.dtype
  np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(ref), rtol=rtol,
                             atol=rtol)


def test_bert_layer_saves_fewer_bytes_for_backward_with_same_gradients():
  config = bert.BertConfig(hidden_size=64, intermediate_size=256, num_attention_heads=4)
  results = bert_layer.measure(config, batch_size=16, tokens=16, dtype=jnp.bfloat16, repeats=0)
  before, after = results['earlier form'][0], results['current'][0]
  assert after < 0.7 * before, results
  # Same layer, same dropout draws: the gradients agree to float32 round-off.
  grads = {}
  for name, context in (('before', lambda: bert_layer.earlier_forms(dropout=False)),
                        ('after', contextlib.nullcontext)):
    with context():
      loss, params, x = bert_layer.layer_loss_and_inputs(config, 4, 8, jnp.float32)
      grads[name] = jax.grad(loss, argnums=(0, 1))(params, x)
  flat_before = jax.tree_util.tree_flatten_with_path(grads['before'])[0]
  flat_after = jax.tree.leaves(grads['after'])
  for (path, b), a in zip(flat_before, flat_after):
    if 'key' in jax.tree_util.keystr(path) and 'bias' in jax.tree_util.keystr(path):
      continue  # analytically zero (softmax ignores a per-query constant): round-off only
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-5 * np.abs(np.asarray(b)).max())


def _dropout(rate, x, key, deterministic=False):
  return layers.Dropout(rate).apply({}, x, deterministic, rngs={'dropout': key})


def test_dropout_keep_rate_scaling_and_independent_neighbours():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 33, 97)), jnp.float32)
  y = _dropout(0.1, x, jax.random.key(1))
  kept = np.asarray(y != 0)
  exact_keep = 58982 / 65536
  n = kept.size
  # Keep rate within 5 standard deviations of the quantised keep probability.
  assert abs(kept.mean() - exact_keep) < 5 * np.sqrt(exact_keep * (1 - exact_keep) / n)
  np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(x)[kept] / exact_keep, rtol=1e-6)
  # Neighbours share a hash (four 16-bit draws each) or a row boundary: no correlation.
  flat = kept.reshape(-1).astype(np.float64)
  for lag in (1, 2, 3, 4, 97):
    corr = np.corrcoef(flat[:-lag], flat[lag:])[0, 1]
    assert abs(corr) < 5 / np.sqrt(n), (lag, corr)
  # Rows differ, the same key repeats, another key differs.
  assert not np.array_equal(kept[0], kept[1])
  np.testing.assert_array_equal(np.asarray(_dropout(0.1, x, jax.random.key(1))), np.asarray(y))
  assert not np.array_equal(np.asarray(_dropout(0.1, x, jax.random.key(2))), np.asarray(y))
  # The gradient is the scaled mask.
  grad = jax.grad(lambda t: _dropout(0.1, t, jax.random.key(1)).sum())(x)
  np.testing.assert_allclose(np.asarray(grad), kept / exact_keep, rtol=1e-6)


def test_keep_mask_draws_are_the_16_bit_words_of_threefry_hashes():
  key = jax.random.key(7)
  threshold = 40000  # keep probability 40000 / 65536
  mask, exact_keep = layers.keep_mask(key, (3, 6), threshold / 65536)
  assert exact_keep == threshold / 65536
  words = jax.random.key_data(key)
  expected = []
  for row in range(3):
    for block in range(2):  # ceil(6 / 4) hashes per row, counter = row * 2 + block
      high, low = jax.extend.random.threefry_2x32(words, jnp.asarray([0, row * 2 + block],
                                                                      jnp.uint32))
      high, low = int(high), int(low)
      expected += [high >> 16, high & 0xFFFF, low >> 16, low & 0xFFFF][:6 - 4 * block]
  np.testing.assert_array_equal(np.asarray(mask),
                                np.asarray(expected).reshape(3, 6) < threshold)
  # Raw uint32 keys take the same path.
  np.testing.assert_array_equal(
      np.asarray(layers.keep_mask(jax.random.PRNGKey(7), (3, 6), threshold / 65536)[0]),
      np.asarray(mask))


def test_dropout_bfloat16_scales_in_float32_and_edge_cases():
  x = jnp.full((8, 300), 1.7, jnp.bfloat16)
  y = _dropout(0.1, x, jax.random.key(0))
  assert y.dtype == jnp.bfloat16
  kept_values = np.unique(np.asarray(y, np.float32)[np.asarray(y != 0)])
  np.testing.assert_array_equal(kept_values,
                                np.asarray(jnp.asarray(1.7 * 65536 / 58982, jnp.bfloat16),
                                           np.float32)[None])
  key = jax.random.key(3)
  np.testing.assert_array_equal(np.asarray(_dropout(0.1, x, key, deterministic=True)),
                                np.asarray(x))
  np.testing.assert_array_equal(np.asarray(_dropout(0.0, x, key)), np.asarray(x))
  assert not np.asarray(_dropout(1.0, x, key)).any()
  with pytest.raises(ValueError, match='rate must be in'):
    _dropout(1.5, x, key)
  # A scalar, a last axis of one element, a raw uint32 key, and a non-threefry key.
  assert _dropout(0.5, jnp.float32(2.0), key).shape == ()
  assert _dropout(0.5, jnp.ones((5, 1)), jax.random.PRNGKey(0)).shape == (5, 1)
  rbg = jax.random.key(0, impl='rbg')
  mask, exact_keep = layers.keep_mask(rbg, (200, 100), 0.75)
  assert exact_keep == 0.75 and abs(float(mask.mean()) - 0.75) < 0.02
