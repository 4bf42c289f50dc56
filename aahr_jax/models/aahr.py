"""The composed dual encoders: VSE-infinity (GPO) now; AAHR and HREM variants by config.

Every model exposes `embed_images(regions, region_len, ...)` and
`embed_captions(bert_ids, bert_len, ...)` returning the embeddings the evaluator compares by dot
product, and `__call__(batch, train=...)` returning both for a training batch.
Top-level parameter groups are `img` and `txt` (BERT under `txt/bert`), so optimizer and sharding
rules read as regexes over readable paths.
"""

import flax.linen as nn
import jax.numpy as jnp

from aahr_jax.models import bert as bert_lib
from aahr_jax.models import encoders
from aahr_jax.models import layers
from aahr_jax.models import pooling


def batch_max(lengths, valid=None):
  """Largest length over the real rows of the (global) batch: the originals' padded width."""
  if valid is not None:
    lengths = jnp.where(valid, lengths, 0)
  return lengths.max()


class GPOImageTower(nn.Module):
  """VSE-infinity precomputed-region image encoder: fc(X) + MLP(X) -> GPO -> l2norm."""
  embed_size: int
  bn_mask_padding: bool = False  # False: BN statistics include pads below the batch max (Q8)

  @nn.compact
  def __call__(self, regions, region_len, valid=None, *, train: bool = False):
    n = regions.shape[1]
    widest = batch_max(region_len, valid)
    bn_rows = layers.position_mask(region_len if self.bn_mask_padding else
                                   jnp.full_like(region_len, widest), n)
    if valid is not None:
      bn_rows = bn_rows & valid[:, None]
    fc = layers.TorchDense(self.embed_size, xavier=True, name='fc')(regions)
    mlp = encoders.MLP(512, self.embed_size, xavier=False, name='mlp')(regions, bn_rows,
                                                                        train=train)
    features = fc + mlp
    return layers.l2_normalize(pooling.GPO(name='gpool')(features, region_len))


class GPOTextTower(nn.Module):
  """VSE-infinity text encoder: BERT -> Linear(hidden -> D) -> GPO -> l2norm."""
  embed_size: int
  bert: bert_lib.BertConfig

  @nn.compact
  def __call__(self, bert_ids, bert_len, *, train: bool = False):
    hidden = bert_lib.BertModel(self.bert, name='bert')(
        bert_ids, attention_mask=(bert_ids != 0).astype(jnp.int32),
        deterministic=not train).last_hidden_state
    words = layers.TorchDense(self.embed_size, name='linear')(hidden)
    return layers.l2_normalize(pooling.GPO(name='gpool')(words, bert_len))


class VSEInfinity(nn.Module):
  """VSE-infinity (GPO) with BUTD regions and BERT (aahr_spec.md 2.12)."""
  embed_size: int
  bert: bert_lib.BertConfig
  bn_mask_padding: bool = False

  def setup(self):
    self.img = GPOImageTower(self.embed_size, self.bn_mask_padding)
    self.txt = GPOTextTower(self.embed_size, self.bert)

  def embed_images(self, regions, region_len, valid=None, *, train: bool = False):
    return self.img(regions, region_len, valid, train=train)

  def embed_captions(self, bert_ids, bert_len, *, train: bool = False):
    return self.txt(bert_ids, bert_len, train=train)

  def __call__(self, batch, *, train: bool = False):
    return (self.embed_images(batch['regions'], batch['region_len'], batch.get('valid'),
                              train=train),
            self.embed_captions(batch['bert_ids'], batch['bert_len'], train=train))


def build_model(model_config) -> nn.Module:
  """Model from `config.model` (an ml_collections ConfigDict)."""
  bert_config = bert_lib.BertConfig.from_dict(dict(model_config.bert))
  if model_config.name == 'vse_infinity':
    return VSEInfinity(embed_size=model_config.embed_size, bert=bert_config,
                       bn_mask_padding=model_config.get('bn_mask_padding', False))
  raise ValueError(f'config.model.name = {model_config.name!r} is not a known model; '
                   "expected 'vse_infinity'")
