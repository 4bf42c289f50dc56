"""One training BERT layer with the step's LayerNorm, GELU and dropout against flax's / jax's.

  python -m benchmarks.bert_layer [--batch_size 256] [--tokens 32] [--dtype bfloat16]

The step's BERT uses `aahr_jax.models.layers.LayerNorm` and `gelu_exact`, whose backward
passes keep only their inputs and per-row statistics, and `layers.Dropout`, four 16-bit keep
draws per threefry hash; the earlier form (flax's nn.LayerNorm and nn.Dropout, autodiff of
jax.nn.gelu) keeps several full-size intermediates and hashes once per element. For one
BERT-base layer in training mode (dropout on) at the COCO step's shapes this prints, for both
forms, the bytes the forward pass saves for the backward pass (what autodiff keeps, before
XLA's own choices) and the median time of the compiled forward + backward on the default JAX
device (docs/performance.md).
"""

import argparse
import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aahr_jax.models import bert
from aahr_jax.models import layers
from benchmarks import residuals
from benchmarks import selection_ops


@contextlib.contextmanager
def earlier_forms(dropout: bool = True):
  """Inside: BERT modules built with nn.LayerNorm, autodiff of jax.nn.gelu and (if `dropout`)
  nn.Dropout (trace here). dropout=False keeps the current draws, to compare gradients."""
  saved = bert._layer_norm, bert.ACTIVATIONS['gelu'], layers.Dropout  # pylint: disable=protected-access
  bert._layer_norm = lambda config, dtype, name: nn.LayerNorm(  # pylint: disable=protected-access
      epsilon=config.layer_norm_eps, dtype=dtype, param_dtype=jnp.float32, name=name)
  bert.ACTIVATIONS['gelu'] = lambda x: jax.nn.gelu(x, approximate=False)
  if dropout:
    layers.Dropout = nn.Dropout
  try:
    yield
  finally:
    bert._layer_norm, bert.ACTIVATIONS['gelu'], layers.Dropout = saved  # pylint: disable=protected-access


def layer_loss_and_inputs(config: bert.BertConfig, batch_size: int, tokens: int, dtype):
  """(loss(params, x), params, x): a BertLayer in training mode, a fixed random projection of
  its output as the loss (a plain sum would have a near-zero gradient through LayerNorm)."""
  layer = bert.BertLayer(config, dtype)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch_size, tokens, config.hidden_size)), dtype)
  mask = jnp.asarray(np.arange(tokens)[None, :] < rng.integers(tokens // 2, tokens + 1,
                                                                size=(batch_size, 1)))
  params = layer.init({'params': jax.random.key(0)}, x, mask, True)
  weights = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

  def loss(params, x):
    y = layer.apply(params, x, mask, False, rngs={'dropout': jax.random.key(1)})
    return jnp.sum(y.astype(jnp.float32) * weights)
  return loss, params, x


def saved_bytes(loss, params, x) -> int:
  """Bytes of the intermediates the forward pass saves for the backward pass."""
  return sum(size for *_, size in residuals.residual_rows(loss, params, x))


def measure(config: bert.BertConfig, batch_size: int, tokens: int, dtype, repeats: int):
  """{'earlier form': (saved MB, ms), 'current': (saved MB, ms)}; repeats 0 skips timing."""
  results = {}
  for name, context in (('earlier form', earlier_forms), ('current', contextlib.nullcontext)):
    with context():  # everything that traces the layer runs inside
      loss, params, x = layer_loss_and_inputs(config, batch_size, tokens, dtype)
      saved = saved_bytes(loss, params, x) / 1e6
      ms = float('nan')
      if repeats:
        step = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
        ms = selection_ops.median_ms(step, params, x, repeats=repeats)
    results[name] = (saved, ms)
  return results


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch_size', type=int, default=256)
  parser.add_argument('--tokens', type=int, default=32)
  parser.add_argument('--hidden', type=int, default=768, help='BERT-base: 768')
  parser.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float32'])
  parser.add_argument('--repeats', type=int, default=5, help='0: residual bytes only')
  args = parser.parse_args(argv)
  config = bert.BertConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                           num_attention_heads=max(1, args.hidden // 64))
  results = measure(config, args.batch_size, args.tokens, jnp.dtype(args.dtype), args.repeats)
  print(f'{jax.devices()[0].device_kind}, one BERT layer (hidden {args.hidden}) in training '
        f'mode, batch {args.batch_size} x {args.tokens} tokens, {args.dtype}')
  print('| form | saved for backward MB | forward+backward ms |\n|---|---|---|')
  for name, (saved, ms) in results.items():
    print(f'| {name} | {saved:.1f} | {ms:.2f} |')
  (before_mb, before_ms), (after_mb, after_ms) = results['earlier form'], results['current']
  print(f'saved bytes {after_mb / before_mb:.2f}x, time speed-up {before_ms / after_ms:.2f}x')
  return results


if __name__ == '__main__':
  main()
