"""The composed dual encoders: VSE-infinity (GPO) and AAHR ("multi-grained" encoders).

Every model exposes `embed_images(regions, region_len, ...)` and
`embed_captions(bert_ids, bert_len, ...)` returning the embeddings the evaluator compares by dot
product, and `__call__(batch, train=...)` returning both for a training batch.
Top-level parameter groups are `img` and `txt` (BERT under `txt/bert`), so optimizer and sharding
rules read as regexes over readable paths.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from aahr_jax.models import bert as bert_lib
from aahr_jax.models import encoders
from aahr_jax.models import layers
from aahr_jax.models import pooling
from aahr_jax.models import relations


def batch_max(lengths, valid=None):
  """Largest length over the real rows of the (global) batch: the originals' padded width."""
  if valid is not None:
    lengths = jnp.where(valid, lengths, 0)
  return lengths.max()


class GPOImageTower(nn.Module):
  """VSE-infinity precomputed-region image encoder: fc(X) + MLP(X) -> GPO -> l2norm."""
  embed_size: int
  bn_mask_padding: bool = False  # False: BN statistics include pads below the batch max (Q8)
  hidden: int = 512  # the MLP's hidden width (512 in every original)
  dtype: Any = jnp.float32  # matmul dtype; GPO's weights and the l2 norm stay float32

  @nn.compact
  def __call__(self, regions, region_len, valid=None, *, train: bool = False):
    n = regions.shape[1]
    widest = batch_max(region_len, valid)
    bn_rows = layers.position_mask(region_len if self.bn_mask_padding else
                                   jnp.full_like(region_len, widest), n)
    if valid is not None:
      bn_rows = bn_rows & valid[:, None]
    fc = layers.TorchDense(self.embed_size, xavier=True, dtype=self.dtype, name='fc')(regions)
    mlp = encoders.MLP(self.hidden, self.embed_size, xavier=False, dtype=self.dtype,
                       name='mlp')(regions, bn_rows, train=train)
    features = (fc + mlp).astype(jnp.float32)  # GPO's sort and weighted sum in float32
    return layers.l2_normalize(pooling.GPO(name='gpool')(features, region_len))


class GPOTextTower(nn.Module):
  """VSE-infinity text encoder: BERT -> Linear(hidden -> D) -> GPO -> l2norm."""
  embed_size: int
  bert: bert_lib.BertConfig
  dtype: Any = jnp.float32
  bert_remat: bool = False
  bert_scan: bool = False

  @nn.compact
  def __call__(self, bert_ids, bert_len, *, train: bool = False):
    hidden = bert_lib.BertModel(self.bert, dtype=self.dtype, remat=self.bert_remat,
                                scan=self.bert_scan, name='bert')(
        bert_ids, attention_mask=(bert_ids != 0).astype(jnp.int32),
        deterministic=not train).last_hidden_state
    words = layers.TorchDense(self.embed_size, dtype=self.dtype, name='linear')(hidden)
    return layers.l2_normalize(pooling.GPO(name='gpool')(words.astype(jnp.float32), bert_len))


class VSEInfinity(nn.Module):
  """VSE-infinity (GPO) with BUTD regions and BERT (docs/method.md 2.12)."""
  embed_size: int
  bert: bert_lib.BertConfig
  bn_mask_padding: bool = False
  region_hidden: int = 512  # the image MLP's hidden width (the original's embed_size // 2)
  dtype: Any = jnp.float32  # compute dtype of the matmuls; parameters are float32
  bert_remat: bool = False
  bert_scan: bool = False

  def setup(self):
    self.img = GPOImageTower(self.embed_size, self.bn_mask_padding, hidden=self.region_hidden,
                             dtype=self.dtype)
    self.txt = GPOTextTower(self.embed_size, self.bert, dtype=self.dtype,
                            bert_remat=self.bert_remat, bert_scan=self.bert_scan)

  def embed_images(self, regions, region_len, valid=None, *, train: bool = False):
    return self.img(regions, region_len, valid, train=train)

  def embed_captions(self, bert_ids, bert_len, *, train: bool = False):
    return self.txt(bert_ids, bert_len, train=train)

  def __call__(self, batch, *, train: bool = False):
    return (self.embed_images(batch['regions'], batch['region_len'], batch.get('valid'),
                              train=train),
            self.embed_captions(batch['bert_ids'], batch['bert_len'], train=train))


# ----------------------------------------------------------------------------------------------
# AAHR (docs/method.md 2.3-2.11)
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AAHRSettings:
  """Sizes, constants and quirk flags of AAHR's encoders (config.model fields of the same name)."""
  embed_size: int = 1024
  region_hidden: int = 512
  num_heads: int = 16            # local Transformers (opt.nhead)
  dropout: float = 0.1           # local Transformers (opt.dropout)
  gglp_heads: int = 8
  gglp_logit_scale: float = 1.0  # Q2: cosine logits without temperature
  residual_weight: float = 0.8   # beta of the 0.8 / 0.2 mix
  maxk: int = 2
  gate_l2_inputs: bool = True    # the original's no_imgnorm / no_txtnorm = False
  renorm_fused: bool = False     # Q5 corrected: unit-norm fused embeddings
  bn_mask_padding: bool = False  # Q8 corrected: region BN statistics over valid rows only
  gglp_mask_padding: bool = False  # Q1 corrected: GGLP softmax over each row's valid positions
  dtype: str = 'float32'         # compute dtype of the matmuls (config.dtype); params float32
  bert_remat: bool = False
  bert_scan: bool = False


def _local_global_head(s: AAHRSettings, features, lengths, limit, clip_features, train: bool):
  """What both towers do after their local features F (called inside a tower, so the children
  are the tower's own: aggr, fc_clip, mha_pool, gated_fusion, as in the torch keys):

    pooled   = MaxK(F, len)                          (pre-Transformer features)
    F'       = aggr(F, key padding by len)           1-layer post-norm Transformer
    g        = fc_clip(clip_feature)
    prefused = beta * pooled + (1 - beta) * mha_pool(g, F', softmax over positions < limit)
    fused    = gated_fusion(l2n(prefused), l2n(g))   [normalised again if renorm_fused]
  """
  lengths = jnp.maximum(lengths, 1)  # rows of length 0 are batch padding; keep them finite
  pooled = pooling.maxk_pool(features, lengths, s.maxk).astype(jnp.float32)
  contextual = relations.TransformerEncoder(
      num_layers=1, num_heads=s.num_heads, ff_dim=s.embed_size, dropout_rate=s.dropout,
      dtype=jnp.dtype(s.dtype), name='aggr')(features,
                   relations.key_padding_additive_mask(lengths, features.shape[1],
                                                       features.dtype),
                   deterministic=not train)
  clip_emb = encoders.ClipProjection(s.embed_size, name='fc_clip')(clip_features)
  # GGLP, the residual mix and the gated fusion are small: float32, so the embeddings that the
  # losses and similarities see are float32 whatever the compute dtype.
  attended = pooling.GlobalGuidedAttentionPool(s.gglp_heads, s.gglp_logit_scale,
                                               dtype=jnp.dtype(s.dtype), name='mha_pool')(
                                                   clip_emb, contextual, limit)
  prefused = s.residual_weight * pooled + (1.0 - s.residual_weight) * attended
  gate_in = ((layers.l2_normalize(prefused), layers.l2_normalize(clip_emb))
             if s.gate_l2_inputs else (prefused, clip_emb))
  fused = pooling.GatedFusion(name='gated_fusion')(*gate_in)
  if s.renorm_fused:
    fused = pooling.unit_rows(fused)
  return fused, prefused


class AAHRImageTower(nn.Module):
  """Regions -> fc (FC_MLP, Xavier everywhere) -> R -> head. Children: fc, aggr, fc_clip,
  mha_pool, gated_fusion (the torch image-encoder keys)."""
  settings: AAHRSettings

  @nn.compact
  def __call__(self, regions, region_len, clip_image, valid=None, *, train: bool):
    s = self.settings
    n = regions.shape[1]
    widest = batch_max(region_len, valid)
    # Q8: the original's BN statistics include zero-padded rows below the per-batch maximum.
    bn_rows = layers.position_mask(region_len if s.bn_mask_padding else
                                   jnp.full_like(region_len, widest), n)
    if valid is not None:
      bn_rows = bn_rows & valid[:, None]
    local = encoders.RegionEncoder(s.embed_size, s.region_hidden, mlp_xavier=True,
                                   dtype=jnp.dtype(s.dtype), name='fc')(
        regions, bn_rows, train=train)
    limit = region_len if s.gglp_mask_padding else jnp.full_like(region_len, widest)
    fused, prefused = _local_global_head(s, local, region_len, limit, clip_image, train)
    return {'fused': fused, 'prefusion': prefused, 'local': local.astype(jnp.float32),
            'batch_max': widest}


class AAHRTextTower(nn.Module):
  """BERT -> linear -> W -> head. Children: bert, linear, aggr, fc_clip, mha_pool,
  gated_fusion (the torch text-encoder keys)."""
  settings: AAHRSettings
  bert: bert_lib.BertConfig

  @nn.compact
  def __call__(self, bert_ids, bert_len, clip_text, valid=None, *, train: bool,
               bert_train: bool | None = None):
    s = self.settings
    bert_train = train if bert_train is None else bert_train
    hidden = bert_lib.BertModel(self.bert, dtype=jnp.dtype(s.dtype), remat=s.bert_remat,
                                scan=s.bert_scan, name='bert')(
        bert_ids, attention_mask=(bert_ids != 0).astype(jnp.int32),
        deterministic=not bert_train).last_hidden_state
    local = layers.TorchDense(s.embed_size, dtype=jnp.dtype(s.dtype), name='linear')(hidden)
    widest = batch_max(bert_len, valid)
    limit = bert_len if s.gglp_mask_padding else jnp.full_like(bert_len, widest)
    fused, prefused = _local_global_head(s, local, bert_len, limit, clip_text, train)
    return {'fused': fused, 'prefusion': prefused, 'local': local.astype(jnp.float32),
            'batch_max': widest}


class AAHR(nn.Module):
  """AAHR's image and text encoders (no CLIP inside: CLIP global features are inputs).

  Static shapes: regions padded to a fixed R (36), tokens to a fixed L; the originals' per-batch
  widths are computed here as the largest length over the valid rows, and every faithful padding
  quirk is applied relative to them, so results do not depend on the static widths.
  The relation module, prototypes and momentum encoders live with the training step.
  """
  embed_size: int
  bert: bert_lib.BertConfig
  settings: AAHRSettings = AAHRSettings()

  def setup(self):
    if self.settings.embed_size != self.embed_size:
      raise ValueError(f'AAHR: embed_size {self.embed_size} != settings.embed_size '
                       f'{self.settings.embed_size}; build the model with build_model().')
    self.img = AAHRImageTower(self.settings)
    self.txt = AAHRTextTower(self.settings, self.bert)

  def encode_images(self, regions, region_len, clip_image, valid=None, *, train: bool = False):
    """dict: fused [B, D], prefusion (v1) [B, D], local (R) [B, R, D], batch_max (scalar)."""
    return self.img(regions, region_len, clip_image, valid, train=train)

  def encode_captions(self, bert_ids, bert_len, clip_text, valid=None, *, train: bool = False,
                      bert_train: bool | None = None):
    """dict: fused, prefusion (t1), local (W) [B, L, D], batch_max. bert_train overrides BERT's
    mode alone (Q13: the momentum text encoder runs BERT in inference mode, the rest in train)."""
    return self.txt(bert_ids, bert_len, clip_text, valid, train=train, bert_train=bert_train)

  def embed_images(self, regions, region_len, clip_image, valid=None, *, train: bool = False):
    return self.encode_images(regions, region_len, clip_image, valid, train=train)['fused']

  def embed_captions(self, bert_ids, bert_len, clip_text, valid=None, *, train: bool = False,
                     bert_train: bool | None = None):
    return self.encode_captions(bert_ids, bert_len, clip_text, valid, train=train,
                                bert_train=bert_train)['fused']

  def __call__(self, batch, *, train: bool = False, bert_train: bool | None = None):
    """Training forward on a batch dict (regions, region_len, bert_ids, bert_len, clip_image,
    clip_text[, valid]). Returns img_emb / cap_emb (fused), img_prefusion / cap_prefusion
    (v1 / t1), regions (R) and words (W) for the relation module, the lengths and the per-batch
    maxima batch_max_regions / batch_max_len."""
    valid = batch.get('valid')
    img = self.encode_images(batch['regions'], batch['region_len'], batch['clip_image'], valid,
                             train=train)
    cap = self.encode_captions(batch['bert_ids'], batch['bert_len'], batch['clip_text'], valid,
                               train=train, bert_train=bert_train)
    return {'img_emb': img['fused'], 'cap_emb': cap['fused'],
            'img_prefusion': img['prefusion'], 'cap_prefusion': cap['prefusion'],
            'regions': img['local'], 'words': cap['local'],
            'region_len': batch['region_len'], 'bert_len': batch['bert_len'],
            'batch_max_regions': img['batch_max'], 'batch_max_len': cap['batch_max']}


def build_model(model_config, dtype: str = 'float32') -> nn.Module:
  """Model from `config.model` (an ml_collections ConfigDict); `dtype` is config.dtype, the
  compute dtype of the matmuls ('float32' or 'bfloat16'; parameters are always float32)."""
  bert_config = bert_lib.BertConfig.from_dict(dict(model_config.bert))
  remat = bool(model_config.get('bert_remat', False))
  scan = bool(model_config.get('bert_scan', False))
  if model_config.name == 'vse_infinity':
    return VSEInfinity(embed_size=model_config.embed_size, bert=bert_config,
                       bn_mask_padding=model_config.get('bn_mask_padding', False),
                       region_hidden=model_config.get('region_hidden', 512),
                       dtype=jnp.dtype(dtype), bert_remat=remat, bert_scan=scan)
  if model_config.name == 'aahr':
    names = {f.name for f in dataclasses.fields(AAHRSettings)} - {'dtype', 'bert_remat',
                                                                  'bert_scan'}
    settings = AAHRSettings(**{k: model_config[k] for k in names if k in model_config},
                            dtype=str(jnp.dtype(dtype)), bert_remat=remat, bert_scan=scan)
    return AAHR(embed_size=model_config.embed_size, bert=bert_config, settings=settings)
  raise ValueError(f'config.model.name = {model_config.name!r} is not a known model; '
                   "expected 'vse_infinity' or 'aahr'")
