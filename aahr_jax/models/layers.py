"""Small building blocks with PyTorch-compatible initialisation and semantics."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


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
