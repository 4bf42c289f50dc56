"""Evaluator speed and memory at COCO-5K size: embeddings -> the COCO metric table (5K + 5-fold 1K).

  python -m benchmarks.evaluate [--images 5000] [--dim 1024] [--skip_reference]

Two methods on the same seeded embeddings (5,000 images, 25,000 captions, dimension 1,024),
each in its own child process so that its peak RSS is its own:

  fast:      aahr_jax.evaluate.metrics_from_embeddings (tiled fp32 similarities and rank counting
             under jit, one pass for 5K and the folds); timed cold (with compilation) and warm.
  reference: numpy, the original procedure: float64 embeddings, S = V T^T, then per row
             `np.argsort(S[i])[::-1]` (i2t) and per column (t2i), for the 5K matrix and for the
             five 1K folds (each fold's matrix computed separately, as evalrank does).

Also timed: the bare fp32 matmuls of the same tiles, the floor of any method that computes every
similarity in fp32 (the protocol needs all of them), so the reference's time over it is the
largest speed-up possible on the machine.

Reported: seconds, speed-up, peak RSS (reset after the embeddings are made) and its growth over the
RSS before evaluating (embeddings loaded, JAX started), the tracemalloc peak of host allocations, and the full float64 matrix size (1.0 GB) the
peaks are compared against. The two metric tables must agree (float64 vs fp32 scores can swap
near-ties; the number of differing entries is printed).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDS = 5


def embeddings(n_images: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Unit image vectors and captions = own image + noise (normalised): realistic rank spread."""
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((n_images, dim), dtype=np.float32)
  images /= np.linalg.norm(images, axis=1, keepdims=True)
  captions = np.repeat(images, 5, axis=0) + 0.25 * rng.standard_normal((5 * n_images, dim),
                                                                        dtype=np.float32)
  captions /= np.linalg.norm(captions, axis=1, keepdims=True)
  return images, captions


def rss_mb() -> float:
  with open('/proc/self/statm', encoding='ascii') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


def reset_peak_rss() -> None:
  """Linux: restart the peak-RSS (VmHWM) count, so setup temporaries are not measured."""
  with open('/proc/self/clear_refs', 'w', encoding='ascii') as f:
    f.write('5')


def peak_rss_mb() -> float:
  with open('/proc/self/status', encoding='ascii') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) / 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes; never reset


# --- the original procedure (numpy) ---

def original_ranks(sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  npts = sims.shape[0]
  ranks = np.zeros(npts)
  for index in range(npts):
    inds = np.argsort(sims[index])[::-1]
    ranks[index] = min(np.where(inds == i)[0][0] for i in range(5 * index, 5 * index + 5))
  ranks_t = np.zeros(5 * npts)
  sims_t = sims.T
  for index in range(npts):
    for i in range(5):
      inds = np.argsort(sims_t[5 * index + i])[::-1]
      ranks_t[5 * index + i] = np.where(inds == index)[0][0]
  return ranks, ranks_t


def reference_table(images: np.ndarray, captions: np.ndarray) -> dict:
  from aahr_jax import metrics  # pylint: disable=import-outside-toplevel
  images, captions = images.astype(np.float64), captions.astype(np.float64)
  full = metrics.metrics_from_ranks(*original_ranks(images @ captions.T))
  m = images.shape[0] // FOLDS
  folds = [metrics.metrics_from_ranks(*original_ranks(
      images[f * m:(f + 1) * m] @ captions[5 * f * m:5 * (f + 1) * m].T)) for f in range(FOLDS)]
  return {'all': full, 'fold_mean': metrics.mean_metrics(folds)}


def fast_table(images: np.ndarray, captions: np.ndarray) -> dict:
  from aahr_jax import evaluate  # pylint: disable=import-outside-toplevel
  results, _ = evaluate.metrics_from_embeddings(images, captions, 'coco')
  return {'all': results['all'], 'fold_mean': results['fold_mean']}


def matmul_floor(images: np.ndarray, captions: np.ndarray) -> float:
  """Seconds of the bare fp32 similarity matmuls (the same 1K x 5K tiles, no counting): what any
  method that computes every similarity in fp32 needs at least, on this machine."""
  import jax  # pylint: disable=import-outside-toplevel
  from aahr_jax import blockwise_ranks  # pylint: disable=import-outside-toplevel
  m = images.shape[0] // FOLDS
  image_tiles = [jax.device_put(images[f * m:(f + 1) * m]) for f in range(FOLDS)]
  caption_tiles = [jax.device_put(captions[5 * f * m:5 * (f + 1) * m]) for f in range(FOLDS)]
  jax.block_until_ready(blockwise_ranks._tile_scores(image_tiles[0], caption_tiles[0]))  # pylint: disable=protected-access
  best = float('inf')
  for _ in range(3):
    start = time.perf_counter()
    for a in image_tiles:
      jax.block_until_ready([blockwise_ranks._tile_scores(a, b) for b in caption_tiles])  # pylint: disable=protected-access
    best = min(best, time.perf_counter() - start)
  return best


# --- one method in this process ---

def child(method: str, n_images: int, dim: int) -> None:
  images, captions = embeddings(n_images, dim)
  if method == 'fast':
    import jax  # pylint: disable=import-outside-toplevel
    jax.numpy.zeros(1).block_until_ready()  # runtime up before the baseline RSS
  rss_before = rss_mb()
  reset_peak_rss()
  tracemalloc.start()
  run = fast_table if method == 'fast' else reference_table
  start = time.perf_counter()
  table = run(images, captions)
  seconds = [time.perf_counter() - start]
  peaks = [peak_rss_mb()]
  if method == 'fast':  # warm: compiled
    start = time.perf_counter()
    table = run(images, captions)
    seconds.append(time.perf_counter() - start)
    peaks.append(peak_rss_mb())
  traced_peak = tracemalloc.get_traced_memory()[1] / 2**20
  tracemalloc.stop()
  floor = matmul_floor(images, captions) if method == 'fast' else None
  print(json.dumps({'method': method, 'seconds': seconds, 'matmul_floor_s': floor, 'rss_before_mb': rss_before,
                    'peak_rss_mb': peaks[0], 'peak_rss_mb_both_runs': peaks[-1], 'tracemalloc_peak_mb': traced_peak,
                    'table': table}))


def run_child(method: str, args) -> dict:
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get('JAX_PLATFORMS', 'cpu'))
  out = subprocess.run([sys.executable, '-m', 'benchmarks.evaluate', '--child', method,
                        '--images', str(args.images), '--dim', str(args.dim)], cwd=ROOT, env=env,
                       capture_output=True, text=True, check=False)
  if out.returncode:
    raise RuntimeError(f'{method} child failed:\n{out.stderr[-3000:]}')
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--images', type=int, default=5000)
  parser.add_argument('--dim', type=int, default=1024)
  parser.add_argument('--skip_reference', action='store_true')
  parser.add_argument('--child', choices=('fast', 'reference'), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args.child, args.images, args.dim)
    return
  matrix_mb = args.images * 5 * args.images * 8 / 2**20
  print(f'{args.images} images x {5 * args.images} captions, dim {args.dim}; one float64 '
        f'similarity matrix = {matrix_mb:.0f} MB; {os.cpu_count()} CPU cores')
  fast = run_child('fast', args)
  print(f'fast (jax tiles + counting): cold {fast["seconds"][0]:.2f} s, warm '
        f'{fast["seconds"][1]:.2f} s; peak RSS of the cold run {fast["peak_rss_mb"]:.0f} MB (+'
        f'{fast["peak_rss_mb"] - fast["rss_before_mb"]:.0f} MB over {fast["rss_before_mb"]:.0f} '
        f'MB before), after both runs {fast["peak_rss_mb_both_runs"]:.0f} MB; tracemalloc peak '
        f'{fast["tracemalloc_peak_mb"]:.0f} MB')
  print(f'bare fp32 similarity matmuls (the same tiles, nothing else): '
        f'{fast["matmul_floor_s"]:.2f} s; the warm evaluator takes '
        f'{fast["seconds"][1] / fast["matmul_floor_s"]:.2f}x that')
  if args.skip_reference:
    return
  ref = run_child('reference', args)
  print(f'reference (numpy float64 argsort): {ref["seconds"][0]:.2f} s; peak RSS '
        f'{ref["peak_rss_mb"]:.0f} MB (+{ref["peak_rss_mb"] - ref["rss_before_mb"]:.0f} MB), '
        f'tracemalloc peak {ref["tracemalloc_peak_mb"]:.0f} MB')
  print(f'speed-up: {ref["seconds"][0] / fast["seconds"][0]:.1f}x cold, '
        f'{ref["seconds"][0] / fast["seconds"][1]:.1f}x warm; the bare matmuls alone would be '
        f'{ref["seconds"][0] / fast["matmul_floor_s"]:.1f}x (the ceiling for exact fp32 scores)')
  for block in ('all', 'fold_mean'):
    differing = {k: (fast['table'][block][k], ref['table'][block][k])
                 for k in fast['table'][block]
                 if abs(fast['table'][block][k] - ref['table'][block][k]) > 1e-9}
    print(f'{block}: rsum fast {fast["table"][block]["rsum"]:.2f} reference '
          f'{ref["table"][block]["rsum"]:.2f}; differing entries: {differing or "none"}')


if __name__ == '__main__':
  main()
