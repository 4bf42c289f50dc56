"""OpenCLIP ViT image tower and text transformer in Flax Linen, computing what `open_clip` does.

Vision: patch conv (no bias) -> prepend class token -> add positional table -> ln_pre -> pre-norm
blocks -> ln_post on the class token (or the patch mean) -> projection. Text: token + positional
embedding -> causal pre-norm blocks -> ln_final -> feature at the EOT token (the largest id) ->
projection. Both return unnormalised features, like `open_clip`'s `encode_image`/`encode_text`.
Parameters are float32; `dtype` sets the compute dtype. Converted weights come from
`python -m conversion open_clip`; names follow open_clip's (see conversion/open_clip.py).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FILE_MODEL_NAME = 'open_clip'
ACTIVATIONS = {
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),    # laion2b / datacomp checkpoints
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI / laion400m checkpoints
}
VISION_POOLS = ('tok', 'avg')
TEXT_POOLS = ('argmax', 'eos', 'first', 'last')
TEXT_PROJECTIONS = ('matrix', 'linear', 'none')   # x @ W param, nn.Linear with bias, identity


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  image_size: tuple = (224, 224)     # (height, width)
  patch_size: tuple = (32, 32)
  width: int = 768
  layers: int = 12
  heads: int = 12
  mlp_width: int = 3072
  layer_scale: bool = False          # blocks scale both branches by learned gammas (ls_1, ls_2)
  ln_pre: bool = True
  pool_type: str = 'tok'             # class token, or 'avg' over patch tokens
  final_ln_after_pool: bool = False  # ln_post after pooling instead of before

  @property
  def grid(self) -> tuple:
    return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])


@dataclasses.dataclass(frozen=True)
class TextConfig:
  context_length: int = 77
  vocab_size: int = 49408
  width: int = 512
  heads: int = 8
  layers: int = 12
  mlp_width: int = 2048
  layer_scale: bool = False
  causal_mask: bool = True
  pool_type: str = 'argmax'          # EOT = largest id; 'eos' = first `eos_id`; 'first'; 'last'
  eos_id: int = 2
  projection: str = 'matrix'


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Defaults are OpenCLIP ViT-B-32; `act` must match the checkpoint (see ACTIVATIONS)."""
  embed_dim: int = 512
  vision: Optional[VisionConfig] = VisionConfig()
  text: Optional[TextConfig] = TextConfig()
  act: str = 'gelu'
  layer_norm_eps: float = 1e-5
  logit_bias: bool = False

  def __post_init__(self):
    checks = [(self.act in ACTIVATIONS, f'act={self.act!r} must be one of {list(ACTIVATIONS)}')]
    if self.vision:
      checks += [(self.vision.pool_type in VISION_POOLS, f'vision.pool_type must be in {VISION_POOLS}'),
                 (self.vision.width % self.vision.heads == 0, 'vision.width % vision.heads != 0')]
    if self.text:
      checks += [(self.text.pool_type in TEXT_POOLS, f'text.pool_type must be in {TEXT_POOLS}'),
                 (self.text.projection in TEXT_PROJECTIONS,
                  f'text.projection must be in {TEXT_PROJECTIONS}'),
                 (self.text.width % self.text.heads == 0, 'text.width % text.heads != 0')]
    for ok, message in checks:
      if not ok:
        raise ValueError(f'invalid CLIPConfig: {message}.')

  def to_dict(self) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(self)))   # tuples -> lists, JSON-safe

  @classmethod
  def from_dict(cls, d: dict) -> 'CLIPConfig':
    d = dict(d)
    if d.get('vision') is not None:
      v = dict(d['vision'])
      v['image_size'], v['patch_size'] = tuple(v['image_size']), tuple(v['patch_size'])
      d['vision'] = VisionConfig(**v)
    if d.get('text') is not None:
      d['text'] = TextConfig(**d['text'])
    return cls(**d)


def _dense(features, dtype, name, use_bias=True):
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


def _layer_norm(config: CLIPConfig, dtype, name):
  # CLIP's epsilon is 1e-5; Flax's default is 1e-6.
  return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, param_dtype=jnp.float32,
                      name=name)


class MultiHeadAttention(nn.Module):
  """torch.nn.MultiheadAttention as Flax DenseGeneral query/key/value (D, H, Dh) and out."""
  heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    width = x.shape[-1]
    head_dim = width // self.heads
    project = lambda name: nn.DenseGeneral((self.heads, head_dim), dtype=self.dtype,
                                           param_dtype=jnp.float32, name=name)(x)
    q, k, v = project('query'), project('key'), project('value')
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(head_dim).astype(np.float32)
    scores = scores.astype(jnp.float32)   # softmax in fp32 keeps bf16 compute stable
    if mask is not None:
      scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    context = jnp.einsum('bhqk,bkhd->bqhd', probs, v)
    return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, param_dtype=jnp.float32,
                           name='out')(context)


class LayerScale(nn.Module):
  @nn.compact
  def __call__(self, x):
    gamma = self.param('gamma', nn.initializers.constant(1e-5), (x.shape[-1],), jnp.float32)
    return x * gamma.astype(x.dtype)


class Mlp(nn.Module):
  mlp_width: int
  act: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = ACTIVATIONS[self.act](_dense(self.mlp_width, self.dtype, 'c_fc')(x))
    return _dense(x.shape[-1], self.dtype, 'c_proj')(h)


class ResidualAttentionBlock(nn.Module):
  """Pre-norm block: x + ls_1(attn(ln_1(x))), then x + ls_2(mlp(ln_2(x)))."""
  config: CLIPConfig
  heads: int
  mlp_width: int
  layer_scale: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    h = MultiHeadAttention(self.heads, self.dtype, name='attn')(
        _layer_norm(self.config, self.dtype, 'ln_1')(x), mask)
    x = x + (LayerScale(name='ls_1')(h) if self.layer_scale else h)
    h = Mlp(self.mlp_width, self.config.act, self.dtype, name='mlp')(
        _layer_norm(self.config, self.dtype, 'ln_2')(x))
    return x + (LayerScale(name='ls_2')(h) if self.layer_scale else h)


class Transformer(nn.Module):
  """Blocks named 'resblocks.{i}', as open_clip's `transformer.resblocks.{i}`."""
  config: CLIPConfig
  layers: int
  heads: int
  mlp_width: int
  layer_scale: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    for i in range(self.layers):
      x = ResidualAttentionBlock(self.config, self.heads, self.mlp_width, self.layer_scale,
                                 self.dtype, name=f'resblocks.{i}')(x, mask)
    return x


class VisionTransformer(nn.Module):
  config: CLIPConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    """images: (batch, height, width, 3), already normalised. Returns (batch, embed_dim)."""
    c, v = self.config, self.config.vision
    if tuple(images.shape[1:3]) != tuple(v.image_size):
      raise ValueError(f'images are {tuple(images.shape[1:3])} but this CLIP expects '
                       f'{tuple(v.image_size)} (height, width); resize them first.')
    x = nn.Conv(v.width, v.patch_size, strides=v.patch_size, padding='VALID', use_bias=False,
                dtype=self.dtype, param_dtype=jnp.float32, name='conv1')(images.astype(self.dtype))
    x = x.reshape(x.shape[0], -1, v.width)   # row-major over the grid, as torch's flatten(2)
    init = nn.initializers.normal(v.width ** -0.5)
    cls = self.param('class_embedding', init, (v.width,), jnp.float32)
    pos = self.param('positional_embedding', init, (v.grid[0] * v.grid[1] + 1, v.width),
                     jnp.float32)
    cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, v.width))
    x = jnp.concatenate([cls, x], axis=1) + pos.astype(x.dtype)   # table row 0 is the class token
    if v.ln_pre:
      x = _layer_norm(c, self.dtype, 'ln_pre')(x)
    x = Transformer(c, v.layers, v.heads, v.mlp_width, v.layer_scale, self.dtype,
                    name='transformer')(x)
    ln_post = _layer_norm(c, self.dtype, 'ln_post')
    pool = (lambda t: t[:, 0]) if v.pool_type == 'tok' else (lambda t: t[:, 1:].mean(axis=1))
    pooled = ln_post(pool(x)) if v.final_ln_after_pool else pool(ln_post(x))
    return _dense(c.embed_dim, self.dtype, 'proj', use_bias=False)(pooled)


class TextTransformer(nn.Module):
  config: CLIPConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, token_ids):
    """token_ids: (batch, length <= context_length) int. Returns (batch, embed_dim)."""
    c, t = self.config, self.config.text
    length = token_ids.shape[-1]
    if length > t.context_length:
      raise ValueError(f'token_ids have length {length} > context_length {t.context_length}; '
                       'tokenize with the model context length.')
    x = nn.Embed(t.vocab_size, t.width, param_dtype=jnp.float32,
                 embedding_init=nn.initializers.normal(0.02), name='token_embedding')(token_ids)
    pos = self.param('positional_embedding', nn.initializers.normal(0.01),
                     (t.context_length, t.width), jnp.float32)
    x = (x + pos[:length]).astype(self.dtype)
    mask = jnp.tril(jnp.ones((length, length), bool)) if t.causal_mask else None
    x = Transformer(c, t.layers, t.heads, t.mlp_width, t.layer_scale, self.dtype,
                    name='transformer')(x, mask)
    x = _layer_norm(c, self.dtype, 'ln_final')(x)
    rows = jnp.arange(x.shape[0])
    if t.pool_type == 'argmax':     # CLIP's EOT token has the largest id in the vocabulary
      pooled = x[rows, jnp.argmax(token_ids, axis=-1)]
    elif t.pool_type == 'eos':
      pooled = x[rows, jnp.argmax(token_ids == t.eos_id, axis=-1)]
    else:
      pooled = x[:, 0] if t.pool_type == 'first' else x[:, -1]
    if t.projection == 'none':
      return pooled
    return _dense(c.embed_dim, self.dtype, 'text_projection',
                  use_bias=t.projection == 'linear')(pooled)


class CLIP(nn.Module):
  """Image and text towers ('visual', 'text') plus the contrastive `logit_scale`."""
  config: CLIPConfig = CLIPConfig()
  dtype: Any = jnp.float32          # compute dtype; params stay float32

  def setup(self):
    c = self.config
    self.visual = VisionTransformer(c, self.dtype) if c.vision else None
    self.text = TextTransformer(c, self.dtype) if c.text else None
    self.logit_scale = self.param('logit_scale', nn.initializers.constant(np.log(1 / 0.07)), (),
                                  jnp.float32)
    if c.logit_bias:
      self.logit_bias = self.param('logit_bias', nn.initializers.constant(-10.0), (), jnp.float32)

  def encode_image(self, images):
    if self.visual is None:
      raise ValueError('this CLIP was converted without an image tower; encode_image is unavailable.')
    return self.visual(images)

  def encode_text(self, token_ids):
    if self.text is None:
      raise ValueError('this CLIP was converted without a text tower; encode_text is unavailable.')
    return self.text(token_ids)

  def __call__(self, images=None, token_ids=None):
    """(image features or None, text features or None); used by `init` to create all params."""
    return (self.encode_image(images) if images is not None else None,
            self.encode_text(token_ids) if token_ids is not None else None)


def dummy_inputs(config: CLIPConfig) -> dict:
  """Smallest inputs that touch every parameter: for `init` and shape checks."""
  inputs = {}
  if config.vision:
    inputs['images'] = jnp.zeros((1, *config.vision.image_size, 3), jnp.float32)
  if config.text:
    inputs['token_ids'] = jnp.zeros((1, config.text.context_length), jnp.int32)
  return inputs


def init_shapes(module: CLIP) -> dict:
  """Parameter shapes of `module`, computed without allocating them."""
  return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0),
                                            **dummy_inputs(module.config)))['params']


def load(path: str, dtype: Any = jnp.float32):
  """Reads a file written by `python -m conversion open_clip`; returns (CLIP, params).

  Params are float32 numpy arrays in a nested dict (place or shard them as needed).
  """
  from flax import traverse_util
  from safetensors import SafetensorError, safe_open

  try:
    with safe_open(str(path), framework='numpy') as f:
      meta = f.metadata() or {}
      flat = {k: f.get_tensor(k) for k in f.keys()}
  except (OSError, SafetensorError) as e:
    raise ValueError(f'cannot read converted CLIP weights {path}: {e}. Create the file with '
                     '`python -m conversion open_clip --model ... --src ... --out ...`.') from e
  if meta.get('model') != FILE_MODEL_NAME:
    raise ValueError(f'{path} holds model {meta.get("model")!r}, not {FILE_MODEL_NAME!r}; '
                     'convert OpenCLIP weights with `python -m conversion open_clip`.')
  module = CLIP(CLIPConfig.from_dict(json.loads(meta['config'])), dtype=dtype)
  want = traverse_util.flatten_dict(init_shapes(module), sep='/')
  for name in ('logit_scale', 'logit_bias'):   # safetensors stores scalars as shape (1,)
    if name in flat and flat[name].size == 1:
      flat[name] = flat[name].reshape(())
  bad = sorted(k for k in set(want) | set(flat)
               if k not in want or k not in flat or tuple(flat[k].shape) != want[k].shape)
  if bad:
    raise ValueError(f'{path} does not fit its own config (parameters {bad[:12]} missing, extra '
                     'or mis-shaped); re-convert the checkpoint.')
  return module, traverse_util.unflatten_dict(flat, sep='/')
