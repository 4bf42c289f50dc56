"""PyTorch reference of AAHR's image and text encoders (and of the VSE-infinity GPO encoders),
written from docs/method.md 2.3-2.12. State-dict keys equal the released checkpoints' (4.2,
4.3, 4.5), so `save_original_checkpoint` writes files in the original layout.

Batches follow the originals: regions padded to the batch's max region count, token ids padded
to the batch's max length (callers slice statically padded arrays down to those widths).
"""

import argparse
import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
import transformers


def l2norm(x, eps: float = 1e-8):
  """The encoder files' l2norm: x / (||x|| + eps)."""
  return x / (x.pow(2).sum(dim=-1, keepdim=True).sqrt() + eps)


class MLP(nn.Module):
  """lib/mlp.py MLP: Linear layers, BN + ReLU on all but the last; a BN per layer is built."""

  def __init__(self, input_dim, hidden_dim, output_dim, num_layers, bn=True):
    super().__init__()
    self.num_layers = num_layers
    sizes = [hidden_dim] * (num_layers - 1)
    self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + sizes,
                                                                sizes + [output_dim]))
    self.bn = bn
    if bn:
      self.bns = nn.ModuleList(nn.BatchNorm1d(k) for k in sizes + [output_dim])

  def forward(self, x):
    shape = x.shape
    x = x.reshape(-1, shape[-1])  # every row of the padded batch enters the BN (Q8)
    for i, layer in enumerate(self.layers):
      if i < self.num_layers - 1:
        x = layer(x)
        x = F.relu(self.bns[i](x) if self.bn else x)
      else:
        x = layer(x)
    return x.view(*shape[:-1], x.shape[-1])


class FC_MLP(nn.Module):
  """fc(x) + mlp(x); AAHR initialises every Linear Xavier-uniform with zero bias."""

  def __init__(self, input_dim, hidden_dim, output_dim, num_layers, bn=True):
    super().__init__()
    self.fc = nn.Linear(input_dim, output_dim)
    self.mlp = MLP(input_dim, hidden_dim, output_dim, num_layers, bn)
    for m in self.modules():
      if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)

  def forward(self, x):
    return self.mlp(x) + self.fc(x)


def maxk_pool(features, lengths, k=2):
  """Mean of the k largest values per feature over each item's valid positions."""
  out = []
  for i in range(features.shape[0]):
    n = int(lengths[i])
    kk = min(k, n)
    out.append(features[i, :n].topk(kk, dim=0)[0].mean(dim=0))
  return torch.stack(out)


class MultiHeadAttention(nn.Module):
  """GGLP: per head, cosine attention of nrm(Wq g) over nrm(Wk F'), values Wv F'; heads averaged.
  No padding mask (Q1): every position of the (per-batch padded) sequence is attended to."""

  def __init__(self, dim, heads=8):
    super().__init__()
    self.query = nn.ModuleList(nn.Linear(dim, dim) for _ in range(heads))
    self.key = nn.ModuleList(nn.Linear(dim, dim) for _ in range(heads))
    self.value = nn.ModuleList(nn.Linear(dim, dim) for _ in range(heads))

  def forward(self, query, features):
    outs = []
    for wq, wk, wv in zip(self.query, self.key, self.value):
      q = F.normalize(wq(query), dim=-1)                   # [B, D]
      k = F.normalize(wk(features), dim=-1)                # [B, S, D]
      w = torch.softmax(torch.einsum('bsd,bd->bs', k, q), dim=1)
      outs.append(torch.einsum('bs,bsd->bd', w, wv(features)))
    return torch.stack(outs).mean(dim=0)


class GatedFusion(nn.Module):

  def __init__(self, dim):
    super().__init__()
    self.fc_gate = nn.Linear(2 * dim, dim)

  def forward(self, a, b):
    z = torch.sigmoid(self.fc_gate(torch.cat([a, b], dim=-1)))
    return z * a + (1 - z) * b


def local_transformer(dim, nhead, dropout):
  layer = nn.TransformerEncoderLayer(d_model=dim, nhead=nhead, dim_feedforward=dim,
                                     dropout=dropout)
  return nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)


class _AAHRHead(nn.Module):
  """Pieces both AAHR encoders share (flat attribute names, as in the released code)."""

  def _init_head(self, embed_size, clip_dim, nhead, dropout, residual_weight):
    self.fc_clip = FC_MLP(clip_dim, embed_size, embed_size, 1, bn=False)
    self.aggr = local_transformer(embed_size, nhead, dropout)
    self.gated_fusion = GatedFusion(embed_size)
    self.mha_pool = MultiHeadAttention(embed_size, 8)
    self.residual_weight = residual_weight

  def _head(self, local, lengths, clip_feature):
    width = local.shape[1]
    pooled = maxk_pool(local, lengths, 2)
    pad = torch.arange(width, device=local.device)[None, :] >= lengths[:, None]
    contextual = self.aggr(local.transpose(0, 1), src_key_padding_mask=pad).transpose(0, 1)
    g = self.fc_clip(clip_feature)
    attended = self.mha_pool(g, contextual)
    prefused = self.residual_weight * pooled + (1 - self.residual_weight) * attended
    fused = self.gated_fusion(l2norm(prefused), l2norm(g))
    return fused, prefused


class EncoderImageAAHR(_AAHRHead):
  """Keys: fc.fc.*, fc.mlp.*, fc_clip.*, aggr.layers.0.*, gated_fusion.*, mha_pool.* (4.2)."""

  def __init__(self, img_dim=2048, embed_size=1024, clip_dim=512, nhead=16, dropout=0.1,
               residual_weight=0.8):
    super().__init__()
    self.fc = FC_MLP(img_dim, embed_size // 2, embed_size, 2, bn=True)
    self._init_head(embed_size, clip_dim, nhead, dropout, residual_weight)

  def forward(self, regions, lengths, clip_image, graph=False):
    """regions [B, N, img_dim] padded to N = max(lengths)."""
    local = self.fc(regions)
    fused, prefused = self._head(local, lengths, clip_image)
    if graph:
      return regions, lengths, fused, prefused, local
    return fused


class EncoderTextAAHR(_AAHRHead):
  """Keys: bert.*, linear.*, fc_clip.*, aggr.layers.0.*, gated_fusion.*, mha_pool.* (4.3)."""

  def __init__(self, bert_config, embed_size=1024, clip_dim=512, nhead=16, dropout=0.1,
               residual_weight=0.8):
    super().__init__()
    self.bert = transformers.BertModel(bert_config)
    self.linear = nn.Linear(bert_config.hidden_size, embed_size)
    self._init_head(embed_size, clip_dim, nhead, dropout, residual_weight)

  def forward(self, ids, lengths, clip_text, graph=False):
    """ids [B, L] padded with 0 to L = max(lengths)."""
    hidden = self.bert(ids, attention_mask=(ids != 0).float())[0]
    local = self.linear(hidden)
    fused, prefused = self._head(local, lengths, clip_text)
    if graph:
      return hidden, lengths, fused, prefused, local
    return fused


# ----------------------------------------------------------------------------------------------
# VSE-infinity (GPO), "basic" precomputed regions (docs/method.md 2.12, 4.5)
# ----------------------------------------------------------------------------------------------

def positional_encoding(length, dim):
  pe = torch.zeros(length, dim)
  position = torch.arange(length, dtype=torch.float32)[:, None]
  div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
  pe[:, 0::2] = torch.sin(position * div)
  pe[:, 1::2] = torch.cos(position * div)
  return pe


class GPO(nn.Module):

  def __init__(self, d_pe=32, d_hidden=32):
    super().__init__()
    self.d_pe = d_pe
    self.gru = nn.GRU(d_pe, d_hidden, 1, batch_first=True, bidirectional=True)
    self.linear = nn.Linear(d_hidden, 1, bias=False)

  def forward(self, features, lengths):
    b, width = features.shape[0], int(lengths.max())
    features = features[:, :width]
    mask = (torch.arange(width)[None, :] < lengths[:, None])[:, :, None]
    pes = positional_encoding(width, self.d_pe)[None].repeat(b, 1, 1).masked_fill(~mask, 0)
    packed = pack_padded_sequence(pes, lengths.cpu(), batch_first=True, enforce_sorted=False)
    out, _ = self.gru(packed)
    out = pad_packed_sequence(out, batch_first=True, total_length=width)[0]
    half = out.shape[2] // 2
    scores = self.linear((out[:, :, :half] + out[:, :, half:]) / 2)
    scores = scores.masked_fill(~mask, -10000)
    weights = torch.softmax(scores / 0.1, 1)
    ordered = features.masked_fill(~mask, -10000).sort(dim=1, descending=True)[0]
    ordered = ordered.masked_fill(~mask, 0)
    return (ordered * weights).sum(1)


class EncoderImageGPO(nn.Module):
  """Keys: fc.*, mlp.layers.*, mlp.bns.*, gpool.* (docs/method.md 4.5)."""

  def __init__(self, img_dim=2048, embed_size=1024):
    super().__init__()
    self.fc = nn.Linear(img_dim, embed_size)
    self.mlp = MLP(img_dim, embed_size // 2, embed_size, 2)
    self.gpool = GPO(32, 32)

  def forward(self, regions, lengths):
    features = self.mlp(regions) + self.fc(regions)
    return l2norm(self.gpool(features, lengths))


class EncoderTextGPO(nn.Module):
  """Keys: bert.*, linear.*, gpool.* (docs/method.md 4.5)."""

  def __init__(self, bert_config, embed_size=1024):
    super().__init__()
    self.bert = transformers.BertModel(bert_config)
    self.linear = nn.Linear(bert_config.hidden_size, embed_size)
    self.gpool = GPO(32, 32)

  def forward(self, ids, lengths):
    hidden = self.bert(ids, attention_mask=(ids != 0).float())[0]
    return l2norm(self.gpool(self.linear(hidden), lengths))


# ----------------------------------------------------------------------------------------------
# Test helpers
# ----------------------------------------------------------------------------------------------

def randomize_batch_norms(module, seed=0):
  """Non-trivial BN running statistics and affine parameters (eval mode then means something)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, nn.BatchNorm1d):
        n = m.num_features
        m.running_mean.copy_(torch.randn(n, generator=gen) * 0.3)
        m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.25)
        m.weight.copy_(1 + 0.2 * torch.randn(n, generator=gen))
        m.bias.copy_(0.1 * torch.randn(n, generator=gen))
        m.num_batches_tracked.fill_(7)


def save_original_checkpoint(path, image_encoder, text_encoder, opt: dict, *, prefix='',
                             position_ids=False, epoch=3, best_rsum=500.0, eiters=1234):
  """Writes {'model': [img_sd, txt_sd], 'opt': Namespace, 'epoch', 'best_rsum', 'Eiters'} like
  the original train.py. prefix='module.' imitates DataParallel; position_ids=True adds the
  buffer old transformers versions saved."""
  img_sd = {prefix + k: v for k, v in image_encoder.state_dict().items()}
  txt_sd = {prefix + k: v for k, v in text_encoder.state_dict().items()}
  if position_ids:
    width = text_encoder.bert.config.max_position_embeddings
    txt_sd[prefix + 'bert.embeddings.position_ids'] = torch.arange(width)[None]
  torch.save({'model': [img_sd, txt_sd], 'opt': argparse.Namespace(**opt), 'epoch': epoch,
              'best_rsum': best_rsum, 'Eiters': eiters}, path)


# Small sizes for fast CPU tests: 16 local-Transformer heads of width 4, 8 GGLP heads.
SMALL = dict(img_dim=24, embed_size=64, clip_dim=16)
SMALL_BERT = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=48, max_position_embeddings=40, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)


def small_bert_config(**overrides):
  return transformers.BertConfig(**dict(SMALL_BERT, **overrides))


def small_aahr(seed=0, dropout=0.0):
  """(image encoder, text encoder) with non-trivial BN statistics, eval mode."""
  torch.manual_seed(seed)
  img = EncoderImageAAHR(SMALL['img_dim'], SMALL['embed_size'], SMALL['clip_dim'], 16, dropout)
  txt = EncoderTextAAHR(small_bert_config(), SMALL['embed_size'], SMALL['clip_dim'], 16, dropout)
  randomize_batch_norms(img, seed)
  return img.eval(), txt.eval()


def small_gpo(seed=0):
  torch.manual_seed(seed)
  img = EncoderImageGPO(SMALL['img_dim'], SMALL['embed_size'])
  txt = EncoderTextGPO(small_bert_config(), SMALL['embed_size'])
  randomize_batch_norms(img, seed)
  return img.eval(), txt.eval()


def padded_batch(seed=0, region_len=(6, 3, 5, 2, 6), bert_len=(9, 5, 12, 4, 7),
                 regions_width=8, tokens_width=14):
  """Numpy batch statically padded wider than the per-batch maxima (zeros beyond each length).

  Token ids: [CLS]=2 ... [SEP]=3, one [PAD] id 0 inside item 2's length (quirk Q19).
  """
  rng = np.random.default_rng(seed)
  region_len, bert_len = np.array(region_len, np.int32), np.array(bert_len, np.int32)
  b = len(region_len)
  regions = rng.normal(size=(b, regions_width, SMALL['img_dim'])).astype(np.float32)
  regions *= (np.arange(regions_width)[None, :] < region_len[:, None])[:, :, None]
  ids = rng.integers(4, SMALL_BERT['vocab_size'], size=(b, tokens_width)).astype(np.int32)
  ids[:, 0] = 2
  ids[np.arange(b), bert_len - 1] = 3
  ids[np.arange(tokens_width)[None, :] >= bert_len[:, None]] = 0
  ids[2, 3] = 0
  clip = lambda: (5 * rng.normal(size=(b, SMALL['clip_dim']))).astype(np.float32)
  return {'regions': regions, 'region_len': region_len, 'bert_ids': ids, 'bert_len': bert_len,
          'clip_image': clip(), 'clip_text': clip()}


def torch_aahr_outputs(img_enc, txt_enc, batch):
  """Reference forward on the batch cut to its per-batch maxima; graph=True outputs as numpy."""
  n, length = int(batch['region_len'].max()), int(batch['bert_len'].max())
  t = lambda a: torch.from_numpy(np.asarray(a))
  with torch.no_grad():
    _, _, v, v1, r = img_enc(t(batch['regions'][:, :n]), t(batch['region_len']).long(),
                             t(batch['clip_image']), graph=True)
    _, _, c, c1, w = txt_enc(t(batch['bert_ids'][:, :length]).long(),
                             t(batch['bert_len']).long(), t(batch['clip_text']), graph=True)
  return {k: x.numpy() for k, x in dict(img_emb=v, img_prefusion=v1, regions=r, cap_emb=c,
                                         cap_prefusion=c1, words=w).items()}
