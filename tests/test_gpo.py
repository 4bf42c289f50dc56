"""GPO and MaxK pooling against direct numpy computations of the original definitions."""

import math

import jax
import numpy as np

from aahr_jax.models import pooling
from benchmarks import selection_ops


def numpy_gpo(features, lengths, p):
  """VSE-infinity GPO, computed sequence by sequence like the packed PyTorch original."""
  b, s, d = features.shape
  out = np.zeros((b, d))
  pe_full = np.zeros((s, 32))
  for pos in range(s):
    for j in range(16):
      angle = pos * math.exp(-2 * j * math.log(10000.0) / 32)
      pe_full[pos, 2 * j], pe_full[pos, 2 * j + 1] = math.sin(angle), math.cos(angle)

  def sigmoid(x):
    return 1 / (1 + np.exp(-x))

  def run(xs, suffix):
    w_ih, w_hh = p[f'weight_ih_l0{suffix}'], p[f'weight_hh_l0{suffix}']
    b_ih, b_hh = p[f'bias_ih_l0{suffix}'], p[f'bias_hh_l0{suffix}']
    h = np.zeros(32)
    outs = []
    for x in xs:
      gi, gh = w_ih @ x + b_ih, w_hh @ h + b_hh
      r = sigmoid(gi[:32] + gh[:32])
      z = sigmoid(gi[32:64] + gh[32:64])
      n = np.tanh(gi[64:] + r * gh[64:])
      h = (1 - z) * n + z * h
      outs.append(h)
    return np.array(outs)

  for item in range(b):
    n = int(lengths[item])
    pe = pe_full[:n]
    forward = run(pe, '')
    backward = run(pe[::-1], '_reverse')[::-1]
    hidden = (forward + backward) / 2
    scores = hidden @ p['linear_kernel'][:, 0] / 0.1
    weights = np.exp(scores - scores.max())
    weights /= weights.sum()
    ordered = -np.sort(-features[item, :n], axis=0)
    out[item] = weights @ ordered
  return out


def test_gpo_matches_numpy_and_ignores_padding():
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(4, 9, 6)).astype(np.float32)
  lengths = np.array([9, 3, 1, 6], np.int32)
  module = pooling.GPO()
  params = module.init(jax.random.PRNGKey(0), feats, lengths)['params']
  got = np.asarray(module.apply({'params': params}, feats, lengths))
  flat = {k: np.asarray(v, np.float64) for k, v in params['gru'].items()}
  flat['linear_kernel'] = np.asarray(params['linear']['kernel'], np.float64)
  want = numpy_gpo(feats.astype(np.float64), lengths, flat)
  np.testing.assert_allclose(got, want, atol=2e-6)
  # Garbage beyond each length and extra static width change nothing.
  noisy = feats.copy()
  for i, n in enumerate(lengths):
    noisy[i, n:] = 1e3
  wider = np.concatenate([noisy, rng.normal(size=(4, 5, 6)).astype(np.float32)], axis=1)
  np.testing.assert_allclose(np.asarray(module.apply({'params': params}, wider, lengths)), got,
                             atol=1e-6)


def test_gpo_parameter_layout_is_pytorch():
  params = pooling.GPO().init(jax.random.PRNGKey(0), np.zeros((1, 4, 8), np.float32),
                              np.array([4]))['params']
  assert params['gru']['weight_ih_l0'].shape == (96, 32)
  assert params['gru']['weight_hh_l0_reverse'].shape == (96, 32)
  assert params['linear']['kernel'].shape == (32, 1) and 'bias' not in params['linear']


def test_maxk_mean_of_two_largest_valid():
  feats = np.array([[[1., 5.], [3., 2.], [9., 9.]], [[4., -1.], [0., 0.], [7., 7.]]], np.float32)
  lengths = np.array([2, 1])
  got = np.asarray(pooling.maxk_pool(feats, lengths, k=2))
  np.testing.assert_allclose(got, [[2.0, 3.5], [4.0, -1.0]])


def test_maxk_matches_top_k_in_values_and_gradients_with_ties():
  rng = np.random.default_rng(3)
  # Values on a coarse grid: many ties, where the gradient must reach the lowest tied index
  # only (lax.top_k's order), not be split between tied positions as a max's would be.
  feats = rng.integers(-3, 4, size=(6, 7, 5)).astype(np.float32)
  lengths = np.array([7, 1, 2, 3, 5, 6])
  cotangent = rng.normal(size=(6, 5)).astype(np.float32)
  for k in (1, 2, 3):
    got, got_grad = jax.value_and_grad(
        lambda f: (pooling.maxk_pool(f, lengths, k) * cotangent).sum())(feats)
    want, want_grad = jax.value_and_grad(
        lambda f: (selection_ops.maxk_pool_top_k(f, lengths, k) * cotangent).sum())(feats)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(got_grad), np.asarray(want_grad))
    assert not np.asarray(got_grad)[lengths[:, None] <= np.arange(7)[None, :]].any()
  bf16 = jax.numpy.asarray(rng.normal(size=(3, 9, 4)), jax.numpy.bfloat16)
  bf16_lengths = np.array([9, 4, 1])
  np.testing.assert_array_equal(np.asarray(pooling.maxk_pool(bf16, bf16_lengths, 2)),
                                np.asarray(selection_ops.maxk_pool_top_k(bf16, bf16_lengths, 2)))


def _cosine_logits_normalised_first(keys, query):
  """The textbook form: unit-norm keys in float32, then the dot with the query."""
  k = pooling.unit_rows(keys.astype(np.float32))
  return jax.numpy.einsum('bshd,bhd->bhs', k, query, precision=jax.lax.Precision.HIGHEST)


def test_gglp_cosine_logits_match_normalising_first_in_values_and_gradients():
  rng = np.random.default_rng(4)
  keys = rng.normal(size=(3, 5, 2, 6)) * rng.uniform(0.1, 10, size=(3, 5, 2, 1))
  query = np.asarray(pooling.unit_rows(rng.normal(size=(3, 2, 6))))
  cotangent = rng.normal(size=(3, 2, 5))
  loss = lambda fn: lambda k, q: (fn(k, q) * cotangent).sum()
  with jax.enable_x64(True):  # float64 inputs; both forms compute in float32
    got, got_grads = jax.value_and_grad(loss(pooling.cosine_logits), (0, 1))(keys, query)
    want, want_grads = jax.value_and_grad(loss(_cosine_logits_normalised_first), (0, 1))(
        keys, query)
    assert pooling.cosine_logits(keys, query).dtype == np.float32  # always float32 logits
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for g, w in zip(got_grads, want_grads):
      assert g.dtype == w.dtype
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
  # bf16 keys (the step's): float32 logits, bf16 key gradients, the same as upcasting first.
  bf16 = jax.numpy.asarray(keys, jax.numpy.bfloat16)
  q32 = jax.numpy.asarray(query, jax.numpy.float32)
  np.testing.assert_allclose(np.asarray(pooling.cosine_logits(bf16, q32)),
                             np.asarray(_cosine_logits_normalised_first(bf16, q32)), atol=1e-5)
  d_keys = jax.grad(loss(pooling.cosine_logits))(bf16, q32)
  want_keys = jax.grad(loss(_cosine_logits_normalised_first))(bf16.astype(np.float32), q32)
  assert d_keys.dtype == jax.numpy.bfloat16
  np.testing.assert_allclose(np.asarray(d_keys, np.float32), np.asarray(want_keys),
                             rtol=1e-2, atol=1e-3)
  # A zero key (norm below eps) has a finite gradient: the query direction only.
  zero = keys.copy()
  zero[0, 0, 0] = 0.0
  grad = jax.grad(loss(pooling.cosine_logits))(zero.astype(np.float32), q32)
  assert np.isfinite(np.asarray(grad)).all()
