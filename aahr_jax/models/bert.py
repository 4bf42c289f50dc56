"""BERT encoder in Flax Linen with the parameter names of HF's (v4) Flax BERT.

Post-LayerNorm transformer as in huggingface `modeling_bert.py`: embeddings (word + position +
token type) -> LayerNorm -> dropout, then per layer self-attention -> dense -> dropout ->
LayerNorm(x + .), FFN act(dense) -> dense -> dropout -> LayerNorm(x + .); optional tanh pooler on
the first token. Parameters are always float32; `dtype` only sets the compute dtype, so bf16
training keeps fp32 master weights. Converted weights come from `python -m conversion bert`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aahr_jax.models import layers

# Activations by their HF config name. HF's "gelu" is the exact erf form; jax.nn.gelu defaults
# to the tanh approximation, which is HF's "gelu_new".
ACTIVATIONS = {
    'gelu': layers.gelu_exact,  # jax.nn.gelu(approximate=False) with a lean backward pass
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'relu': jax.nn.relu,
    'silu': jax.nn.silu,
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),
}

# Written into converted files' metadata; `load` refuses files of another model family.
FILE_MODEL_NAME = 'bert'


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Model size and constants; field names are those of HF's config.json."""
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = 'gelu'
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0

  def __post_init__(self):
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f'BertConfig.hidden_act={self.hidden_act!r} is not supported; '
                       f'use one of {sorted(ACTIVATIONS)}.')
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f'BertConfig.hidden_size={self.hidden_size} is not divisible by '
                       f'num_attention_heads={self.num_attention_heads}; fix the config.')

  @classmethod
  def from_dict(cls, d: dict) -> 'BertConfig':
    """Builds a config from an HF config.json dict, ignoring keys this model does not use."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


class BertOutput(NamedTuple):
  last_hidden_state: jax.Array            # (batch, length, hidden)
  pooler_output: Optional[jax.Array]      # (batch, hidden); None without a pooling layer
  hidden_states: Optional[tuple] = None   # embeddings + each layer's output, if asked for


def _dense(features: int, dtype: Any, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name)


def _layer_norm(config: BertConfig, dtype: Any, name: str) -> layers.LayerNorm:
  # Flax's default epsilon (1e-6) differs from BERT's 1e-12: always pass the config value.
  return layers.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, param_dtype=jnp.float32,
                          name=name)


class BertEmbeddings(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, token_type_ids, position_ids, deterministic: bool):
    c = self.config
    embed = lambda n, name: nn.Embed(n, c.hidden_size, param_dtype=jnp.float32, name=name)
    x = (embed(c.vocab_size, 'word_embeddings')(input_ids)
         + embed(c.max_position_embeddings, 'position_embeddings')(position_ids)
         + embed(c.type_vocab_size, 'token_type_embeddings')(token_type_ids))
    x = _layer_norm(c, self.dtype, 'LayerNorm')(x)
    return layers.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class BertSelfAttention(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, key_mask, deterministic: bool):
    c = self.config
    heads = c.num_attention_heads
    head_dim = c.hidden_size // heads
    split = lambda t: t.reshape(t.shape[:-1] + (heads, head_dim))
    q = split(_dense(c.hidden_size, self.dtype, 'query')(x))
    k = split(_dense(c.hidden_size, self.dtype, 'key')(x))
    v = split(_dense(c.hidden_size, self.dtype, 'value')(x))
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(head_dim).astype(self.dtype)
    # Softmax in float32 so that bf16 compute keeps the masked keys at exactly zero weight.
    scores = scores.astype(jnp.float32)
    scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    probs = layers.Dropout(c.attention_probs_dropout_prob)(probs, deterministic=deterministic)
    context = jnp.einsum('bhqk,bkhd->bqhd', probs, v)
    return context.reshape(context.shape[:-2] + (c.hidden_size,))


class BertResidualOutput(nn.Module):
  """dense -> dropout -> LayerNorm(residual + .): HF's BertSelfOutput and BertOutput."""
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, residual, deterministic: bool):
    c = self.config
    x = _dense(c.hidden_size, self.dtype, 'dense')(x)
    x = layers.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)
    return _layer_norm(c, self.dtype, 'LayerNorm')(x + residual)


class BertAttention(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, key_mask, deterministic: bool):
    context = BertSelfAttention(self.config, self.dtype, name='self')(x, key_mask, deterministic)
    return BertResidualOutput(self.config, self.dtype, name='output')(context, x, deterministic)


class BertIntermediate(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = _dense(self.config.intermediate_size, self.dtype, 'dense')(x)
    return ACTIVATIONS[self.config.hidden_act](x)


class BertLayer(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, key_mask, deterministic: bool):
    x = BertAttention(self.config, self.dtype, name='attention')(x, key_mask, deterministic)
    h = BertIntermediate(self.config, self.dtype, name='intermediate')(x)
    return BertResidualOutput(self.config, self.dtype, name='output')(h, x, deterministic)


class _CarriedBertLayer(BertLayer):
  """BertLayer as a scan body: carry -> (carry, this layer's output)."""
  deterministic: bool = True

  def __call__(self, x, key_mask):  # pylint: disable=arguments-differ
    y = super().__call__(x, key_mask, self.deterministic)
    return y, y


SCAN_NAME = 'scan'  # encoder/layer/scan/...: every layer's parameter stacked on axis 0


class BertLayerCollection(nn.Module):
  """Holds the layers as children '0', '1', ... so paths read encoder/layer/{i}/...

  remat: each layer's activations are recomputed in the backward pass (memory for compute).
  scan: one layer body scanned over stacked parameters encoder/layer/scan/... [L, ...] (compile
  time independent of depth); `stack_layers` / `unstack_layers` convert between the layouts.
  """
  config: BertConfig
  dtype: Any = jnp.float32
  remat: bool = False
  scan: bool = False

  @nn.compact
  def __call__(self, x, key_mask, deterministic: bool):
    n = self.config.num_hidden_layers
    if self.scan:
      body = nn.remat(_CarriedBertLayer) if self.remat else _CarriedBertLayer
      scanned = nn.scan(body, variable_axes={'params': 0}, split_rngs={'params': True,
                                                                        'dropout': True},
                        in_axes=nn.broadcast, length=n)
      _, ys = scanned(self.config, self.dtype, deterministic, name=SCAN_NAME)(x, key_mask)
      return [ys[i] for i in range(n)]
    # static_argnums counts the module as argument 0: `deterministic` is argument 3.
    layer = nn.remat(BertLayer, static_argnums=(3,)) if self.remat else BertLayer
    states = []
    for i in range(n):
      x = layer(self.config, self.dtype, name=str(i))(x, key_mask, deterministic)
      states.append(x)
    return states


def stack_layers(bert_params: dict, num_layers: int) -> dict:
  """Unrolled BERT parameters (encoder/layer/{i}/...) -> the scanned layout (.../scan/...)."""
  layers = bert_params['encoder']['layer']
  missing = [str(i) for i in range(num_layers) if str(i) not in layers]
  if missing:
    raise ValueError(f'BERT parameters lack encoder layers {missing}: they are not the unrolled '
                     f'layout of a {num_layers}-layer model')
  stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(v) for v in xs]),
                         *[layers[str(i)] for i in range(num_layers)])
  return {**bert_params, 'encoder': {**bert_params['encoder'], 'layer': {SCAN_NAME: stacked}}}


def unstack_layers(bert_params: dict) -> dict:
  """The scanned layout -> unrolled encoder/layer/{i}/... (for conversion back and export)."""
  stacked = bert_params['encoder']['layer'][SCAN_NAME]
  n = jax.tree.leaves(stacked)[0].shape[0]
  layers = {str(i): jax.tree.map(lambda v, i=i: v[i], stacked) for i in range(n)}
  return {**bert_params, 'encoder': {**bert_params['encoder'], 'layer': layers}}


class BertEncoder(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32
  remat: bool = False
  scan: bool = False

  @nn.compact
  def __call__(self, x, key_mask, deterministic: bool):
    return BertLayerCollection(self.config, self.dtype, self.remat, self.scan, name='layer')(
        x, key_mask, deterministic)


class BertPooler(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return jnp.tanh(_dense(self.config.hidden_size, self.dtype, 'dense')(x[:, 0]))


class BertModel(nn.Module):
  """BERT encoder. Returns BertOutput(last_hidden_state, pooler_output[, hidden_states])."""
  config: BertConfig
  dtype: Any = jnp.float32          # compute dtype; params stay float32
  add_pooling_layer: bool = True
  remat: bool = False               # recompute layer activations in the backward pass
  scan: bool = False                # scan one layer over stacked parameters

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *,
               deterministic: bool = True, output_hidden_states: bool = False) -> BertOutput:
    input_ids = jnp.asarray(input_ids)
    if input_ids.shape[-1] > self.config.max_position_embeddings:
      raise ValueError(f'input_ids have length {input_ids.shape[-1]} > max_position_embeddings '
                       f'{self.config.max_position_embeddings}; truncate the captions.')
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
    key_mask = jnp.asarray(attention_mask).astype(bool)   # True = real token; padding keys masked

    x = BertEmbeddings(self.config, self.dtype, name='embeddings')(
        input_ids, token_type_ids, position_ids, deterministic)
    states = BertEncoder(self.config, self.dtype, self.remat, self.scan, name='encoder')(
        x, key_mask, deterministic)
    last = states[-1] if states else x
    pooled = BertPooler(self.config, self.dtype, name='pooler')(last) \
        if self.add_pooling_layer else None
    hidden_states = tuple([x] + states) if output_hidden_states else None
    return BertOutput(last, pooled, hidden_states)


def load(path: str, dtype: Any = jnp.float32, add_pooling_layer: Optional[bool] = None):
  """Reads a file written by `python -m conversion bert`; returns (BertModel, params).

  Params are float32 numpy arrays in a nested dict (place or shard them as needed).
  The pooler is included iff the file has one, unless `add_pooling_layer` says otherwise.
  """
  from flax import traverse_util
  from safetensors import SafetensorError, safe_open

  try:
    with safe_open(str(path), framework='numpy') as f:
      meta = f.metadata() or {}
      flat = {k: f.get_tensor(k) for k in f.keys()}
  except (OSError, SafetensorError) as e:
    raise ValueError(f'cannot read converted BERT weights {path}: {e}. '
                     'Create the file with `python -m conversion bert --src ... --out ...`.') from e
  if meta.get('model') != FILE_MODEL_NAME:
    raise ValueError(f'{path} holds model {meta.get("model")!r}, not {FILE_MODEL_NAME!r}; '
                     'convert BERT weights with `python -m conversion bert`.')
  config = BertConfig.from_dict(json.loads(meta['config']))
  params = traverse_util.unflatten_dict(flat, sep='/')
  has_pooler = 'pooler' in params
  if add_pooling_layer is None:
    add_pooling_layer = has_pooler
  elif add_pooling_layer and not has_pooler:
    raise ValueError(f'{path} has no pooler weights; call load(..., add_pooling_layer=False).')
  elif not add_pooling_layer:
    params.pop('pooler', None)
  module = BertModel(config, dtype=dtype, add_pooling_layer=add_pooling_layer)
  check_params(module, params, source=str(path))
  return module, params


def init_shapes(module: BertModel) -> dict:
  """Parameter shapes of `module`, computed without allocating them."""
  ids = jnp.zeros((1, 2), jnp.int32)
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), ids)['params']


def check_params(module: BertModel, params: dict, source: str) -> None:
  """Raises ValueError listing missing, unexpected and mis-shaped parameters."""
  from flax import traverse_util
  want = traverse_util.flatten_dict(init_shapes(module), sep='/')
  have = traverse_util.flatten_dict(params, sep='/')
  missing = sorted(set(want) - set(have))
  unexpected = sorted(set(have) - set(want))
  misshaped = sorted(f'{k}: {tuple(np.shape(have[k]))} != {tuple(want[k].shape)}'
                     for k in set(want) & set(have) if tuple(np.shape(have[k])) != want[k].shape)
  if missing or unexpected or misshaped:
    raise ValueError(f'parameters from {source} do not fit BertModel({module.config}): '
                     f'missing {missing}, unexpected {unexpected}, wrong shape {misshaped}. '
                     'Re-convert the checkpoint with `python -m conversion bert`.')
