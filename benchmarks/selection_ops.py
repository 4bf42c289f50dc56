"""MaxK pooling, the negative draws and the word-region relevance against their earlier forms.

  python -m benchmarks.selection_ops [--batch_size 256] [--repeats 5]

The step's MaxK pooling (`aahr_jax.models.pooling.maxk_pool`: k rounds of argmax and a masked
sum) against `lax.top_k` over the position axis, forward and backward at COCO shapes (36
regions, D = 1024), fp32 and bf16; the step's negative draws (`aahr_jax.losses.draw_negatives`:
inverse-CDF sampling) against Gumbel-max (`jax.random.categorical`), one B x B draw; the relation
module's fine-grained word-region relevance (`aahr_jax.models.relations.fine_grained_relevance`,
no gradient) in cache-sized caption chunks (the CPU step's default) against all captions at once
(the GPU step's), with bf16 operands as in mixed-precision runs. Medians of
`--repeats` compiled calls on the default JAX device, in one run (docs/performance.md).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from aahr_jax import losses
from aahr_jax.models import layers
from aahr_jax.models import pooling
from aahr_jax.models import relations


def maxk_pool_top_k(features, lengths, k: int = 2):
  """The earlier form: lax.top_k over the position axis moved last."""
  valid = layers.position_mask(lengths, features.shape[1])
  filled = jnp.where(valid[:, :, None], features, -jnp.inf)
  top = jax.lax.top_k(jnp.swapaxes(filled, 1, 2), k)[0]
  k_eff = jnp.minimum(lengths, k)
  use = (jnp.arange(k)[None, :] < k_eff[:, None])[:, None, :]
  return jnp.where(use, top, 0.0).sum(axis=2) / k_eff[:, None].astype(features.dtype)


def draw_negatives_gumbel(key, weights):
  """The earlier form: one Gumbel-max categorical draw per cell over the row's C columns."""
  a, c = weights.shape
  logits = jnp.where(weights > 0, jnp.log(jnp.where(weights > 0, weights, 1.0)), -jnp.inf)
  return jax.random.categorical(key, logits[:, None, :], axis=-1, shape=(a, c))


def median_ms(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def main(argv=None) -> list[tuple[str, float, float]]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch_size', type=int, default=256)
  parser.add_argument('--regions', type=int, default=36)
  parser.add_argument('--words', type=int, default=32)
  parser.add_argument('--dim', type=int, default=1024)
  parser.add_argument('--chunks', default='',
                      help='comma-separated captions per relevance pass, one row each (default: '
                      'cache_sized_caption_chunk, the CPU step\'s choice)')
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args(argv)
  rng = np.random.default_rng(0)
  rows = []
  # Item lengths from 10 positions (or fewer, for tiny sizes) up to the full width.
  lengths = jnp.asarray(rng.integers(min(10, args.regions), args.regions + 1,
                                     size=args.batch_size))
  for dtype in (jnp.float32, jnp.bfloat16):
    x = jnp.asarray(rng.normal(size=(args.batch_size, args.regions, args.dim)), dtype)
    timed = []
    for fn in (maxk_pool_top_k, pooling.maxk_pool):
      grad = jax.jit(jax.grad(lambda f, fn=fn: fn(f, lengths, 2).astype(jnp.float32).sum()))
      timed.append(median_ms(grad, x, repeats=args.repeats))
    rows.append((f'MaxK forward+backward, {jnp.dtype(dtype).name}', *timed))
  weights = jax.nn.softmax(
      jnp.asarray(3 * rng.normal(size=(args.batch_size, args.batch_size)), jnp.float32), axis=1)
  timed = [median_ms(jax.jit(lambda k, fn=fn: fn(k, weights)), jax.random.key(0),
                     repeats=args.repeats)
           for fn in (draw_negatives_gumbel, losses.draw_negatives)]
  rows.append((f'negative draw, {args.batch_size} x {args.batch_size}', *timed))
  chunks = ([int(c) for c in args.chunks.split(',')] if args.chunks else
            [relations.cache_sized_caption_chunk(args.batch_size, args.words, args.regions)])
  chunks = [c for c in chunks if c is not None and c < args.batch_size]
  if chunks:
    regions = jnp.asarray(rng.normal(size=(args.batch_size, args.regions, args.dim)), jnp.bfloat16)
    words = jnp.asarray(rng.normal(size=(args.batch_size, args.words, args.dim)), jnp.bfloat16)
    word_lengths = jnp.asarray(rng.integers(min(5, args.words), args.words + 1,
                                            size=args.batch_size))
    relevance_ms = lambda c: median_ms(jax.jit(lambda r, w, n: relations.fine_grained_relevance(
        r, w, n, args.regions, n.max(), caption_chunk=c, matmul_dtype=jnp.bfloat16)),
        regions, words, word_lengths, repeats=args.repeats)
    whole = relevance_ms(None)
    for c in chunks:
      rows.append((f'word-region relevance, {c} captions per pass', whole, relevance_ms(c)))
  print(f'{jax.devices()[0].device_kind}, batch {args.batch_size}, {args.regions} regions, '
        f'{args.words} words, D = {args.dim}')
  print('| operation | earlier form ms | current ms | speed-up |\n|---|---|---|---|')
  for name, before, after in rows:
    print(f'| {name} | {before:.1f} | {after:.1f} | {before / after:.1f}x |')
  return rows


if __name__ == '__main__':
  main()
