"""Cost of the ECCV Caption / CxC block at COCO-5K size, next to the recall table it joins.

  python -m benchmarks.multi_positive [--dim 1024] [--repeats 2]

On the seeded embeddings of `benchmarks.evaluate` (5,000 images, 25,000 captions, taken in the
library's COCO 5K test order): the recall table from embeddings (`metrics_from_embeddings`),
then `multi_positive.GroundTruth.evaluate` on the same tiles (top-R lists on the device, the
eccv-caption library), then the same on the float64 matrix (the `--results` path). Prints
seconds (the last of `--repeats` runs: compiled) and the peak RSS growth of each step.
"""

import argparse
import os
import time

import numpy as np

from benchmarks import evaluate as evaluate_bench


def peak_growth_mb(before: float) -> float:
  with open('/proc/self/status', encoding='ascii') as f:
    peak = next(int(line.split()[1]) for line in f if line.startswith('VmHWM'))
  return peak / 1024 - before


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dim', type=int, default=1024)
  parser.add_argument('--repeats', type=int, default=2)
  args = parser.parse_args()
  from aahr_jax import evaluate  # pylint: disable=import-outside-toplevel
  from aahr_jax import multi_positive  # pylint: disable=import-outside-toplevel
  images, captions = evaluate_bench.embeddings(5000, args.dim)
  library = multi_positive.library().Metrics()
  image_ids = [library.coco_gts['t2i'][int(c)][0] for c in library.coco_ids[::5]]
  truth = multi_positive.coco_ground_truth(image_ids)

  def measure(name, run):
    for _ in range(args.repeats):
      before = evaluate_bench.rss_mb()
      evaluate_bench.reset_peak_rss()
      start = time.time()
      out = run()
      seconds = time.time() - start
    print(f'{name}: {seconds:.2f} s, peak RSS +{peak_growth_mb(before):.0f} MB', flush=True)
    return out

  _, scores = measure('recall table (5K + 5-fold 1K) from embeddings',
                      lambda: evaluate.metrics_from_embeddings(images, captions, 'coco'))
  result = measure('ECCV + CxC on the same tiles', lambda: truth.evaluate(scores))
  print(f'  lists {result["list_seconds"]:.2f} s, library {result["library_seconds"]:.2f} s; '
        f'depth {result["depth"]}, ties {result["ties"]}')
  matrix = scores.matrix()
  from_matrix = measure('ECCV + CxC on the float64 matrix (--results)',
                        lambda: truth.evaluate(matrix))
  print(f'  same metrics: {from_matrix["metrics"] == result["metrics"]}')
  print({k: round(v, 2) for k, v in result['metrics'].items()})
  print(f'cores: {os.cpu_count()}')


if __name__ == '__main__':
  main()
