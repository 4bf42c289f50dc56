"""AAHR training step: JAX vs the PyTorch reference, same config and inputs, one process.

  python -m benchmarks.train_step --config configs/coco.py --batch_size 256 --steps 20 \
      [--json out.json] [--markdown out.md] [--variants jax_cached,torch_eager,...]
  python -m benchmarks.train_step --config configs/demo.py:model=aahr --steps 3   # CPU

Variants:
  jax_cached      the trainer's step (aahr_jax/aahr_step.py), CLIP features as inputs (default)
  jax_cached_scan the same with BERT's 12 layers as one scanned layer (config.model.bert_scan):
                  faster to compile, slower to run (stacking the layers' residuals)
  jax_online      the Flax CLIP towers run inside the step on raw images and CLIP tokens
  torch_eager     benchmarks/torch_reference (CLIP inside the step), eager, bf16 autocast
  torch_compiled  the same under torch.compile

Every loss term is on (relation module, SwAV, InfoNCE: the steady state after 8,000 steps).
Timing, after compilation and a warm-up step: `ms/step` is the mean over `--steps` steps run as
the trainer runs them (JAX: the next step dispatched before the previous step's metrics are read;
PyTorch: back to back, its own per-step NaN check syncing as in the original), synchronised at
the end; `synced ms/step` is the median of steps each ended by block_until_ready /
cuda.synchronize (latency: host dispatch not overlapped). JAX runs its ahead-of-time compiled
executable with the state donated, checks that the output state has the input's signature and
counts backend compilations during the timed steps (must be 0). Model FLOPs per step come from
benchmarks/step_flops.py (the formulas are written there); MFU = FLOPs / time / the measured
matmul peak of the device (a large bf16 matmul, or fp32 with --precision fp32). Peak memory:
XLA's buffer assignment of the step (JAX), torch.cuda.max_memory_allocated (PyTorch).
`--time_budget` skips the variants that would start after it has run out (and says so).
`--cache_dir D` keeps JAX's and inductor's compilation caches under D: a second run on the same
machine (the suite rerun, another batch of steps) loads the compiled steps instead of compiling.
"""

import argparse
import copy
import importlib.util
import json
import os
import platform
import sys
import time
import traceback

os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # PyTorch shares the GPU
from aahr_jax import host_malloc  # pylint: disable=wrong-import-position

host_malloc.configure()  # as main.py: both libraries reuse freed host memory (host_malloc.py)

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from benchmarks import jax_parts  # pylint: disable=wrong-import-position
from benchmarks import jax_step  # pylint: disable=wrong-import-position
from benchmarks import step_flops  # pylint: disable=wrong-import-position
from benchmarks import synthetic_batch  # pylint: disable=wrong-import-position

VARIANTS = ('jax_cached', 'jax_cached_scan', 'jax_online', 'torch_eager', 'torch_compiled')
DEFAULT_VARIANTS = ('jax_cached', 'jax_online', 'torch_eager', 'torch_compiled')
# CLIP towers (OpenCLIP names): ViT-B/32 as AAHR uses it, the demo's small CLIP, a tiny one.
CLIP_ARCHS = {
    'vit_b_32': dict(embed_dim=512, image_size=224, patch_size=32, vision_width=768,
                     vision_layers=12, vision_heads=12, context_length=77, vocab_size=49408,
                     text_width=512, text_heads=8, text_layers=12),
    'demo': dict(embed_dim=512, image_size=64, patch_size=16, vision_width=64, vision_layers=2,
                 vision_heads=2, context_length=77, vocab_size=49408, text_width=64,
                 text_heads=2, text_layers=2),
    'tiny': dict(embed_dim=32, image_size=32, patch_size=16, vision_width=32, vision_layers=1,
                 vision_heads=2, context_length=77, vocab_size=49408, text_width=32,
                 text_heads=2, text_layers=1),
}
# Seconds a variant takes on an H200 at COCO batch 256, compilation included (measured
# 2026-11-27 with BERT scanned; the unrolled BERT and jax_online never ran there, their figures
# are guesses): with --time_budget a variant starts only if this much time is left.
EXPECTED_S = {'jax_cached': 150, 'jax_cached_scan': 120, 'jax_online': 150, 'torch_eager': 20,
              'torch_compiled': 160}
_compiles = [0]


def _count_compiles(event: str, *args, **kwargs) -> None:
  del args, kwargs
  if 'backend_compile' in event:
    _compiles[0] += 1


def log(message: str) -> None:
  """Progress on stderr with a timestamp: a run killed by its time limit shows where it was."""
  print(f'[{time.strftime("%H:%M:%S")}] {message}', file=sys.stderr, flush=True)


def load_config(spec: str):
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('bench_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def shrink(config) -> None:
  """--tiny: the config's structure at CPU-test sizes (every part still runs)."""
  config.data.region_dim = 48
  m = config.model
  m.embed_size, m.region_hidden, m.num_heads, m.clip_dim = 64, 32, 4, 32
  m.bert = dict(m.bert, vocab_size=2000, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
  config.relation.num_heads = 4
  config.loss.nmb_prototypes = 16


def prepare_config(config, batch_size: int, tokens: int, tiny: bool):
  """Batch size, every loss gate open from step 0, static token width = `tokens`."""
  config.batch_size = batch_size
  if tiny:
    shrink(config)
  config.relation.warmup = 0
  config.loss.freeze_prototypes_niters = 0
  m = config.moco.queue_length
  config.moco.queue_length = max(batch_size, -(-m // batch_size) * batch_size)
  config.data.max_len = tokens
  return config


def matmul_peak(precision: str) -> float:
  """Measured FLOP/s of a large square matmul in the step's precision (torch: cuBLAS / CPU)."""
  import torch  # pylint: disable=import-outside-toplevel
  cuda = torch.cuda.is_available()
  n, reps = (8192, 20) if cuda else (1024, 5)
  dtype = torch.bfloat16 if precision == 'bf16' and cuda else torch.float32
  device = 'cuda' if cuda else 'cpu'
  a = torch.randn(n, n, device=device, dtype=dtype)
  b = torch.randn(n, n, device=device, dtype=dtype)
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  for _ in range(3):
    a @ b
  sync()
  start = time.perf_counter()
  for _ in range(reps):
    a @ b
  sync()
  torch_peak = 2 * n**3 * reps / (time.perf_counter() - start)
  if cuda:
    return torch_peak
  x = jax.numpy.ones((2 * n, 2 * n), jnp.float32)  # XLA's CPU matmul can beat torch's here
  matmul = jax.jit(lambda a: a @ a)
  jax.block_until_ready(matmul(x))
  start = time.perf_counter()
  for _ in range(reps):
    jax.block_until_ready(matmul(x))
  return max(torch_peak, 2 * (2 * n)**3 * reps / (time.perf_counter() - start))


def jax_precision(precision: str):
  """The matmul precision of fp32 dots: bf16 runs use config.dtype = 'bfloat16' (bf16 matmuls
  in the encoders, fp32 parameters, losses and softmaxes) and leave the remaining fp32 dots at
  the backend default; fp32 runs ask for full fp32."""
  return jax.default_matmul_precision(None if precision == 'bf16' else 'float32')


def run_jax(variant: str, config, batch: dict, clip_arch: dict, steps: int, precision: str,
            trace: str = '', parts: bool = False):
  if variant == 'jax_cached_scan':
    config = copy.deepcopy(config)
    config.model.bert_scan = True
  with jax_precision(precision):
    online = variant == 'jax_online'
    fields = (synthetic_batch.online_fields if online else synthetic_batch.cached_fields)(batch)
    device_batch = jax.device_put(fields)
    model, tx, schedule, state = jax_step.create_state(config, device_batch)
    if online:
      clip = jax_step.clip_module(clip_arch, jnp.bfloat16 if precision == 'bf16' else jnp.float32)
      clip_params = jax.jit(lambda r: clip.init(r, device_batch['images'][:1],
                                                device_batch['clip_tokens'][:1]))(
                                                    jax.random.PRNGKey(1))['params']
      fn, rest = jax_step.online_step(model, tx, config, schedule, clip), (clip_params,
                                                                           device_batch)
    else:
      fn, rest = jax_step.cached_step(model, tx, config, schedule), (device_batch,)
    jax.block_until_ready(state)
    log(f'{variant}: state ready; compiling the step')
    start = time.perf_counter()
    compiled = jax_step.compile_step(fn, state, *rest)
    compile_s = time.perf_counter() - start
    log(f'{variant}: compiled in {compile_s:.0f} s')
  before = jax.eval_shape(lambda s: s, state)
  state, metrics = compiled(state, *rest)
  jax.block_until_ready(state)
  jax_step.check_same_avals(before, jax.eval_shape(lambda s: s, state))
  compiles = _compiles[0]
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, *rest)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  synced = float(np.median(times))
  # As the trainer runs: the next step is dispatched before the previous one's metrics are read
  # (one step late), so host dispatch overlaps the device's work.
  pending = None
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, *rest)
    if pending is not None:
      int(pending['skipped'])
    pending = metrics
  jax.block_until_ready(state)
  seconds = (time.perf_counter() - start) / max(steps, 1)
  recompiles = _compiles[0] - compiles
  loss = float(metrics['loss'])
  if trace:
    try:  # optional: a profiler problem must not cost the variant its timing
      state = write_trace(trace, compiled, state, rest)
    except Exception:  # pylint: disable=broad-except
      traceback.print_exc()
  parts_ms = None
  if parts:
    with jax_precision(precision):
      parts_ms = jax_parts.time_parts(config, model, tx, state, rest[-1], steps)
  return {'parts_ms': parts_ms, 'ms': 1e3 * seconds, 'ms_synced': 1e3 * synced,
          'bert_scan': bool(config.model.bert_scan),
          'compile_s': compile_s,
          'memory_bytes': jax_step.memory_bytes(compiled), 'xla_flops': jax_step.xla_flops(compiled),
          'recompiles': recompiles, 'loss': loss,
          'skipped_steps': int(metrics['skipped'])}


def write_trace(prefix: str, compiled, state, rest):
  """A profiler trace of three steps (perfetto JSON) and the optimised HLO, whose op_name
  metadata maps every fusion of the trace back to the model's name stack."""
  import glob  # pylint: disable=import-outside-toplevel
  import gzip  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  import tempfile  # pylint: disable=import-outside-toplevel
  with gzip.open(prefix + '.hlo.txt.gz', 'wt', encoding='utf-8') as f:
    f.write(compiled.as_text())
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(3):
        state, _ = compiled(state, *rest)
      jax.block_until_ready(state)
    found = glob.glob(os.path.join(tmp, '**', '*trace.json.gz'), recursive=True)
    if found:
      shutil.copy(found[0], prefix + '.trace.json.gz')
  return state


def run_torch(variant: str, config, batch: dict, clip_arch: dict, steps: int, precision: str,
              trace: str = '', parts: bool = False):
  del trace, parts
  import torch  # pylint: disable=import-outside-toplevel
  from benchmarks.torch_reference import step as ref  # pylint: disable=import-outside-toplevel
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
  sizes = ref.sizes_from_config(config, clip_arch)
  model = ref.ReferenceStep(sizes, device, precision, compile=variant == 'torch_compiled')
  inputs = ref.torch_batch(batch, device)
  log(f'{variant}: model ready; first step' + (' (compiles)' if 'compiled' in variant else ''))
  start = time.perf_counter()
  model.step(inputs)  # compiles under torch.compile
  sync()
  compile_s = time.perf_counter() - start
  model.step(inputs)
  sync()
  if device == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    loss = model.step(inputs)
    sync()
    times.append(time.perf_counter() - start)
  start = time.perf_counter()
  for _ in range(steps):  # back to back (the step's own NaN check still syncs every step)
    loss = model.step(inputs)
  sync()
  seconds = (time.perf_counter() - start) / max(steps, 1)
  memory = torch.cuda.max_memory_allocated() if device == 'cuda' else None
  result = {'ms': 1e3 * seconds, 'ms_synced': 1e3 * float(np.median(times)),
            'compile_s': compile_s, 'memory_bytes': memory, 'loss': float(loss)}
  del model
  if device == 'cuda':
    torch.cuda.empty_cache()
  return result


def use_caches(directory: str) -> None:
  """Persistent compilation caches under `directory` (set before torch compiles anything)."""
  jax.config.update('jax_compilation_cache_dir', os.path.join(directory, 'jax'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
  os.environ.setdefault('TORCHINDUCTOR_CACHE_DIR', os.path.join(directory, 'inductor'))
  os.environ.setdefault('TRITON_CACHE_DIR', os.path.join(directory, 'triton'))


def software() -> dict:
  versions = {'python': platform.python_version(), 'jax': jax.__version__}
  for name in ('jaxlib', 'flax', 'optax', 'torch', 'transformers', 'open_clip'):
    try:
      versions[name] = importlib.import_module(name).__version__
    except Exception:  # pylint: disable=broad-except
      versions[name] = 'n/a'
  return versions


def device_name() -> str:
  d = jax.devices()[0]
  return f'{d.platform}: {getattr(d, "device_kind", d)}'


def table(report: dict) -> str:
  rows = report['results']
  measured = {r['variant']: r for r in rows if r.get('ms')}
  base_name = next((v for v in ('jax_cached', 'jax_cached_scan') if v in measured), None)
  lines = [f"AAHR train step, {report['config']}, batch {report['batch_size']}, "
           f"{report['regions']} regions x {report['tokens']} tokens, {report['precision']}"
           f"{', BERT scanned' if report.get('bert_scan') else ''}, "
           f"{report['device']}; measured matmul peak {report['peak_tflops']:.3g} TFLOP/s",
           '| variant | ms/step | synced ms/step | examples/s | model TFLOP/step | TFLOP/s | MFU '
           f'| peak memory GiB | compile s | {base_name or "jax_cached"} speed-up | notes |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    if not r.get('ms'):
      lines.append(f"| {r['variant']} | - | - | - | - | - | - | - | - | - | {r.get('note', '')} |")
      continue
    tflops = r['flops'] / r['ms'] * 1e-9
    memory = f"{r['memory_bytes'] / 2**30:.2f}" if r.get('memory_bytes') else 'n/a'
    speedup = f"{r['ms'] / measured[base_name]['ms']:.2f}x" if base_name else 'n/a'
    lines.append(
        f"| {r['variant']} | {r['ms']:.1f} | {r.get('ms_synced', float('nan')):.1f} | "
        f"{1e3 * report['batch_size'] / r['ms']:.0f} | "
        f"{r['flops'] / 1e12:.3g} | {tflops:.3g} | {100 * tflops / report['peak_tflops']:.1f}% | "
        f"{memory} | {r['compile_s']:.0f} | {speedup} | {r.get('note', '')} |")
  for r in rows:
    if r.get('parts_ms'):
      total = sum(r['parts_ms'].values())
      lines.append(f"\n{r['variant']} parts, each jitted alone (ms; sum {total:.1f} vs the "
                   f"step's {r['ms']:.1f}): " + ', '.join(f'{k} {v:.1f}' for k, v in
                                                       r['parts_ms'].items()))
  return '\n'.join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', required=True, help='path.py[:args], as main.py takes it')
  parser.add_argument('--batch_size', type=int, default=None)
  parser.add_argument('--steps', type=int, default=10, help='timed steps per variant')
  parser.add_argument('--tokens', type=int, default=32, help='caption width (BERT tokens)')
  parser.add_argument('--variants', default='',
                      help='comma-separated, from ' + ','.join(VARIANTS) + '; default: '
                           'all but jax_cached_scan on a GPU, also without torch_compiled on '
                           "the CPU (inductor's C++ build takes minutes there)")
  parser.add_argument('--precision', choices=('bf16', 'fp32'), default=None,
                      help='default: bf16 on a GPU, fp32 on the CPU')
  parser.add_argument('--clip', choices=('auto',) + tuple(CLIP_ARCHS), default='auto')
  parser.add_argument('--tiny', action='store_true', help='CPU-test sizes of the same config')
  parser.add_argument('--time_budget', type=float, default=0, help='seconds; 0 = no limit')
  parser.add_argument('--expected_scale', type=float, default=1.0,
                      help='scales EXPECTED_S (0: start every variant while budget is left)')
  parser.add_argument('--trace', default='',
                      help='write a jax.profiler trace of 3 jax_cached steps and the optimised '
                           'HLO under this prefix (PREFIX.trace.json.gz, PREFIX.hlo.txt.gz)')
  parser.add_argument('--bert_scan', action='store_true',
                      help='config.model.bert_scan for every JAX variant: one scanned BERT '
                           'layer (faster to compile; the variant jax_cached_scan does this '
                           'for itself only)')
  parser.add_argument('--parts', action='store_true',
                      help='also time the parts of the jax_cached step (benchmarks/jax_parts.py)')
  parser.add_argument('--cache_dir', default='',
                      help="persistent compilation caches: JAX's under DIR/jax, inductor's under "
                           'DIR/inductor (a later run with the same DIR skips compilation)')
  parser.add_argument('--json', default='')
  parser.add_argument('--markdown', default='')
  args = parser.parse_args(argv)
  unknown = [v for v in args.variants.split(',') if v and v not in VARIANTS]
  if unknown:  # before any measuring
    parser.error(f'unknown variant(s) {unknown}; known: {", ".join(VARIANTS)}')
  if args.batch_size is not None and args.batch_size < 1:
    parser.error(f'--batch_size {args.batch_size}: expected a positive batch size')
  if not os.path.isfile(args.config.partition(':')[0]):
    parser.error(f'config file not found: {args.config.partition(":")[0]}')
  start = time.time()
  if args.cache_dir:
    use_caches(args.cache_dir)
  jax.monitoring.register_event_duration_secs_listener(_count_compiles)
  config = load_config(args.config)
  batch_size = args.batch_size or config.batch_size
  config = prepare_config(config, batch_size, args.tokens, args.tiny)
  gpu = jax.devices()[0].platform == 'gpu'
  precision = args.precision or ('bf16' if gpu else 'fp32')
  config.dtype = 'bfloat16' if precision == 'bf16' else 'float32'
  config.model.bert_scan = args.bert_scan
  clip_name = args.clip if args.clip != 'auto' else (
      'tiny' if args.tiny else 'vit_b_32' if config.model.clip_checkpoint else 'demo')
  clip_arch = dict(CLIP_ARCHS[clip_name], embed_dim=config.model.clip_dim)
  batch = synthetic_batch.make(config, batch_size, args.tokens, clip_arch)
  regions = config.data.num_regions
  train_flops = step_flops.step_flops(config, batch_size, regions, args.tokens)
  online_flops = step_flops.step_flops(config, batch_size, regions, args.tokens, clip_arch)
  report = {'config': args.config + (' (tiny)' if args.tiny else ''), 'batch_size': batch_size,
            'regions': regions, 'tokens': args.tokens, 'precision': precision,
            'clip': clip_name, 'device': device_name(), 'software': software(),
            'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
            'flops_parts': {'cached': train_flops, 'online': online_flops},
            'bert_scan': args.bert_scan,
            'peak_tflops': matmul_peak(precision) / 1e12, 'results': []}
  log(f"batch {batch_size}: measured matmul peak {report['peak_tflops']:.0f} TFLOP/s")

  def save():
    if args.json:
      with open(args.json, 'w', encoding='utf-8') as f:
        json.dump(report, f, indent=1)
    if args.markdown:
      with open(args.markdown, 'w', encoding='utf-8') as f:
        f.write(table(report) + '\n')

  variants = args.variants.split(',') if args.variants else list(DEFAULT_VARIANTS)
  for variant in variants:
    row = {'variant': variant,
           'flops': (train_flops if variant.startswith('jax_cached') else
                     online_flops)['total']}
    if not args.variants and not gpu and variant == 'torch_compiled':
      row['note'] = 'not run on the CPU by default (--variants ...,torch_compiled runs it)'
      report['results'].append(row)
      continue
    left = args.time_budget - (time.time() - start)
    log(f'{variant}: start')
    if args.time_budget and left < EXPECTED_S[variant] * args.expected_scale:
      row['note'] = (f'skipped: {max(left, 0):.0f} s of the {args.time_budget:.0f} s budget '
                     'left, too little to compile and run it')
    else:
      runner = run_jax if variant.startswith('jax') else run_torch
      try:
        trace = args.trace if variant == 'jax_cached' else ''
        row.update(runner(variant, config, batch, clip_arch, args.steps, precision, trace,
                          args.parts and variant == 'jax_cached'))
        if variant.startswith('jax'):
          row['note'] = f"recompilations after step 1: {row['recompiles']}"
          assert row['recompiles'] == 0, 'the JAX step recompiled after its first call'
        if variant.startswith('torch'):
          row['note'] = 'CLIP towers run twice (query and key encoders), as the original'
      except Exception as e:  # pylint: disable=broad-except
        traceback.print_exc()
        row.pop('ms', None)
        row['note'] = f'failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ""}'
    report['results'].append(row)
    print(f"{variant}: {row.get('ms', float('nan')):.1f} ms/step {row.get('note', '')}",
          flush=True)
    save()
  print(table(report), flush=True)
  save()
  return report


if __name__ == '__main__':
  sys.exit(0 if main() else 1)
