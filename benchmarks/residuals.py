"""What the training forward pass keeps for the backward pass, by source line.

  python -m benchmarks.residuals --config configs/coco.py [--batch_size 256] [--top 20]

Traces (no compute, any machine) the query encoders' forward of the AAHR step under
`jax.value_and_grad` and lists the intermediates autodiff saves for the backward pass (JAX's
`saved_residuals`), grouped by the source line that made them, largest first. Every byte here
is written once in the forward pass and read once in the backward pass; on a GPU, where the
step's non-matmul work is memory-bound, this is the cheapest map of where that traffic comes
from (docs/performance.md). XLA may still fuse away some entries (a `broadcast_in_dim` of a
constant, such as the zeros autodiff keeps for a `where`, is recomputed for free) and adds
buffers of its own; the compiled step's buffer totals are `train_step`'s peak memory.
"""

import argparse
import collections
import re

import jax
import jax.numpy as jnp
from jax._src import ad_checkpoint
import numpy as np

from aahr_jax.models import aahr
from benchmarks import jax_step
from benchmarks import synthetic_batch
from benchmarks import train_step

_SOURCE = re.compile(r' from (\S+?):(\d+)')
_OPERATION = re.compile(r'^output of (?:jitted function )?\'?([\w]+)')
_FUNCTION = re.compile(r'\(([^()]*)\)\s*$')


def source_of(description: str) -> str:
  """'aahr_jax/models/bert.py:112 BertSelfAttention.__call__' from a residual description."""
  where = _SOURCE.search(description)
  if not where:
    return description[:60]
  path = where.group(1).split('site-packages/')[-1]
  path = path[path.find('aahr_jax/'):] if 'aahr_jax/' in path else path
  function = _FUNCTION.search(description)
  return f"{path}:{where.group(2)} {function.group(1) if function else ''}".strip()


def operation_of(description: str) -> str:
  """The primitive (or jitted function) whose output a residual is: 'mul', 'broadcast_in_dim'."""
  match = _OPERATION.search(description)
  return match.group(1) if match else '?'


def residual_rows(fn, *args) -> list[tuple[str, str, str, int]]:
  """[(source, operation, dtype, bytes)], one per intermediate that autodiff of fn(*args)
  saves for the backward pass (fn's arguments themselves, kept anyway, left out)."""
  rows = []
  for aval, description in ad_checkpoint.saved_residuals(fn, *args):
    if 'from the argument' in description:
      continue
    size = int(np.prod(aval.shape)) * jnp.dtype(aval.dtype).itemsize
    rows.append((source_of(description), operation_of(description),
                 jnp.dtype(aval.dtype).name, size))
  return rows


def step_residuals(config, batch_size: int, tokens: int) -> list[tuple[str, str, str, int]]:
  """[(source, operation, dtype, bytes)] of the query encoders' forward, one per residual."""
  model = aahr.build_model(config.model, config.dtype)
  clip_arch = dict(train_step.CLIP_ARCHS['tiny'], embed_dim=config.model.clip_dim)
  batch = synthetic_batch.make(config, batch_size, tokens, clip_arch)
  batch = {k: jnp.asarray(batch[k]) for k in jax_step.model_fields(batch)}
  variables = jax.eval_shape(lambda: model.init(
      {'params': jax.random.key(0), 'dropout': jax.random.key(1)}, batch, train=True))
  zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
  params, batch_stats = zeros(variables['params']), zeros(variables['batch_stats'])

  def loss(params):
    out, _ = model.apply({'params': params, 'batch_stats': batch_stats}, batch, train=True,
                         rngs={'dropout': jax.random.key(2)}, mutable=['batch_stats'])
    return sum(jnp.sum(out[k].astype(jnp.float32))
               for k in ('img_emb', 'cap_emb', 'img_prefusion', 'cap_prefusion'))

  return residual_rows(loss, params)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', required=True, help='path.py[:args], as main.py takes it')
  parser.add_argument('--batch_size', type=int, default=None)
  parser.add_argument('--tokens', type=int, default=32, help='caption width (BERT tokens)')
  parser.add_argument('--precision', choices=('bf16', 'fp32'), default='bf16')
  parser.add_argument('--tiny', action='store_true', help='CPU-test sizes of the same config')
  parser.add_argument('--top', type=int, default=20)
  args = parser.parse_args(argv)
  config = train_step.load_config(args.config)
  batch_size = args.batch_size or config.batch_size
  config = train_step.prepare_config(config, batch_size, args.tokens, args.tiny)
  config.dtype = 'bfloat16' if args.precision == 'bf16' else 'float32'
  grouped = collections.Counter()
  for source, operation, dtype, size in step_residuals(config, batch_size, args.tokens):
    grouped[(source, operation, dtype)] += size
  total = sum(grouped.values())
  print(f'{args.config}, batch {batch_size} x {args.tokens} tokens, {config.dtype}: the query '
        f'encoders keep {total / 1e6:,.0f} MB for the backward pass')
  print('| MB | share | dtype | output of | made at |\n|---|---|---|---|---|')
  for (source, operation, dtype), size in grouped.most_common(args.top):
    print(f'| {size / 1e6:,.1f} | {size / total:.1%} | {dtype} | {operation} | {source} |')
  return {'total_bytes': total, 'by_source': dict(grouped)}


if __name__ == '__main__':
  main()
