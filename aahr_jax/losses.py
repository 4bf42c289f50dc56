"""Every training loss, written on global arrays.

Each function takes image embeddings (rows of S) and caption embeddings (columns of S), so under
`jax.jit` with a sharded batch XLA inserts whatever collectives the loss needs: the hardest
negative of a row is the hardest over the whole global batch, not over one device's shard.
"""

import jax
import jax.numpy as jnp


def positive_mask(ids_img: jax.Array | None, ids_cap: jax.Array | None, n: int) -> jax.Array:
  """[n, n] bool: True where image row i and caption column j show the same image.

  Without ids only the diagonal is positive (the VSE-infinity convention).
  """
  if ids_img is None or ids_cap is None:
    return jnp.eye(n, dtype=bool)
  return ids_img[:, None] == ids_cap[None, :]


def vse_contrastive_loss(img: jax.Array, cap: jax.Array, *, margin: float = 0.2,
                         max_violation: bool | jax.Array = True,
                         ids: jax.Array | None = None,
                         sum_mode_divides_by_batch: bool = False) -> jax.Array:
  """VSE++ hinge loss (docs/method.md 2.18).

  Args:
    img: [B, D] image embeddings. cap: [B, D] caption embeddings; row b of each is a positive pair.
    margin: hinge margin alpha.
    max_violation: True -> hardest negative per anchor (sum over anchors, both directions);
      False -> sum over all negatives. May be a traced bool (the mean-violation warm-up epoch
      switches it at run time without a recompilation).
    ids: optional [B] image ids; every pair with equal ids is masked as a positive (AAHR/HREM
      `mask_repeat=1`). None masks only the diagonal (VSE-infinity).
    sum_mode_divides_by_batch: AAHR's variant divides the all-negatives sum by B; VSE-infinity's
      does not (quirk Q31).
  """
  scores = jnp.matmul(img, cap.T, precision=jax.lax.Precision.HIGHEST)
  b = scores.shape[0]
  diagonal = jnp.diagonal(scores)
  cost_caption = jax.nn.relu(margin + scores - diagonal[:, None])  # image anchor, caption negative
  cost_image = jax.nn.relu(margin + scores - diagonal[None, :])  # caption anchor, image negative
  mask = positive_mask(ids, ids, b)
  cost_caption = jnp.where(mask, 0.0, cost_caption)
  cost_image = jnp.where(mask, 0.0, cost_image)
  hardest = cost_caption.max(axis=1).sum() + cost_image.max(axis=0).sum()
  everything = cost_caption.sum() + cost_image.sum()
  if sum_mode_divides_by_batch:
    everything = everything / b
  return jnp.where(max_violation, hardest, everything)


# ----------------------------------------------------------------------------------------------
# HREM triplet loss with distance-weighted negative sampling (docs/method.md 2.17)
# ----------------------------------------------------------------------------------------------

TRIPLET_MARGIN = 0.2  # hard-coded in the original; `--margin` is not read by this loss
DWS_DIM = 512  # the `d` of the weight formula, hard-coded (not the embedding size)
DWS_DISTANCE_CLAMP = 0.5
_HIGHEST = jax.lax.Precision.HIGHEST


def triplet_cutoff(dataset: str) -> float:
  """Distance beyond which a negative gets zero sampling weight: 1.9 for COCO, 1.7 otherwise."""
  return 1.9 if dataset == "coco" else 1.7


def dws_sampling_weights(scores: jax.Array, positives: jax.Array, *, cutoff: float,
                         max_over: str = "all", dim: int = DWS_DIM,
                         distance_clamp: float = DWS_DISTANCE_CLAMP) -> jax.Array:
  """Distance-weighted sampling weights of one direction, anchors as rows.

  Args:
    scores: [A, C] similarities (treated as constants: the sampler is not differentiated).
    positives: [A, C] bool, True for positive pairs (never sampled).
    cutoff: negatives at distance >= cutoff get weight 0.
    max_over: "all" (faithful): the max subtracted before `exp` runs over the whole row of
      log-weights, positives' zeros and cut-off negatives included, so it can underflow every
      admissible weight (quirk Q9); "eligible" (corrected): over admissible negatives only.
    dim: the `d` of the weight formula (config.loss.triplet_dim).
    distance_clamp: distances below it count as it (config.loss.triplet_distance_clamp).

  Returns:
    [A, C] weights, each row divided by (row sum + 1e-20) exactly as the original (so a row whose
    admissible weights all underflowed is exactly zero).
  """
  scores = jax.lax.stop_gradient(scores)
  negatives = ~positives
  squared = 2.0 - 2.0 * scores
  # torch takes sqrt of a negative number (score > 1 by rounding) -> NaN; such an entry ends with
  # log-weight 0 and is never admissible. Emulate without producing NaNs.
  nan_distance = squared < 0
  dist = jnp.maximum(jnp.sqrt(jnp.maximum(squared, 0.0)), distance_clamp)
  log_weight = ((2.0 - dim) * jnp.log(dist)
                - ((dim - 3.0) / 2.0) * jnp.log(1.0 - 0.25 * dist * dist))
  bad = nan_distance | ~jnp.isfinite(log_weight)
  log_weight = jnp.where(bad | positives, 0.0, log_weight)
  eligible = negatives & (dist < cutoff) & ~nan_distance
  if max_over == "all":
    row_max = log_weight.max(axis=1, keepdims=True)
  elif max_over == "eligible":
    row_max = jnp.where(eligible, log_weight, -jnp.inf).max(axis=1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  else:
    raise ValueError(f"max_over must be 'all' or 'eligible', got {max_over!r}")
  weight = jnp.exp(log_weight - row_max) * eligible.astype(scores.dtype)
  return weight / (weight.sum(axis=1, keepdims=True) + 1e-20)


def draw_negatives(key: jax.Array, weights: jax.Array) -> jax.Array:
  """One independent categorical draw per (anchor, column) cell.

  The original draws one negative per positive pair, all from the anchor's row; in static shape we
  draw for every cell and let the loss weight each hinge by the positive mask.

  Inverse-CDF sampling: one uniform per cell, placed in its row's cumulative weights, costs
  A*C random numbers and A*C*C comparisons; Gumbel-max (`jax.random.categorical`) would cost
  A*C*C random numbers (8 x 16.8M threefry draws per COCO step at batch 256).

  Args:
    key: PRNG key. weights: [A, C] non-negative, rows need not be normalised.
  Returns:
    [A, C] int32, entry (a, j) = negative index drawn for pair (a, j); a row of zero weights
    draws its last column (the loss ignores such rows).
  """
  a, c = weights.shape
  cdf = jnp.cumsum(weights, axis=1)  # non-decreasing: a sum of non-negative terms
  targets = jax.random.uniform(key, (a, c), cdf.dtype) * cdf[:, -1:]
  # The first column whose cumulative weight exceeds the target: never a zero-weight column.
  drawn = jnp.sum(cdf[:, None, :] <= targets[:, :, None], axis=-1)
  # A target rounded up to the row total matches no column; take the last drawable one.
  last_drawable = c - 1 - jnp.argmax((weights > 0)[:, ::-1], axis=1)
  return jnp.minimum(drawn, last_drawable[:, None]).astype(jnp.int32)


def negatives_from_pairs(anchor: jax.Array, positive: jax.Array, drawn: jax.Array,
                         shape: tuple[int, int]) -> jax.Array:
  """[A, C] draw matrix from recorded per-pair draws (for parity tests with torch fixtures).

  anchor, positive, drawn: [P] ints, one entry per positive pair. Cells that are not positive
  pairs get 0 (they are ignored by the loss). Negative draws (-1 = "raised") are mapped to 0.
  """
  negatives = jnp.zeros(shape, jnp.int32)
  return negatives.at[anchor, positive].set(jnp.maximum(drawn, 0).astype(jnp.int32))


def triplet_direction(scores: jax.Array, positives: jax.Array, negatives: jax.Array,
                      weights: jax.Array, *, margin: float = TRIPLET_MARGIN,
                      on_empty_row: str = "zero_direction") -> jax.Array:
  """Sum over positive pairs (a, j) of relu(margin + S[a, n_aj] - S[a, j]).

  Args:
    scores: [A, C] similarities (differentiated). positives: [A, C] bool.
    negatives: [A, C] int, drawn negative column for each cell (only positive cells are used).
    weights: [A, C] sampling weights the draws came from (only their row sums are used here).
    on_empty_row: "zero_direction" (faithful, Q9): torch.multinomial raises if any row used by a
      positive pair sums to zero and the original returns a constant 0 for the whole direction;
      "skip_row" (corrected): only the anchors without admissible negatives contribute nothing.
  """
  row_used = positives.any(axis=1)
  empty_row = row_used & (weights.sum(axis=1) == 0)
  negative_scores = jnp.take_along_axis(scores, negatives, axis=1)
  hinge = jax.nn.relu(margin + negative_scores - scores)
  if on_empty_row == "zero_direction":
    keep = positives & ~empty_row.any()
  elif on_empty_row == "skip_row":
    keep = positives & ~empty_row[:, None]
  else:
    raise ValueError(f"on_empty_row must be 'zero_direction' or 'skip_row', got {on_empty_row!r}")
  return jnp.where(keep, hinge, 0.0).sum()


def dws_triplet_loss(img: jax.Array, cap: jax.Array, ids: jax.Array, *, cutoff: float,
                     key: jax.Array | None = None,
                     negatives: tuple[jax.Array, jax.Array] | None = None,
                     margin: float = TRIPLET_MARGIN, max_over: str = "all",
                     on_empty_row: str = "zero_direction", dim: int = DWS_DIM,
                     distance_clamp: float = DWS_DISTANCE_CLAMP) -> jax.Array:
  """HREM triplet loss with distance-weighted sampling: i2t direction + t2i direction (a sum).

  Args:
    img: [B, D] image embeddings (rows of S). cap: [B, D] caption embeddings (columns of S).
    ids: [B] image ids; positives = every pair with equal ids (diagonal included).
    cutoff: `triplet_cutoff(dataset)`.
    key: PRNG key for the draws (split into one key per direction). Exactly one of key/negatives.
    negatives: recorded draws instead of a key, as ([B, B] i2t, [B, B] t2i) matrices (see
      `negatives_from_pairs`); the t2i matrix has caption anchors as rows.
    max_over, on_empty_row: quirk Q9 flags (faithful defaults), see `dws_sampling_weights` and
      `triplet_direction`. dim, distance_clamp: see `dws_sampling_weights`.
  Returns:
    scalar loss in the dtype of the inputs.
  """
  if (key is None) == (negatives is None):
    raise ValueError("pass exactly one of key= or negatives=")
  scores = jnp.matmul(img, cap.T, precision=_HIGHEST)
  positives = positive_mask(ids, ids, scores.shape[0])
  total = jnp.zeros((), scores.dtype)
  directions = ((scores, positives), (scores.T, positives.T))
  keys = jax.random.split(key) if key is not None else (None, None)
  for index, (direction_scores, direction_positives) in enumerate(directions):
    weights = dws_sampling_weights(direction_scores, direction_positives, cutoff=cutoff,
                                   max_over=max_over, dim=dim, distance_clamp=distance_clamp)
    drawn = negatives[index] if negatives is not None else draw_negatives(keys[index], weights)
    total = total + triplet_direction(direction_scores, direction_positives, drawn, weights,
                                      margin=margin, on_empty_row=on_empty_row)
  return total


# ----------------------------------------------------------------------------------------------
# SwAV prototype loss (docs/method.md 2.15)
# ----------------------------------------------------------------------------------------------

def normalize_rows(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """torch F.normalize along the last axis: x / max(||x||, eps)."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def normalize_prototypes(prototypes: jax.Array) -> jax.Array:
  """[K, D] -> row-normalised prototypes.

  The original overwrites the parameter with this value at the start of every SwAV call, outside
  autograd. The train step applies it to the parameter tree *before* differentiating, every step
  (also before the SwAV gate opens), and differentiates the loss at the replaced value.
  """
  return normalize_rows(jax.lax.stop_gradient(prototypes))


def sinkhorn(scores: jax.Array, *, epsilon: float = 0.1, iterations: int = 3) -> jax.Array:
  """Soft assignments [B, K] (each row sums to 1) from scores [B, K]; no gradient.

  Plain-domain Sinkhorn-Knopp in the original's operation order (|scores| <= 1 so exp(S/eps)
  stays below e^10).
  """
  q = jnp.exp(jax.lax.stop_gradient(scores) / epsilon).T  # [K, B]
  k, b = q.shape
  q = q / q.sum()
  for _ in range(iterations):
    q = q / q.sum(axis=1, keepdims=True)
    q = q / k
    q = q / q.sum(axis=0, keepdims=True)
    q = q / b
  q = q * b
  return q.T


def swav_loss(img: jax.Array, cap: jax.Array, prototypes: jax.Array, *,
              temperature: float = 0.1, epsilon: float = 0.1,
              sinkhorn_iterations: int = 3) -> jax.Array:
  """Swapped-prediction prototype loss (mean over samples, the two views summed).

  Args:
    img, cap: [B, D] fused embeddings. prototypes: [K, D], already normalised by
      `normalize_prototypes` (gradient flows into them as a plain leaf).
  """
  img_scores = jnp.matmul(img, prototypes.T, precision=_HIGHEST)
  cap_scores = jnp.matmul(cap, prototypes.T, precision=_HIGHEST)
  img_assign = sinkhorn(img_scores, epsilon=epsilon, iterations=sinkhorn_iterations)
  cap_assign = sinkhorn(cap_scores, epsilon=epsilon, iterations=sinkhorn_iterations)
  img_view = -jnp.sum(cap_assign * jax.nn.log_softmax(img_scores / temperature, axis=1), axis=1)
  cap_view = -jnp.sum(img_assign * jax.nn.log_softmax(cap_scores / temperature, axis=1), axis=1)
  return img_view.mean() + cap_view.mean()


# ----------------------------------------------------------------------------------------------
# Momentum contrast: InfoNCE and the key queues (docs/method.md 2.16)
# ----------------------------------------------------------------------------------------------

MOCO_TEMPERATURE = 0.07


def _normalize_columns(queue: jax.Array) -> jax.Array:
  return normalize_rows(queue.T).T


def _cross_entropy_target_zero(logits: jax.Array) -> jax.Array:
  return -jax.nn.log_softmax(logits, axis=1)[:, 0].mean()


def info_nce_logits(query: jax.Array, key: jax.Array, queue: jax.Array, *,
                    temperature: float = MOCO_TEMPERATURE,
                    same_image: jax.Array | None = None) -> jax.Array:
  """[B, 1 + M] logits: column 0 = positive key, columns 1.. = queue negatives (detached).

  query, key: [B, D]; queue: [D, M] (negatives in columns). All vectors normalised (eps 1e-12).
  same_image: optional [B, M] bool, queue entries of the query's own image; their logits are
  -inf, so they are neither negatives nor positives (quirk Q14 corrected).
  """
  query = normalize_rows(query)
  key = normalize_rows(key)
  queue = _normalize_columns(jax.lax.stop_gradient(queue))
  positive = jnp.sum(query * key, axis=1, keepdims=True)
  negative = jnp.matmul(query, queue, precision=_HIGHEST)
  logits = jnp.concatenate([positive, negative], axis=1) / temperature
  if same_image is None:
    return logits
  masked = jnp.concatenate([jnp.zeros_like(same_image[:, :1]), same_image], axis=1)
  return jnp.where(masked, -jnp.inf, logits)


def info_nce_loss(query_img: jax.Array, query_cap: jax.Array, key_img: jax.Array,
                  key_cap: jax.Array, queue_img: jax.Array, queue_cap: jax.Array, *,
                  temperature: float = MOCO_TEMPERATURE, query_ids: jax.Array | None = None,
                  queue_ids: jax.Array | None = None) -> jax.Array:
  """MoCo InfoNCE: image queries vs caption keys/queue + caption queries vs image keys/queue.

  Args:
    query_img, query_cap: [B, D] pre-fusion query embeddings v1/t1 (Q12).
    key_img, key_cap: [B, D] fused momentum-encoder embeddings. Not detached here (the original
      does not either); the caller computes them without gradient.
    queue_img, queue_cap: [D, M] queues *before* this step's enqueue (detached here).
    query_ids, queue_ids: optional [B] image ids of the queries and [M] image ids of the queued
      keys (-1: none yet). Given both, queue entries of the query's own image are masked out
      (quirk Q14 corrected); the original keeps them as negatives.
  """
  same_image = None
  if (query_ids is None) != (queue_ids is None):
    raise ValueError("pass both query_ids and queue_ids, or neither")
  if query_ids is not None:
    same_image = query_ids[:, None] == queue_ids[None, :]
  logits_i2t = info_nce_logits(query_img, key_cap, queue_cap, temperature=temperature,
                               same_image=same_image)
  logits_t2i = info_nce_logits(query_cap, key_img, queue_img, temperature=temperature,
                               same_image=same_image)
  return _cross_entropy_target_zero(logits_i2t) + _cross_entropy_target_zero(logits_t2i)


def init_moco_queue(key: jax.Array, dim: int, length: int, dtype=jnp.float32) -> jax.Array:
  """[D, M] queue of U[0, 1) entries with every column L2-normalised."""
  return _normalize_columns(jax.random.uniform(key, (dim, length), dtype))


def enqueue_keys(queue: jax.Array, pointer: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Ring-buffer enqueue: columns pointer..pointer+B-1 <- keys.T (stored un-normalised).

  Args:
    queue: [D, M]; pointer: int scalar (traced ok); keys: [B, D]. M must be a multiple of B.
      Also the queue of image ids: queue [M] and keys [B] (enqueued at the same columns).
  Returns:
    (new queue, (pointer + B) mod M).
  """
  length = queue.shape[-1]
  batch = keys.shape[0]
  if length % batch:
    raise ValueError(f"queue length {length} must be a multiple of the batch size {batch}")
  keys = jax.lax.stop_gradient(keys).astype(queue.dtype)
  if queue.ndim == 1:
    return jax.lax.dynamic_update_slice(queue, keys, (pointer,)), (pointer + batch) % length
  queue = jax.lax.dynamic_update_slice(queue, keys.T, (jnp.zeros_like(pointer), pointer))
  return queue, (pointer + batch) % length


# ----------------------------------------------------------------------------------------------
# KL regulariser of the relation module (docs/method.md 2.14)
# ----------------------------------------------------------------------------------------------

def kl_batchmean(guide: jax.Array, relevance: jax.Array, *, temperature: float = 1.0) -> jax.Array:
  """torch kl_div(log_softmax(guide/T), softmax(relevance/T), 'batchmean') * T^2.

  = sum over rows of KL(p || q) / n_rows, p = softmax(relevance row / T), q = softmax(guide row / T).

  The two distributions are nearly equal in AAHR (KL ~1e-3), and sum p (log p - log q) loses
  ~1e-4 of it to cancellation in float32 (log-probabilities of ~-4 differing by ~0.03). Rows
  whose logits differ by less than 1 use the cancellation-free form instead: with
  e = (relevance - guide)/T - sum q (relevance - guide)/T (so sum q e ~ 0) and Z = sum q exp(e),
    KL = sum q e exp(e) / Z - log Z,  sum q e exp(e) = sum q e + sum q e expm1(e),
    log Z = log1p(sum q expm1(e)),
  every piece of which is second order in e, as KL is.
  """
  a, b = relevance / temperature, guide / temperature
  log_q = jax.nn.log_softmax(b, axis=-1)
  log_p = jax.nn.log_softmax(a, axis=-1)
  direct = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  q = jnp.exp(log_q)
  d = a - b
  e = d - jnp.sum(q * d, axis=-1, keepdims=True)
  near = jnp.max(jnp.abs(e), axis=-1) < 1.0
  e = jnp.where(near[:, None], e, 0.0)  # far rows take `direct`; keep their exp finite
  growth = jnp.expm1(e)
  s = jnp.sum(q * growth, axis=-1)
  stable = (jnp.sum(q * e, axis=-1) + jnp.sum(q * e * growth, axis=-1)) / (1.0 + s) - jnp.log1p(s)
  return jnp.sum(jnp.where(near, stable, direct)) / guide.shape[0] * temperature**2


def relation_kl_regulariser(global_sim: jax.Array, relevance_i2t: jax.Array,
                            relevance_t2i: jax.Array, *, temperature: float = 1.0) -> jax.Array:
  """KL(G, A_it) + KL(G^T, A_ti); G = exp(-cdist(x, y)/sigma) [B_img, B_cap] (detached).

  In AAHR every argument is gradient-free, so the term is a constant (Q3).
  """
  global_sim = jax.lax.stop_gradient(global_sim)
  return (kl_batchmean(global_sim, relevance_i2t, temperature=temperature)
          + kl_batchmean(global_sim.T, relevance_t2i, temperature=temperature))


# ----------------------------------------------------------------------------------------------
# Loss gates and the total (docs/method.md 2.19)
# ----------------------------------------------------------------------------------------------

def loss_weights(iter_count: jax.Array, moco_count: jax.Array, *, moco_queue_length: int,
                 batch_size: int, swav_weight: float = 0.2, swav_after: int = 2200,
                 graph_from: int = 8000, reg_weight: float = 10.0) -> dict[str, jax.Array]:
  """Weight of every loss term at a step; pure arithmetic on traced counters (compiles once).

  Args:
    iter_count: criterion counter before this step (0-based `it`).
    moco_count: MoCo counter before this step (equal to iter_count in a fresh run); it is
      incremented before the test, so MoCo is on iff moco_count + 1 > M / B (float division).
  Returns:
    dict with keys base, swav, graph (gnn1+gnn2+gnn3), reg, moco -> float scalars.
  """
  swav_on = iter_count > swav_after
  graph_on = iter_count >= graph_from
  moco_on = (moco_count + 1) > (moco_queue_length / batch_size)
  # weakly typed: the weights take the dtype of the terms they multiply
  as_float = lambda on, weight: jnp.where(on, weight, 0.0)
  return {
      "base": jnp.asarray(1.0),
      "swav": as_float(swav_on, swav_weight),
      "graph": as_float(graph_on, 1.0),
      "reg": as_float(graph_on, reg_weight),
      "moco": as_float(moco_on, 1.0),
  }


def weighted_total(terms: dict[str, jax.Array], weights: dict[str, jax.Array]) -> jax.Array:
  """Sum of weight * term over the keys of `weights`.

  A term whose weight is 0 is dropped with `where` (not multiplied), so a NaN or inf from a gated
  off branch cannot leak into the total.
  """
  total = jnp.zeros((), jnp.result_type(*terms.values()))
  for name, weight in weights.items():
    term = terms[name]
    weight = jnp.asarray(weight, term.dtype)
    total = total + jnp.where(weight != 0, weight * term, 0.0)
  return total
