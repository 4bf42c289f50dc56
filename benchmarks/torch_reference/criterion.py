"""AAHR's criterion (GraphLoss) and InfoNCE in PyTorch (docs/method.md 2.13-2.17), fp32.

Static-shape forms of two data-dependent pieces of the original, with the same distribution
and results: one categorical draw per (anchor, column) cell weighted by the positive mask
instead of one draw per positive pair, and a where() instead of the try/except around
torch.multinomial for rows without admissible negatives (Q9).
"""

import torch
from torch import nn
from torch.nn import functional as F

DWS_DIM = 512
MARGIN = 0.2


def _triplet_direction(scores, positives, cutoff: float):
  """Sum over positive pairs of relu(margin + S[a, drawn] - S[a, j]), anchors as rows."""
  with torch.no_grad():
    dist = (2 - 2 * scores).sqrt().clamp_min(0.5)
    log_w = (2 - DWS_DIM) * dist.log() - ((DWS_DIM - 3) / 2) * (1 - dist.pow(2) / 4).log()
    log_w = log_w.masked_fill(~torch.isfinite(log_w) | positives, 0.0)
    w = torch.exp(log_w - log_w.max(dim=1, keepdim=True).values)
    w = w * (~positives) * (dist < cutoff)
    w = w / (w.sum(dim=1, keepdim=True) + 1e-20)
    empty = w.sum(dim=1) == 0
    failed = (positives.any(dim=1) & empty).any()  # the original's multinomial would raise
    safe = torch.where(empty[:, None], torch.ones_like(w), w)
    drawn = torch.multinomial(safe, scores.shape[1], replacement=True)
  hinge = F.relu(MARGIN + scores.gather(1, drawn) - scores)
  return torch.where(failed, torch.zeros_like(hinge), hinge * positives).sum()


def dws_triplet(im, s, ids, cutoff: float):
  """HREM triplet, distance-weighted negative sampling, both directions (docs/method.md 2.17)."""
  scores = im @ s.t()
  positives = ids[:, None] == ids[None, :]
  return (_triplet_direction(scores, positives, cutoff)
          + _triplet_direction(scores.t(), positives.t(), cutoff))


def sinkhorn(scores, epsilon: float, iterations: int):
  with torch.no_grad():
    q = torch.exp(scores / epsilon).t()
    k, b = q.shape
    q = q / q.sum()
    for _ in range(iterations):
      q = q / q.sum(dim=1, keepdim=True) / k
      q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t()


def swav(v, t, prototypes, temperature: float, epsilon: float, iterations: int):
  """Prototypes are renormalised in place first, outside autograd (docs/method.md 2.15)."""
  with torch.no_grad():
    prototypes.copy_(F.normalize(prototypes, dim=1))
  sv, st = v @ prototypes.t(), t @ prototypes.t()
  qv, qt = sinkhorn(sv, epsilon, iterations), sinkhorn(st, epsilon, iterations)
  return (-(qt * F.log_softmax(sv / temperature, dim=1)).sum(dim=1).mean()
          - (qv * F.log_softmax(st / temperature, dim=1)).sum(dim=1).mean())


def info_nce(q_img, q_txt, k_img, k_txt, queue_img, queue_txt, tau: float = 0.07):
  """MoCo InfoNCE against the queues before this step's enqueue (docs/method.md 2.16)."""

  def one(query, key, queue):
    query, key = F.normalize(query, dim=1), F.normalize(key, dim=1)
    logits = torch.cat([(query * key).sum(dim=1, keepdim=True),
                        query @ F.normalize(queue, dim=0)], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(len(query), dtype=torch.long,
                                               device=query.device))

  return one(q_img, k_txt, queue_txt) + one(q_txt, k_img, queue_img)


def fine_grained_relevance(regions, words, word_len, topk: int = 10, matmul_dtype=None):
  """SCAN-style relevance (docs/method.md 2.13) -> (T2I [caption, image], I2T [image, caption]).

  regions [B, N, D] and words [B, L, D] at the per-batch widths; all captions at once (the
  original loops over captions; the [B, B, L, N] tensor fits on the GPU). matmul_dtype
  (bf16 runs): the word-region scores from operands of that dtype, as the JAX step does.
  """
  regions, words = F.normalize(regions.detach(), dim=-1), F.normalize(words.detach(), dim=-1)
  width = words.shape[1]
  positions = torch.arange(width, device=words.device)
  valid = positions[None, :] < word_len[:, None]                                  # [C, L]
  selected = positions[None, :] < word_len.clamp(min=topk).clamp(max=width)[:, None]
  if matmul_dtype is None:
    scores = torch.einsum('cwd,ird->ciwr', words, regions)
  else:
    scores = torch.einsum('cwd,ird->ciwr', words.to(matmul_dtype), regions.to(matmul_dtype))
  m = F.leaky_relu(scores.float(), 0.1)                                             # [C,I,L,N]
  word_norm = (m.pow(2) * selected[:, None, :, None]).sum(dim=2, keepdim=True)
  per_word = (m / word_norm.sqrt().clamp_min(1e-12)).max(dim=3).values              # [C,I,L]
  t2i = (per_word * valid[:, None, :]).sum(dim=2) / word_len[:, None]
  region_norm = m.pow(2).sum(dim=3, keepdim=True).sqrt().clamp_min(1e-12)
  per_region = (m / region_norm).masked_fill(~valid[:, None, :, None], float('-inf'))
  i2t = per_region.max(dim=2).values.mean(dim=2)                                     # [C, I]
  return t2i, i2t.t()


def _row_topk(similarity, k: int):
  return similarity >= similarity.topk(k, dim=1).values[:, -1:]


class GCN(nn.Module):
  """LeakyReLU_0.2(A (dropout_0.6(H) W) + b), W stored [in, out] (docs/method.md 2.14)."""

  def __init__(self, dim: int):
    super().__init__()
    self.weight = nn.Parameter(torch.empty(dim, dim))
    self.bias = nn.Parameter(torch.zeros(dim))
    nn.init.xavier_uniform_(self.weight)

  def forward(self, x, adjacency):
    support = F.dropout(x, 0.6, self.training) @ self.weight
    return F.leaky_relu(adjacency @ support + self.bias, 0.2)


def _kl(guide, relevance):
  return F.kl_div(F.log_softmax(guide, dim=1), F.softmax(relevance, dim=1),
                  reduction='batchmean')


class Criterion(nn.Module):
  """GraphLoss: base triplet, SwAV, the instance relation module and its triplet terms."""

  def __init__(self, embed_size: int, num_prototypes: int, nhead: int, cutoff: float,
               mask_weight: float, swav_cfg: dict, threshold: float = 0.5, topk: int = 10,
               relevance_matmul_dtype=None):
    super().__init__()
    self.prototypes = nn.Parameter(torch.randn(num_prototypes, embed_size))
    layer = nn.TransformerEncoderLayer(embed_size, nhead, embed_size, 0.1)
    self.gnn = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
    self.gcn_img, self.gcn_text, self.gcn = GCN(embed_size), GCN(embed_size), GCN(embed_size)
    self.cutoff, self.mask_weight, self.swav_cfg = cutoff, mask_weight, swav_cfg
    self.threshold, self.topk = threshold, topk
    self.relevance_matmul_dtype = relevance_matmul_dtype

  def relation(self, v1, t1, regions, words, word_len):
    """-> (x, y, x^, y^, constant KL regulariser) (docs/method.md 2.14)."""
    x, y = l2n(v1), l2n(t1)
    batch = x.shape[0]
    k = int(batch * self.threshold)
    with torch.no_grad():
      c_ii, c_tt = _row_topk(x @ x.t(), k), _row_topk(y @ y.t(), k)
      a_ti, a_it = fine_grained_relevance(regions, words, word_len, self.topk,
                                          self.relevance_matmul_dtype)
      c_ti, c_it = _row_topk(a_ti, k), _row_topk(a_it, k)
      g = torch.exp(-torch.cdist(x, y))
      reg = _kl(g, a_it) + _kl(g.t(), a_ti)
    a_ii, a_tt = torch.exp(-torch.cdist(x, x)), torch.exp(-torch.cdist(y, y))
    a_full = torch.cat([torch.cat([a_ii, a_it], 1), torch.cat([a_ti, a_tt], 1)], 0)
    c_full = torch.cat([torch.cat([c_ii, c_it], 1), torch.cat([c_ti, c_tt], 1)], 0)
    mask = (self.mask_weight * a_full).masked_fill(~c_full, float('-inf'))
    z = self.gcn(torch.cat([self.gcn_img(x, a_ii), self.gcn_text(y, a_tt)]), a_full)
    h = F.normalize(z, dim=1) + torch.cat([x, y])
    # is_causal=False: otherwise PyTorch compares the mask with a causal one on the host (a sync,
    # and a graph break under torch.compile).
    out = F.normalize(self.gnn(h[:, None, :], mask=mask, is_causal=False)[:, 0], dim=1)
    return x, y, out[:batch], out[batch:], reg

  def forward(self, v, t, v1, t1, regions, words, word_len, ids):
    """All terms on (the step gates none off: steady state after 8000 iterations)."""
    base = dws_triplet(v, t, ids, self.cutoff)
    swav_loss = swav(v, t, self.prototypes, **self.swav_cfg)
    x, y, xh, yh, reg = self.relation(v1, t1, regions, words, word_len)
    graph = (dws_triplet(x, yh, ids, self.cutoff) + dws_triplet(xh, y, ids, self.cutoff)
             + dws_triplet(xh, yh, ids, self.cutoff))
    return base + 0.2 * swav_loss + graph + 10.0 * reg


def l2n(x, eps: float = 1e-8):
  return x / (x.pow(2).sum(dim=-1, keepdim=True).sqrt() + eps)
