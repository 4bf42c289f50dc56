"""High-order instance relation module of AAHR (training only; docs/method.md 2.13, 2.14).

Pieces, in the order the criterion uses them:
  * `fine_grained_relevance`: SCAN-style word-region relevance over detached regions/words, with
    the padding semantics of the released code (positions < per-batch maximum), on statically
    padded arrays (the result does not depend on the static padding width).
  * `row_topk_connectivity`, `pairwise_distance`: connectivity and the exp(-distance) relevance.
  * `GCN`, `TransformerEncoder` (post-norm, hand-written attention with an additive float mask).
  * `InstanceRelationModule`: everything above wired as in `GraphLoss.forward`.
  * `relation_triplet_losses`: the three extra triplet terms on the enhanced embeddings.
  * `relation_params_from_torch` / `relation_params_to_torch`: one-to-one key mapping to the
    PyTorch criterion state_dict (`gnn.layers.0.*`, `gcn_img.gc1.*`, ...).
"""

from collections.abc import Mapping
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aahr_jax import losses
from aahr_jax.models import layers

_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------
# Small numerical helpers
# ----------------------------------------------------------------------------------------------

def l2n(x: jax.Array, eps: float = 1e-8) -> jax.Array:
  """The encoder file's l2norm: x / (||x|| + eps) along the last axis."""
  return x / (jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)) + eps)


def pairwise_distance(a: jax.Array, b: jax.Array, *, zero_diagonal: bool = False) -> jax.Array:
  """Euclidean distances [N, M] between rows of a [N, D] and b [M, D], safe at zero.

  Uses the matrix-product form torch.cdist uses for more than 25 rows. Where the squared
  distance is <= 0 the distance is 0 with zero gradient (double `where`; a naive sqrt has an
  infinite derivative there, quirk Q28). zero_diagonal=True (a is b) makes self-distances exactly
  0 instead of a rounding residual (torch's small-batch path is exact there).
  """
  squared = (jnp.sum(a * a, axis=-1)[:, None] + jnp.sum(b * b, axis=-1)[None, :]
             - 2.0 * jnp.matmul(a, b.T, precision=_HIGHEST))
  if zero_diagonal:
    squared = jnp.where(jnp.eye(a.shape[0], b.shape[0], dtype=bool), 0.0, squared)
  positive = squared > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def row_topk_connectivity(similarity: jax.Array, k: int) -> jax.Array:
  """[N, M] bool: entry >= the k-th largest entry of its row (ties included). No gradient."""
  similarity = jax.lax.stop_gradient(similarity)
  values, indices = jax.lax.top_k(similarity, k)
  # Under jit XLA may recompute `similarity` inside the comparison's fusion with different
  # rounding, so the k-th element could compare 1 ulp below itself; the top-k positions are
  # therefore marked from the indices, and `>=` only adds the ties.
  in_top_k = jnp.zeros(similarity.shape, bool).at[
      jnp.arange(similarity.shape[0])[:, None], indices].set(True)
  return in_top_k | ((similarity - values[:, -1:]) >= 0)


# ----------------------------------------------------------------------------------------------
# Fine-grained cross-modal relevance (docs/method.md 2.13, "aahr_scan_mean")
# ----------------------------------------------------------------------------------------------

def _caption_vs_all_images(words_hat: jax.Array, word_valid: jax.Array, word_selected: jax.Array,
                           length: jax.Array, regions_hat: jax.Array, region_in: jax.Array,
                           region_count: jax.Array,
                           matmul_dtype: Any = None) -> tuple[jax.Array, jax.Array]:
  """Relevance of one caption to every image.

  Args:
    words_hat: [L, D] normalised word slots. word_valid: [L] slot < length.
    word_selected: [L] slots entering the word-axis normalisation.
    length: scalar word count. regions_hat: [B, R, D]. region_in: [B, R] slots that take part.
    region_count: [B] number of taking-part region slots (the i2t mean divides by it).
    matmul_dtype: None = full fp32 scores; else the operands' dtype (fp32 accumulation).
  Returns:
    (t2i [B], i2t [B]) for this caption against every image.
  """
  if matmul_dtype is None:
    scores = jnp.einsum("wd,ird->iwr", words_hat, regions_hat, precision=_HIGHEST)
  else:
    scores = jnp.einsum("wd,ird->iwr", words_hat.astype(matmul_dtype),
                        regions_hat.astype(matmul_dtype), preferred_element_type=jnp.float32)
  scores = jax.nn.leaky_relu(scores, negative_slope=0.1)  # [B, L, R]
  region_in = region_in[:, None, :]
  squares = scores * scores

  # t2i: normalise each region column over the selected words, best region per word, mean over words
  word_norm = jnp.sqrt(jnp.sum(jnp.where(word_selected[None, :, None], squares, 0.0), axis=1,
                               keepdims=True))
  per_word = jnp.where(region_in, scores / jnp.maximum(word_norm, 1e-12), -jnp.inf).max(axis=2)
  t2i = jnp.sum(jnp.where(word_valid[None, :], per_word, 0.0), axis=1) / length

  # i2t: normalise each word row over the regions, best valid word per region, mean over regions
  region_norm = jnp.sqrt(jnp.sum(jnp.where(region_in, squares, 0.0), axis=2, keepdims=True))
  per_region = jnp.where(word_valid[None, :, None], scores / jnp.maximum(region_norm, 1e-12),
                         -jnp.inf).max(axis=1)
  i2t = jnp.sum(jnp.where(region_in[:, 0, :], per_region, 0.0), axis=1) / region_count
  return t2i, i2t


# Score elements per caption chunk for cache_sized_caption_chunk: 2^20 float32 values (4 MiB)
# stay in a CPU's cache through the masking, normalisation and max passes over them.
CHUNK_ELEMENTS = 2**20


def cache_sized_caption_chunk(batch: int, words: int, regions: int) -> int | None:
  """The power of two nearest to CHUNK_ELEMENTS / (batch x words x regions) captions per pass
  (None: the whole batch at once)."""
  nearest = 2 ** round(math.log2(max(CHUNK_ELEMENTS / (batch * words * regions), 1.0)))
  return None if nearest >= batch else nearest


def fine_grained_relevance(regions: jax.Array, words: jax.Array, word_lengths: jax.Array,
                           batch_max_regions: jax.Array, batch_max_len: jax.Array, *,
                           topk: int = 10, region_lengths: jax.Array | None = None,
                           mask_padding: bool = False, caption_chunk: int | None = None,
                           matmul_dtype: Any = None) -> tuple[jax.Array, jax.Array]:
  """Word-region relevance means T2I [B_cap, B_img] and I2T [B_img, B_cap] (no gradient).

  Args:
    regions: [B, R, D] region features after FC_MLP, statically padded to R >= the batch maximum.
    words: [B, L, D] token projections, statically padded to L >= the batch maximum.
    word_lengths: [B] token counts (incl. CLS/SEP).
    batch_max_regions: scalar, the region count the original's per-batch tensor would have; slots
      below it (padded ones included) take part, slots at or above it are ignored.
    batch_max_len: scalar, max(word_lengths) (the original's per-batch token width).
    topk: captions shorter than topk use their first min(topk, batch_max_len) slots in the
      word-axis normalisation (pad slots included; Q17, Q29 guard).
    region_lengths: [B] region counts; only read when mask_padding.
    mask_padding: corrected mode of Q17 (`fine_grained_mask_padding`): only valid regions and
      valid words take part anywhere.
    caption_chunk: evaluate this many captions at a time (bounds the [B, B, L, R] memory);
      None = all at once.
    matmul_dtype: None (default): word-region scores in full fp32, as the original. bfloat16
      (mixed-precision runs, whose regions and words are bf16 activations already): bf16
      operands with fp32 accumulation; on an H200 the fp32 einsum was 7% of the batch-256 step.
  """
  regions = jax.lax.stop_gradient(regions)
  words = jax.lax.stop_gradient(words)
  batch, num_slots = regions.shape[:2]
  word_slots = jnp.arange(words.shape[1])
  region_slots = jnp.arange(num_slots)
  word_valid = word_slots[None, :] < word_lengths[:, None]
  if mask_padding:
    word_selected = word_valid
    region_in = region_slots[None, :] < region_lengths[:, None]
    region_count = region_lengths
  else:
    selected_len = jnp.minimum(jnp.maximum(word_lengths, topk), batch_max_len)
    word_selected = word_slots[None, :] < selected_len[:, None]
    region_in = jnp.broadcast_to(region_slots[None, :] < batch_max_regions, (batch, num_slots))
    region_count = jnp.full((batch,), batch_max_regions)
  regions_hat = losses.normalize_rows(regions)
  words_hat = losses.normalize_rows(words)
  region_count = region_count.astype(regions.dtype)
  lengths = word_lengths.astype(regions.dtype)

  def one_caption(xs):
    caption_words, valid, selected, length = xs
    return _caption_vs_all_images(caption_words, valid, selected, length, regions_hat, region_in,
                                  region_count, matmul_dtype)

  xs = (words_hat, word_valid, word_selected, lengths)
  if caption_chunk is None:
    t2i, i2t_by_caption = jax.vmap(one_caption)(xs)
  else:
    t2i, i2t_by_caption = jax.lax.map(one_caption, xs, batch_size=caption_chunk)
  return t2i, i2t_by_caption.T


# ----------------------------------------------------------------------------------------------
# Layers: GCN and the post-norm Transformer encoder layer with an additive float mask
# ----------------------------------------------------------------------------------------------

# PyTorch's default Linear initialisation (shared with the encoders).
torch_linear_bias_init = layers.torch_bias_init
torch_linear_kernel_init = layers.torch_kernel_init


class GraphConvolution(nn.Module):
  """A (dropout(H) W) + b with a dense weighted adjacency; weight stored [in, out] like torch."""
  features: int
  dropout_rate: float = 0.6
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, adjacency: jax.Array, *, deterministic: bool) -> jax.Array:
    """x: [N, in], adjacency: [N, N] -> [N, features]."""
    weight = self.param("weight", nn.initializers.xavier_uniform(), (x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    x = layers.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    support = jnp.matmul(x, weight, precision=self.precision)
    return jnp.matmul(adjacency, support, precision=self.precision) + bias


class GCN(nn.Module):
  """Single-layer GCN: LeakyReLU_0.2(GraphConvolution(x, A)) (child named `gc1` as in torch)."""
  features: int
  dropout_rate: float = 0.6
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, adjacency: jax.Array, *, deterministic: bool) -> jax.Array:
    conv = GraphConvolution(self.features, self.dropout_rate, self.precision, name="gc1")
    return jax.nn.leaky_relu(conv(x, adjacency, deterministic=deterministic), negative_slope=0.2)


class MultiheadSelfAttention(nn.Module):
  """torch nn.MultiheadAttention self-attention with a fused in-projection.

  Params: in_proj (kernel [D, 3D] = in_proj_weight.T, bias [3D]), out_proj (kernel [D, D]).
  """
  num_heads: int
  dropout_rate: float = 0.1
  precision: Any = None
  dtype: Any = None  # matmul dtype (None: the inputs'); logits and softmax at least float32

  @nn.compact
  def __call__(self, x: jax.Array, additive_mask: jax.Array | None, *,
               deterministic: bool) -> jax.Array:
    """x: [..., S, D]; additive_mask: broadcastable to [..., S_q, S_k] (added to every head)."""
    d_model = x.shape[-1]
    head_dim = d_model // self.num_heads
    dtype = self.dtype if self.dtype is not None else x.dtype
    softmax_dtype = jnp.promote_types(dtype, jnp.float32)  # float64 inputs stay float64
    qkv = nn.Dense(3 * d_model, kernel_init=nn.initializers.xavier_uniform(),
                   bias_init=nn.initializers.zeros_init(), precision=self.precision,
                   dtype=dtype, name="in_proj")(x)
    split_heads = lambda t: t.reshape(*t.shape[:-1], self.num_heads, head_dim)
    query, key, value = (split_heads(t) for t in jnp.split(qkv, 3, axis=-1))
    logits = jnp.einsum("...qhd,...khd->...hqk", query / math.sqrt(head_dim), key,
                        precision=self.precision).astype(softmax_dtype)
    if additive_mask is not None:
      logits = logits + additive_mask[..., None, :, :].astype(softmax_dtype)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    probs = layers.Dropout(self.dropout_rate)(probs, deterministic=deterministic)
    out = jnp.einsum("...hqk,...khd->...qhd", probs, value, precision=self.precision)
    out = out.reshape(*out.shape[:-2], d_model)
    return nn.Dense(d_model, kernel_init=torch_linear_kernel_init,
                    bias_init=nn.initializers.zeros_init(), precision=self.precision,
                    dtype=dtype, name="out_proj")(out)


def key_padding_additive_mask(lengths: jax.Array, size: int, dtype=jnp.float32) -> jax.Array:
  """[B, 1, size] additive mask (0 for keys < length, -inf after) for TransformerEncoderLayer:
  torch's `src_key_padding_mask` as a float mask (query rows at padded positions still attend
  to the valid keys)."""
  valid = jnp.arange(size)[None, None, :] < lengths[:, None, None]
  return jnp.where(valid, 0.0, -jnp.inf).astype(dtype)


class TransformerEncoderLayer(nn.Module):
  """torch nn.TransformerEncoderLayer (post-norm, ReLU) with an additive float attention mask.

  Children named as the torch keys: self_attn, linear1, linear2, norm1, norm2.
  """
  num_heads: int = 16
  ff_dim: int | None = None  # None -> d_model (AAHR's dim_feedforward = embed size)
  dropout_rate: float = 0.1
  layer_norm_eps: float = 1e-5
  precision: Any = None
  dtype: Any = None  # None: compute in the inputs' dtype

  @nn.compact
  def __call__(self, x: jax.Array, additive_mask: jax.Array | None = None, *,
               deterministic: bool) -> jax.Array:
    d_model = x.shape[-1]
    ff_dim = self.ff_dim or d_model
    dropout = lambda t: layers.Dropout(self.dropout_rate)(t, deterministic=deterministic)
    layer_norm = lambda name: layers.LayerNorm(epsilon=self.layer_norm_eps,
                                               use_fast_variance=False, dtype=self.dtype,
                                               name=name)
    linear = lambda features, fan_in, name: nn.Dense(
        features, kernel_init=torch_linear_kernel_init, bias_init=torch_linear_bias_init(fan_in),
        precision=self.precision, dtype=self.dtype, name=name)

    attended = MultiheadSelfAttention(self.num_heads, self.dropout_rate, self.precision,
                                      self.dtype, name="self_attn")(x, additive_mask,
                                                        deterministic=deterministic)
    x = layer_norm("norm1")(x + dropout(attended))
    hidden = dropout(jax.nn.relu(linear(ff_dim, d_model, "linear1")(x)))
    x = layer_norm("norm2")(x + dropout(linear(d_model, ff_dim, "linear2")(hidden)))
    return x


class TransformerEncoder(nn.Module):
  """Stack of `num_layers` TransformerEncoderLayer, children `layers_0`, ... (torch `layers.i`)."""
  num_layers: int = 1
  num_heads: int = 16
  ff_dim: int | None = None
  dropout_rate: float = 0.1
  precision: Any = None
  dtype: Any = None

  def setup(self):
    self.layers = [TransformerEncoderLayer(self.num_heads, self.ff_dim, self.dropout_rate,
                                           precision=self.precision, dtype=self.dtype)
                   for _ in range(self.num_layers)]

  def __call__(self, x: jax.Array, additive_mask: jax.Array | None = None, *,
               deterministic: bool) -> jax.Array:
    for layer in self.layers:
      x = layer(x, additive_mask, deterministic=deterministic)
    return x


# ----------------------------------------------------------------------------------------------
# The instance relation module (GraphLoss's relation branch)
# ----------------------------------------------------------------------------------------------

class InstanceRelationModule(nn.Module):
  """Relation-enhanced embeddings from pre-fusion embeddings and detached regions/words.

  Children (param names = torch criterion keys): gnn/layers_{i}/..., gcn_img/gc1, gcn_text/gc1,
  gcn/gc1. Dropout (GCN inputs 0.6, Transformer 0.1) uses the 'dropout' rng when
  deterministic=False.
  """
  num_heads: int = 16
  num_layers: int = 1
  dropout_rate: float = 0.1
  gcn_dropout_rate: float = 0.6
  threshold: float = 0.5
  topk: int = 10
  mask_weight: float = 1.0  # 1.0 F30K, 1.5 COCO
  sigma: float = 1.0
  kl_temperature: float = 1.0
  fine_grained_mask_padding: bool = False  # Q17 corrected mode
  caption_chunk: int | None = None
  precision: Any = None
  relevance_matmul_dtype: Any = None  # see fine_grained_relevance; bf16 runs pass bfloat16

  @nn.compact
  def __call__(self, img_prefusion: jax.Array, cap_prefusion: jax.Array, regions: jax.Array,
               words: jax.Array, word_lengths: jax.Array, batch_max_regions: jax.Array,
               batch_max_len: jax.Array, region_lengths: jax.Array | None = None, *,
               deterministic: bool) -> dict[str, jax.Array]:
    """Run the relation branch.

    Args:
      img_prefusion, cap_prefusion: [B, D] v1 / t1 (with gradient).
      regions: [B, R, D] region features before the local Transformer (detached here).
      words: [B, L, D] token projections before the local Transformer (detached here).
      word_lengths: [B]; batch_max_regions, batch_max_len: scalars (see fine_grained_relevance).
      region_lengths: [B], only used with fine_grained_mask_padding.
    Returns:
      dict with img_l2, cap_l2 [B, D] (x, y), enh_img, enh_cap [B, D] (x^, y^), reg_loss (a
      constant), and the intermediates connect_*/relevance_* [B, B], global_sim, gcn_img_out,
      gcn_txt_out, gcn_joint_adj [2B, 2B], gcn_joint_out, attn_mask, transformer_in,
      transformer_out [2B, D].
    """
    batch, d_model = img_prefusion.shape
    x, y = l2n(img_prefusion), l2n(cap_prefusion)
    k = int(batch * self.threshold)

    connect_i2i = row_topk_connectivity(jnp.matmul(x, x.T, precision=_HIGHEST), k)
    connect_t2t = row_topk_connectivity(jnp.matmul(y, y.T, precision=_HIGHEST), k)
    relevance_i2i = jnp.exp(-pairwise_distance(x, x, zero_diagonal=True) / self.sigma)
    relevance_t2t = jnp.exp(-pairwise_distance(y, y, zero_diagonal=True) / self.sigma)
    relevance_t2i, relevance_i2t = fine_grained_relevance(
        regions, words, word_lengths, batch_max_regions, batch_max_len, topk=self.topk,
        region_lengths=region_lengths, mask_padding=self.fine_grained_mask_padding,
        caption_chunk=self.caption_chunk, matmul_dtype=self.relevance_matmul_dtype)
    connect_t2i = row_topk_connectivity(relevance_t2i, k)
    connect_i2t = row_topk_connectivity(relevance_i2t, k)

    global_sim = jax.lax.stop_gradient(jnp.exp(-pairwise_distance(x, y) / self.sigma))
    reg_loss = losses.relation_kl_regulariser(global_sim, relevance_i2t, relevance_t2i,
                                              temperature=self.kl_temperature)

    joint_adj = jnp.block([[relevance_i2i, relevance_i2t], [relevance_t2i, relevance_t2t]])
    joint_connect = jnp.block([[connect_i2i, connect_i2t], [connect_t2i, connect_t2t]])
    attn_mask = jnp.where(joint_connect, self.mask_weight * joint_adj, -jnp.inf)

    gcn = lambda name: GCN(d_model, self.gcn_dropout_rate, self.precision, name=name)
    gcn_img_out = gcn("gcn_img")(x, relevance_i2i, deterministic=deterministic)
    gcn_txt_out = gcn("gcn_text")(y, relevance_t2t, deterministic=deterministic)
    gcn_joint_out = gcn("gcn")(jnp.concatenate([gcn_img_out, gcn_txt_out]), joint_adj,
                               deterministic=deterministic)
    both = jnp.concatenate([x, y])
    transformer_in = losses.normalize_rows(gcn_joint_out) + both
    # all 2B embeddings form ONE sequence (torch: [2B, 1, D] sequence-first, batch 1)
    transformer_out = TransformerEncoder(self.num_layers, self.num_heads, None, self.dropout_rate,
                                         self.precision, name="gnn")(
                                             transformer_in, attn_mask,
                                             deterministic=deterministic)
    enhanced = losses.normalize_rows(transformer_out)
    return {
        "img_l2": x, "cap_l2": y,
        "enh_img": enhanced[:batch], "enh_cap": enhanced[batch:],
        "reg_loss": reg_loss, "global_sim": global_sim,
        "connect_i2i": connect_i2i, "connect_t2t": connect_t2t,
        "connect_i2t": connect_i2t, "connect_t2i": connect_t2i,
        "relevance_i2i": relevance_i2i, "relevance_t2t": relevance_t2t,
        "relevance_i2t": relevance_i2t, "relevance_t2i": relevance_t2i,
        "gcn_img_out": gcn_img_out, "gcn_txt_out": gcn_txt_out,
        "gcn_joint_adj": joint_adj, "gcn_joint_out": gcn_joint_out, "attn_mask": attn_mask,
        "transformer_in": transformer_in, "transformer_out": transformer_out,
    }


RELATION_TRIPLET_TERMS = ("gnn1", "gnn2", "gnn3")


def relation_triplet_losses(outputs: Mapping[str, jax.Array], ids: jax.Array, *, cutoff: float,
                            key: jax.Array | None = None,
                            negatives: Mapping[str, tuple[jax.Array, jax.Array]] | None = None,
                            **triplet_flags) -> dict[str, jax.Array]:
  """gnn1 = Trip(x, y^), gnn2 = Trip(x^, y), gnn3 = Trip(x^, y^) and their sum `gnn`.

  Args:
    outputs: the dict returned by InstanceRelationModule.
    ids: [B] image ids. cutoff: losses.triplet_cutoff(dataset).
    key: PRNG key (one sub-key per term), or negatives: {"gnn1": (i2t, t2i), ...} recorded draws.
    triplet_flags: max_over / on_empty_row (quirk Q9 flags) passed to losses.dws_triplet_loss.
  """
  pairs = {"gnn1": ("img_l2", "enh_cap"), "gnn2": ("enh_img", "cap_l2"),
           "gnn3": ("enh_img", "enh_cap")}
  keys = jax.random.split(key, 3) if key is not None else (None,) * 3
  terms = {}
  for term_key, name in zip(keys, RELATION_TRIPLET_TERMS):
    img_name, cap_name = pairs[name]
    terms[name] = losses.dws_triplet_loss(
        outputs[img_name], outputs[cap_name], ids, cutoff=cutoff, key=term_key,
        negatives=None if negatives is None else negatives[name], **triplet_flags)
  terms["gnn"] = terms["gnn1"] + terms["gnn2"] + terms["gnn3"]
  return terms


# ----------------------------------------------------------------------------------------------
# PyTorch criterion state_dict <-> Flax params (one torch key <-> one Flax leaf)
# ----------------------------------------------------------------------------------------------

# torch suffix of `gnn.layers.{i}.` -> (Flax path below gnn/layers_{i}, transpose?)
_TRANSFORMER_LEAVES = {
    "self_attn.in_proj_weight": (("self_attn", "in_proj", "kernel"), True),
    "self_attn.in_proj_bias": (("self_attn", "in_proj", "bias"), False),
    "self_attn.out_proj.weight": (("self_attn", "out_proj", "kernel"), True),
    "self_attn.out_proj.bias": (("self_attn", "out_proj", "bias"), False),
    "linear1.weight": (("linear1", "kernel"), True),
    "linear1.bias": (("linear1", "bias"), False),
    "linear2.weight": (("linear2", "kernel"), True),
    "linear2.bias": (("linear2", "bias"), False),
    "norm1.weight": (("norm1", "scale"), False),
    "norm1.bias": (("norm1", "bias"), False),
    "norm2.weight": (("norm2", "scale"), False),
    "norm2.bias": (("norm2", "bias"), False),
}
_GCN_NAMES = ("gcn_img", "gcn_text", "gcn")
# criterion entries that exist in torch but have no Flax counterpart in AAHR's faithful mode:
# the SwAV buffer is never read, and the relevance MLPs never receive a gradient (Q3).
IGNORED_TORCH_PREFIXES = ("swav_loss.queue", "adj_model.adj_learning.mlp_")
PROTOTYPES_KEY = "swav_loss.prototypes"


def transformer_key_map(torch_prefix: str, flax_path: tuple[str, ...],
                        num_layers: int = 1) -> dict[str, tuple[tuple[str, ...], bool]]:
  """torch nn.TransformerEncoder keys `{torch_prefix}.layers.{i}.*` -> (Flax path, transpose)
  for a `TransformerEncoder` at `flax_path` (e.g. "gnn", ("gnn",); or the encoders' "aggr")."""
  mapping = {}
  for layer in range(num_layers):
    for suffix, (path, transpose) in _TRANSFORMER_LEAVES.items():
      mapping[f"{torch_prefix}.layers.{layer}.{suffix}"] = (
          flax_path + (f"layers_{layer}",) + path, transpose)
  return mapping


def relation_key_map(num_layers: int = 1) -> dict[str, tuple[tuple[str, ...], bool]]:
  """torch criterion key -> (Flax param path, transpose) for the relation module."""
  mapping = transformer_key_map("gnn", ("gnn",), num_layers)
  for name in _GCN_NAMES:
    for leaf in ("weight", "bias"):  # GCN weights are already [in, out]: no transpose
      mapping[f"{name}.gc1.{leaf}"] = ((name, "gc1", leaf), False)
  return mapping


def _strip_module_prefix(key: str) -> str:
  return key[len("module."):] if key.startswith("module.") else key


def relation_params_from_torch(state_dict: Mapping[str, Any], num_layers: int = 1,
                               expected: Mapping[str, Any] | None = None,
                               dtype=None) -> tuple[dict, np.ndarray | None]:
  """Criterion state_dict -> (Flax relation params, SwAV prototypes or None).

  Args:
    state_dict: torch key -> array (numpy or torch tensors; an optional `module.` prefix is
      stripped).
    expected: optional Flax params (e.g. from `init`) whose shapes the result must match.
    dtype: optional dtype to cast to (default: keep).
  Raises:
    ValueError naming every missing, unexpected or mis-shaped key.
  """
  mapping = relation_key_map(num_layers)
  arrays = {_strip_module_prefix(k): np.asarray(v) for k, v in state_dict.items()}
  missing = sorted(set(mapping) - set(arrays))
  unexpected = sorted(k for k in arrays if k not in mapping and k != PROTOTYPES_KEY
                      and not k.startswith(IGNORED_TORCH_PREFIXES))
  if missing or unexpected:
    raise ValueError(f"relation module state_dict mismatch: missing keys {missing}, "
                     f"unexpected keys {unexpected}")
  params: dict = {}
  bad_shapes = []
  for torch_key, (path, transpose) in mapping.items():
    value = arrays[torch_key].T if transpose else arrays[torch_key]
    if dtype is not None:
      value = value.astype(dtype)
    if expected is not None:
      want = np.shape(_get_path(expected, path))
      if value.shape != want:
        bad_shapes.append(f"{torch_key}: got {value.shape}, expected {want} at {'/'.join(path)}")
    _set_path(params, path, value)
  if bad_shapes:
    raise ValueError("relation module shape mismatch: " + "; ".join(bad_shapes))
  return params, arrays.get(PROTOTYPES_KEY)


def relation_params_to_torch(params: Mapping[str, Any], num_layers: int = 1) -> dict[str, np.ndarray]:
  """Flax relation params -> torch criterion keys (inverse of relation_params_from_torch)."""
  result = {}
  for torch_key, (path, transpose) in relation_key_map(num_layers).items():
    value = np.asarray(_get_path(params, path))
    result[torch_key] = value.T if transpose else value
  return result


def _get_path(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
  for name in path:
    tree = tree[name]
  return tree


def _set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value
