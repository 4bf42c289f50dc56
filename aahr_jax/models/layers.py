"""Small building blocks with PyTorch-compatible initialisation and semantics."""

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import random as jex_random


def torch_bias_init(fan_in: int):
  """PyTorch nn.Linear default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


# PyTorch nn.Linear default weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


class TorchDense(nn.Module):
  """A dense layer initialised like torch.nn.Linear (default) or Xavier-uniform with zero bias.

  Parameters are `kernel` [in, out] (the transposed torch weight) and `bias` [out].
  """
  features: int
  xavier: bool = False
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    if self.xavier:
      kernel_init, bias_init = nn.initializers.xavier_uniform(), nn.initializers.zeros
    else:
      kernel_init, bias_init = torch_kernel_init, torch_bias_init(fan_in)
    kernel = self.param('kernel', kernel_init, (fan_in, self.features))
    y = jnp.matmul(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      y = y + self.param('bias', bias_init, (self.features,)).astype(self.dtype)
    return y


class MaskedBatchNorm(nn.Module):
  """BatchNorm1d over the rows selected by `mask`, with PyTorch's running-statistics update.

  Training normalises with the biased variance of the selected rows and updates the running
  variance with the unbiased one (torch semantics); `momentum` is PyTorch's (0.1).
  """
  momentum: float = 0.1
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, mask, *, train: bool):
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,))
    bias = self.param('bias', nn.initializers.zeros, (features,))
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((features,), jnp.float32))
    x32 = x.astype(jnp.float32)
    if train:
      w = mask.astype(jnp.float32)[..., None]
      count = jnp.maximum(w.sum(), 1.0)
      mean = (x32 * w).sum(axis=0) / count
      var = (jnp.square(x32 - mean) * w).sum(axis=0) / count
      if not self.is_initializing():
        unbiased = var * count / jnp.maximum(count - 1.0, 1.0)
        ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
        ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(x.dtype)


def l2_normalize(x, eps: float = 1e-8):
  """x / (||x|| + eps): the `l2norm` of the VSE/AAHR encoders (not F.normalize)."""
  return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + eps)


def position_mask(lengths, size: int):
  """[B, size] bool: position < length."""
  return jnp.arange(size)[None, :] < lengths[:, None]


# ----------------------------------------------------------------------------------------------
# LayerNorm and exact GELU with hand-written backward passes. Autodiff of the textbook forms
# keeps several full-size intermediates for the backward pass (for a bf16 BERT-base layer at
# batch 256 x 32 tokens: three float32 [B, L, 768] arrays per LayerNorm and four bf16
# [B, L, 3072] arrays for the GELU); these keep only the input (and per-row statistics), which
# the backward pass needs anyway, and recompute the rest there. Forward values are the same
# operations as flax's nn.LayerNorm and jax.nn.gelu(approximate=False).
# ----------------------------------------------------------------------------------------------

def _row_stats(x32, use_fast_variance: bool):
  """(mean, variance before clipping) over the last axis, as flax's _compute_stats."""
  mean = x32.mean(-1)
  if use_fast_variance:
    raw_var = jnp.square(x32).mean(-1) - jnp.square(mean)
  else:
    raw_var = jnp.square(x32 - mean[..., None]).mean(-1)
  return mean, raw_var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def layer_norm(x, scale, bias, epsilon: float, use_fast_variance: bool, out_dtype):
  """LayerNorm over the last axis; statistics in (at least) float32, output in `out_dtype`."""
  return _layer_norm_fwd(x, scale, bias, epsilon, use_fast_variance, out_dtype)[0]


def _layer_norm_fwd(x, scale, bias, epsilon, use_fast_variance, out_dtype):
  x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean, raw_var = _row_stats(x32, use_fast_variance)
  rstd = jax.lax.rsqrt(jnp.maximum(0.0, raw_var) + epsilon)
  y = (x32 - mean[..., None]) * (rstd[..., None] * scale) + bias
  return y.astype(out_dtype), (x, scale, mean, raw_var, rstd)


def _layer_norm_bwd(epsilon, use_fast_variance, out_dtype, residuals, dy):
  del epsilon, out_dtype
  x, scale, mean, raw_var, rstd = residuals
  x32 = x.astype(mean.dtype)
  dy = dy.astype(mean.dtype)
  xhat = (x32 - mean[..., None]) * rstd[..., None]
  rows = tuple(range(x.ndim - 1))
  d_scale = jnp.sum(dy * xhat, axis=rows).astype(scale.dtype)
  d_bias = jnp.sum(dy, axis=rows).astype(scale.dtype)
  g = dy * scale
  # The variance path of the gradient, weighted as autodiff weights jnp.maximum(0, var):
  # 1 above zero, 1/2 at a tie, 0 where round-off made the fast variance negative.
  if use_fast_variance:
    var_weight = jnp.where(raw_var > 0, 1.0, jnp.where(raw_var == 0, 0.5, 0.0))
  else:
    var_weight = jnp.ones_like(raw_var)
  var_term = (g * xhat).mean(-1, keepdims=True) * var_weight[..., None].astype(g.dtype)
  dx = rstd[..., None] * (g - g.mean(-1, keepdims=True) - xhat * var_term)
  return dx.astype(x.dtype), d_scale, d_bias


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
  """nn.LayerNorm over the last axis (same parameters `scale`, `bias`, same forward values)
  with the lean backward pass of `layer_norm`. dtype None: the promoted input/parameter type."""
  epsilon: float = 1e-6
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_fast_variance: bool = True

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (features,), self.param_dtype)
    stats_dtype = jnp.promote_types(x.dtype, jnp.float32)
    out_dtype = self.dtype or jnp.result_type(x, scale, bias)
    return layer_norm(x, scale.astype(stats_dtype), bias.astype(stats_dtype), self.epsilon,
                      self.use_fast_variance, jnp.dtype(out_dtype))


@jax.custom_vjp
def gelu_exact(x):
  """x * Phi(x) (erf form, HF's "gelu"), the same values as jax.nn.gelu(x, approximate=False)."""
  return jax.nn.gelu(x, approximate=False)


def _gelu_exact_fwd(x):
  return gelu_exact(x), x


def _gelu_exact_bwd(x, dy):
  x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  cdf = 0.5 * jax.lax.erfc(-x32 * np.sqrt(0.5).astype(x32.dtype))
  pdf = jnp.exp(-0.5 * jnp.square(x32)) * np.asarray(1.0 / np.sqrt(2.0 * np.pi), x32.dtype)
  return ((dy.astype(x32.dtype) * (cdf + x32 * pdf)).astype(x.dtype),)


gelu_exact.defvjp(_gelu_exact_fwd, _gelu_exact_bwd)


# ----------------------------------------------------------------------------------------------
# Dropout with 16-bit keep draws. flax's nn.Dropout draws one float32 uniform per element, and
# JAX's (partitionable) threefry computes one full 2x32-bit hash per element for it: on the CPU
# dropout was 19% of the busy thread time of the demo's training step. Here each hash's 64
# output bits give four 16-bit uniforms, as cuRAND's Philox gives four words per call, so the
# masks cost a quarter of the hashing. The keep probability is quantised to 1/65,536 (rate 0.1
# keeps with probability 58,982 / 65,536 = 0.899994) and the kept values are divided by that
# quantised probability, so the output's expectation is exactly the input.
# ----------------------------------------------------------------------------------------------

_UNIFORM16 = 1 << 16


def _threefry_key_words(key) -> jax.Array | None:
  """The key's two uint32 words, or None when it is not a threefry key."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if 'threefry' not in str(jax.random.key_impl(key)):
      return None
    key = jax.random.key_data(key)
  return key if key.shape == (2,) and key.dtype == jnp.uint32 else None


def keep_mask(key, shape: tuple[int, ...], keep_prob: float) -> tuple[jax.Array, float]:
  """(bool mask of `shape`, the exact keep probability it was drawn with).

  Element [..., j] compares 16-bit word j % 4 (the first output word's high half first) of the
  threefry hash of counter (0, n) with the threshold, n the row-major index of [..., j // 4] in
  an array of shape shape[:-1] + (ceil(shape[-1] / 4),): values do not depend on how the
  array is sharded. Keys of another PRNG implementation, and masks needing 2^32 hashes or
  more, fall back to jax.random.bernoulli.
  """
  threshold = min(max(round(keep_prob * _UNIFORM16), 1), _UNIFORM16)
  exact_keep = threshold / _UNIFORM16
  words = _threefry_key_words(key)
  hash_shape = tuple(shape[:-1]) + (-(-shape[-1] // 4),) if shape else (1,)
  if words is None or math.prod(hash_shape) >= 1 << 32:
    return jax.random.bernoulli(key, exact_keep, shape), exact_keep
  # The flat counter as a sum of per-axis iotas: an elementwise expression, partitioned freely.
  counter = jnp.zeros(hash_shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(hash_shape))):
    counter = counter + jax.lax.broadcasted_iota(jnp.uint32, hash_shape, axis) * np.uint32(stride)
    stride *= hash_shape[axis]
  high, low = jex_random.threefry2x32_p.bind(
      words[0], words[1], jnp.zeros(hash_shape, jnp.uint32), counter)
  halves = jnp.stack([high >> 16, high & 0xFFFF, low >> 16, low & 0xFFFF], axis=-1)
  uniform16 = halves.reshape(hash_shape[:-1] + (4 * hash_shape[-1],))
  uniform16 = uniform16[..., :shape[-1]] if shape else uniform16[0]
  return uniform16 < np.uint32(threshold), exact_keep


class Dropout(nn.Module):
  """Inverted dropout (nn.Dropout's interface and 'dropout' RNG stream), 16-bit keep draws."""
  rate: float
  rng_collection: str = 'dropout'

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if not 0.0 <= self.rate <= 1.0:
      raise ValueError(f'Dropout rate must be in [0, 1], got {self.rate}.')
    if deterministic or self.rate == 0.0:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    mask, exact_keep = keep_mask(self.make_rng(self.rng_collection), x.shape, 1.0 - self.rate)
    return apply_keep_mask(x, mask, exact_keep)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def apply_keep_mask(x, mask, keep_prob: float):
  """where(mask, x / keep_prob, 0), scaled in at least float32 (1 / 0.899994 in bfloat16 is
  0.2% off, as flax's scaling is). The backward pass keeps only the boolean mask; autodiff of
  `where` would also keep a full-size array of zeros."""
  wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return jnp.where(mask, wide / keep_prob, 0.0).astype(x.dtype)


def _apply_keep_mask_fwd(x, mask, keep_prob):
  return apply_keep_mask(x, mask, keep_prob), mask


def _apply_keep_mask_bwd(keep_prob, mask, dy):
  return apply_keep_mask(dy, mask, keep_prob), None


apply_keep_mask.defvjp(_apply_keep_mask_fwd, _apply_keep_mask_bwd)
