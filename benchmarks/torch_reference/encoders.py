"""AAHR's image and text encoders (docs/method.md 2.2-2.11) with the frozen CLIP called inside.

The CLIP model is passed to `forward` rather than held as a submodule: the original keeps it
as a plain attribute (never trained, not in the state_dict), and the key encoders, deep copies
of the query encoders, must share it rather than copy it.
"""

import torch
from torch import nn
from torch.nn import functional as F


def l2norm(x, eps: float = 1e-8):
  """The encoder file's l2norm: x / (||x|| + eps)."""
  return x / (x.pow(2).sum(dim=-1, keepdim=True).sqrt() + eps)


class MLP(nn.Module):
  """lib/mlp.py: Linear layers with BN + ReLU between them; one BN per layer is built (the
  last one is never applied). Every row of the padded batch enters the BN statistics (Q8)."""

  def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int, bn: bool):
    super().__init__()
    sizes = [hidden] * (num_layers - 1)
    self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip([in_dim] + sizes,
                                                                sizes + [out_dim]))
    self.bns = nn.ModuleList(nn.BatchNorm1d(k) for k in sizes + [out_dim]) if bn else None

  def forward(self, x):
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = F.relu(self.bns[i](x) if self.bns is not None else x)
    return x.reshape(*shape[:-1], x.shape[-1])


class FCMLP(nn.Module):
  """fc(x) + mlp(x), every Linear Xavier-uniform with zero bias (docs/method.md 2.3, 2.7)."""

  def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int, bn: bool):
    super().__init__()
    self.fc = nn.Linear(in_dim, out_dim)
    self.mlp = MLP(in_dim, hidden, out_dim, num_layers, bn)
    for m in self.modules():
      if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)

  def forward(self, x):
    return self.mlp(x) + self.fc(x)


def maxk_pool(features, lengths, k: int = 2):
  """Mean of the k largest values per feature over each item's valid positions (docs/method.md 2.5).

  Vectorised over items (the original loops over them); every item has >= k valid positions.
  """
  positions = torch.arange(features.shape[1], device=features.device)
  pad = (positions[None, :] >= lengths[:, None])[:, :, None]
  return features.masked_fill(pad, float('-inf')).topk(k, dim=1).values.mean(dim=1)


class GlobalGuidedPool(nn.Module):
  """GGLP (docs/method.md 2.8): eight full-size heads, each with own query/key/value Linear; cosine
  logits over every position (no padding mask, Q1); values computed per position as the
  original does; heads averaged."""

  def __init__(self, dim: int, heads: int = 8):
    super().__init__()
    self.query = nn.ModuleList(nn.Linear(dim, dim) for _ in range(heads))
    self.key = nn.ModuleList(nn.Linear(dim, dim) for _ in range(heads))
    self.value = nn.ModuleList(nn.Linear(dim, dim) for _ in range(heads))

  def forward(self, query, features):
    outs = []
    for wq, wk, wv in zip(self.query, self.key, self.value):
      q = F.normalize(wq(query), dim=-1)
      k = F.normalize(wk(features), dim=-1)
      w = torch.softmax(torch.einsum('bsd,bd->bs', k, q), dim=1)
      outs.append(torch.einsum('bs,bsd->bd', w, wv(features)))
    return torch.stack(outs).mean(dim=0)


class GatedFusion(nn.Module):
  """z = sigmoid(fc_gate([a; b])); z * a + (1 - z) * b (docs/method.md 2.10)."""

  def __init__(self, dim: int):
    super().__init__()
    self.fc_gate = nn.Linear(2 * dim, dim)

  def forward(self, a, b):
    z = torch.sigmoid(self.fc_gate(torch.cat([a, b], dim=-1)))
    return z * a + (1 - z) * b


class _Head(nn.Module):
  """MaxK, local Transformer, CLIP projection, GGLP, residual mix and gated fusion."""

  def _build_head(self, s):
    d = s.embed_size
    self.fc_clip = FCMLP(s.clip_dim, d, d, 1, bn=False)
    layer = nn.TransformerEncoderLayer(d_model=d, nhead=s.num_heads, dim_feedforward=d,
                                       dropout=s.dropout)  # sequence-first, as the original
    self.aggr = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
    self.mha_pool = GlobalGuidedPool(d, s.gglp_heads)
    self.gated_fusion = GatedFusion(d)
    self.residual_weight = s.residual_weight

  def _head(self, local, lengths, clip_feature):
    pooled = maxk_pool(local, lengths)
    positions = torch.arange(local.shape[1], device=local.device)
    pad = positions[None, :] >= lengths[:, None]
    contextual = self.aggr(local.transpose(0, 1), src_key_padding_mask=pad).transpose(0, 1)
    g = self.fc_clip(clip_feature)
    attended = self.mha_pool(g, contextual)
    prefused = self.residual_weight * pooled + (1 - self.residual_weight) * attended
    return self.gated_fusion(l2norm(prefused), l2norm(g)), prefused


class ImageEncoder(_Head):
  """Regions -> FC_MLP -> head, CLIP's image tower on the raw image (docs/method.md 2.3, 2.11)."""

  def __init__(self, s):
    super().__init__()
    self.fc = FCMLP(s.img_dim, s.region_hidden, s.embed_size, 2, bn=True)
    self._build_head(s)

  def forward(self, regions, lengths, images, clip):
    """-> (fused v, pre-fusion v1, per-region R)."""
    with torch.no_grad():
      clip_feature = clip.encode_image(images)
    local = self.fc(regions)
    fused, prefused = self._head(local, lengths, clip_feature)
    return fused, prefused, local


class TextEncoder(_Head):
  """BERT -> Linear(768 -> D) -> head, CLIP's text tower on the raw caption (docs/method.md 2.4)."""

  def __init__(self, s, bert):
    super().__init__()
    self.bert = bert
    self.linear = nn.Linear(bert.config.hidden_size, s.embed_size)
    self._build_head(s)

  def forward(self, ids, lengths, clip_tokens, clip):
    """-> (fused t, pre-fusion t1, per-token W)."""
    with torch.no_grad():
      clip_feature = clip.encode_text(clip_tokens)
    hidden = self.bert(ids, attention_mask=(ids != 0).long())[0]
    local = self.linear(hidden)
    fused, prefused = self._head(local, lengths, clip_feature)
    return fused, prefused, local
