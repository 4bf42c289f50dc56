"""Pooling of a set of local features into one vector: GPO (VSE-infinity); MaxK, the
CLIP-global-guided attention pooling (GGLP) and the gated fusion (AAHR)."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from aahr_jax.models import layers

GPO_PAD_FILL = -10000.0  # the fill value the original uses for pads in scores and sorting
GPO_TEMPERATURE = 0.1


def sinusoid_positions(length: int, dim: int) -> jax.Array:
  """[length, dim] interleaved sin/cos table of the GPO positional encoding."""
  position = jnp.arange(length, dtype=jnp.float32)[:, None]
  div = jnp.exp(jnp.arange(0, dim, 2, dtype=jnp.float32) * -(math.log(10000.0) / dim))
  table = jnp.zeros((length, dim), jnp.float32)
  table = table.at[:, 0::2].set(jnp.sin(position * div))
  return table.at[:, 1::2].set(jnp.cos(position * div))


def _gru_direction(x, w_ih, w_hh, b_ih, b_hh):
  """One GRU direction from a zero state, PyTorch gate order (r, z, n). x [B, S, in]."""
  hidden = w_hh.shape[1]
  gates_x = jnp.einsum('bsi,gi->bsg', x, w_ih) + b_ih

  def step(h, gx):
    gh = h @ w_hh.T + b_hh
    r = jax.nn.sigmoid(gx[:, :hidden] + gh[:, :hidden])
    z = jax.nn.sigmoid(gx[:, hidden:2 * hidden] + gh[:, hidden:2 * hidden])
    n = jnp.tanh(gx[:, 2 * hidden:] + r * gh[:, 2 * hidden:])
    h = (1.0 - z) * n + z * h
    return h, h

  h0 = jnp.zeros((x.shape[0], hidden), x.dtype)
  _, outputs = jax.lax.scan(step, h0, jnp.swapaxes(gates_x, 0, 1))
  return jnp.swapaxes(outputs, 0, 1)


class BiGRU(nn.Module):
  """Bidirectional one-layer GRU over variable lengths, PyTorch parameter names and init.

  Equivalent to a packed PyTorch GRU: the backward direction starts at each sequence's last
  valid step. Outputs at positions >= length are garbage; the caller masks them.
  """
  hidden: int

  @nn.compact
  def __call__(self, x, lengths):
    init = layers.torch_bias_init(self.hidden)  # PyTorch: every GRU tensor U(+-1/sqrt(hidden))
    params = {}
    for suffix in ('', '_reverse'):
      params[suffix] = (
          self.param(f'weight_ih_l0{suffix}', init, (3 * self.hidden, x.shape[-1])),
          self.param(f'weight_hh_l0{suffix}', init, (3 * self.hidden, self.hidden)),
          self.param(f'bias_ih_l0{suffix}', init, (3 * self.hidden,)),
          self.param(f'bias_hh_l0{suffix}', init, (3 * self.hidden,)))
    forward = _gru_direction(x, *params[''])
    backward = _reverse_within_length(
        _gru_direction(_reverse_within_length(x, lengths), *params['_reverse']), lengths)
    return forward, backward


def _reverse_within_length(x, lengths):
  """Reverses each sequence's first `length` steps in place (the rest stays put)."""
  size = x.shape[1]
  pos = jnp.arange(size)[None, :]
  index = jnp.where(pos < lengths[:, None], lengths[:, None] - 1 - pos, pos)
  return jnp.take_along_axis(x, index[:, :, None], axis=1)


class GPO(nn.Module):
  """Generalized Pooling Operator (docs/method.md 2.12), fully masked by `lengths`.

  Weights come from a bidirectional GRU over positional encodings (they depend only on the
  length), the features are sorted per dimension, and the pooled vector is their weighted sum.
  Positions >= length never influence the result, so static padding is harmless.
  """
  d_pe: int = 32
  d_hidden: int = 32

  @nn.compact
  def __call__(self, features, lengths):  # features [B, S, D], lengths [B]
    b, s, _ = features.shape
    valid = layers.position_mask(lengths, s)
    pe = jnp.where(valid[:, :, None], sinusoid_positions(s, self.d_pe)[None], 0.0)
    forward, backward = BiGRU(self.d_hidden, name='gru')(pe, lengths)
    hidden = jnp.where(valid[:, :, None], (forward + backward) / 2.0, 0.0)
    scores = layers.TorchDense(1, use_bias=False, name='linear')(hidden)[..., 0]
    scores = jnp.where(valid, scores, GPO_PAD_FILL)
    weights = jax.nn.softmax(scores / GPO_TEMPERATURE, axis=1)
    filled = jnp.where(valid[:, :, None], features, GPO_PAD_FILL)
    ordered = -jnp.sort(-filled, axis=1)  # descending per feature
    ordered = jnp.where(valid[:, :, None], ordered, 0.0)
    return jnp.einsum('bs,bsd->bd', weights.astype(ordered.dtype), ordered)


def maxk_pool(features, lengths, k: int = 2):
  """Mean of the k largest values per feature over the first `length` positions (AAHR MaxK).

  k is min(k, length) per item (docs/method.md 2.5). Selected by k rounds of argmax (first index
  among equal values, as lax.top_k orders ties) and a masked sum: reductions that fuse with their
  neighbours and whose gradient reaches exactly the selected positions. A top_k over the position
  axis lowers to a full sort of a [B, D, S] array on GPUs (1 ms of a 43 ms COCO step).
  """
  s = features.shape[1]
  positions = jnp.arange(s)[None, :, None]
  remaining = jnp.broadcast_to(layers.position_mask(lengths, s)[:, :, None], features.shape)
  k_eff = jnp.minimum(lengths, k)
  total = jnp.zeros((features.shape[0], features.shape[2]), features.dtype)
  for rank in range(k):
    pick = jnp.argmax(jnp.where(remaining, features, -jnp.inf), axis=1, keepdims=True)
    chosen = positions == pick  # [B, S, D], one position per feature
    value = jnp.where(chosen, features, 0).sum(axis=1)
    total = total + jnp.where((rank < k_eff)[:, None], value, 0)
    remaining = remaining & ~chosen
  return total / k_eff[:, None].astype(features.dtype)


class StackedDense(nn.Module):
  """`heads` independent torch-style Linear(in -> features) layers stored as one tensor.

  Params: kernel [heads, in, features] (head h = torch weight h transposed), bias [heads, features];
  torch default init per layer (bounds 1/sqrt(in)). `x` [..., in] gives [..., heads, features];
  with per_head=True, `x` [..., heads, in] feeds head h its own row h.
  """
  heads: int
  features: int
  dtype: jnp.dtype = jnp.float32  # matmul dtype; parameters are float32

  @nn.compact
  def __call__(self, x, per_head: bool = False):
    fan_in = x.shape[-1]
    kernel = self.param('kernel', nn.initializers.variance_scaling(
        1.0 / 3.0, 'fan_in', 'uniform', batch_axis=(0,)), (self.heads, fan_in, self.features))
    bias = self.param('bias', layers.torch_bias_init(fan_in), (self.heads, self.features))
    x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
    if per_head:
      return jnp.einsum('...hi,hio->...ho', x, kernel) + bias
    return jnp.einsum('...i,hio->...ho', x, kernel) + bias


def unit_rows(x, eps: float = 1e-12):
  """torch F.normalize: x / max(||x||, eps) along the last axis."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def cosine_logits(keys, query, eps: float = 1e-12):
  """<unit_rows(keys[b, s, h]), query[b, h]> as [B, H, S] float32, keys [B, S, H, D] in any
  float dtype. The same values as normalising the keys first, without materialising them:
  the dot and the norm are two reductions of the keys, and the backward pass keeps only the
  keys as given (bf16 in bf16 runs) and per-position scalars, recomputing the rest (autodiff
  of the normalised form keeps three float32 copies of [B, S, H, D], about 1.2 GB at COCO's
  batch 256)."""
  return _cosine_logits_fwd(keys, query, eps)[0]


def _cosine_logits_fwd(keys, query, eps):
  k = keys.astype(jnp.float32)
  dots = jnp.sum(k * query[:, None], axis=-1)                    # [B, S, H]
  norms = jnp.sqrt(jnp.sum(jnp.square(k), axis=-1))
  logits = dots / jnp.maximum(norms, eps)
  return jnp.swapaxes(logits, 1, 2), (keys, query, dots, norms)


def _cosine_logits_bwd(eps, residuals, cotangent):
  keys, query, dots, norms = residuals
  k = keys.astype(jnp.float32)
  g = jnp.swapaxes(cotangent, 1, 2)                              # [B, S, H]
  denom = jnp.maximum(norms, eps)
  # Through the norm only where it exceeds eps (autodiff of jnp.maximum: 1/2 at a tie).
  through = jnp.where(norms > eps, 1.0, jnp.where(norms == eps, 0.5, 0.0))
  along_query = g / denom
  along_keys = -along_query * dots / denom * through / jnp.where(norms > 0, norms, 1.0)
  d_keys = along_query[..., None] * query[:, None] + along_keys[..., None] * k
  d_query = jnp.sum(along_query[..., None] * k, axis=1)           # a fused reduction, exact
  return d_keys.astype(keys.dtype), d_query.astype(query.dtype)


cosine_logits.defvjp(_cosine_logits_fwd, _cosine_logits_bwd)


class GlobalGuidedAttentionPool(nn.Module):
  """GGLP (`mha_pool`, docs/method.md 2.8): a global query pools local features, 8 full-size heads.

  Per head h: q = nrm(Wq_h g), k_s = nrm(Wk_h f_s), w = softmax_s(scale * <k_s, q>) over the
  positions s < `limit` (per row), o_h = sum_s w_s (Wv_h f_s + b_h); the result is the mean over
  heads. The original has no padding mask (Q1): the caller passes limit = the per-batch maximum
  length for every row (faithful) or each row's own length (`gglp_mask_padding`).
  """
  heads: int = 8
  logit_scale: float = 1.0  # Q2: the original's cosine logits have no temperature
  dtype: jnp.dtype = jnp.float32  # the projections' matmuls; norms, logits, softmax: float32

  @nn.compact
  def __call__(self, query, features, limit):  # query [B, D], features [B, S, D], limit [B]
    d = features.shape[-1]
    f32 = jnp.float32
    q = unit_rows(StackedDense(self.heads, d, name='query')(query).astype(f32))   # [B, H, D]
    k = StackedDense(self.heads, d, self.dtype, name='key')(features)            # [B, S, H, D]
    logits = cosine_logits(k, q) * self.logit_scale
    inside = layers.position_mask(jnp.maximum(limit, 1), features.shape[1])[:, None, :]
    weights = jax.nn.softmax(jnp.where(inside, logits, -jnp.inf), axis=-1)
    # sum_s w_s (W f_s + b) = W (sum_s w_s f_s) + b since the weights sum to one: the value map
    # runs on one pooled vector per head instead of on every position.
    pooled = jnp.einsum('bhs,bsd->bhd', weights.astype(self.dtype), features.astype(self.dtype))
    return StackedDense(self.heads, d, self.dtype, name='value')(
        pooled, per_head=True).astype(f32).mean(axis=1)


class GatedFusion(nn.Module):
  """AAHR `gated_fusion` (docs/method.md 2.10): z = sigmoid(fc_gate([a; b])), z*a + (1-z)*b."""

  @nn.compact
  def __call__(self, local, global_):
    gate = layers.TorchDense(local.shape[-1], name='fc_gate')(
        jnp.concatenate([local, global_], axis=-1))
    z = jax.nn.sigmoid(gate)
    return z * local + (1.0 - z) * global_
