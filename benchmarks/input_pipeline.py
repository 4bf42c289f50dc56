"""Training input pipeline throughput in captions/s per CPU core (target >= 5,000).

    python -m benchmarks.input_pipeline [--images 2000] [--dim 2048] [--batch 128] [--dtype float32]

Builds a synthetic SCAN-layout split of BUTD-sized regions (36 x dim), then times the training
transform on one thread: caption permutation, word-level augmentation and [CLS]/[SEP] padding of
pre-tokenised captions, region dropout with the regions gathered from the memory map, batching.
One-time costs (the build, tokenising the split once) are reported separately.
"""

import argparse
import os
import tempfile
import time

from input_pipeline import loader
from input_pipeline import synthetic
from input_pipeline.builders import scan_precomp


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--images', type=int, default=2000)
  parser.add_argument('--dim', type=int, default=2048)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--steps', type=int, default=60)
  parser.add_argument('--dtype', default='float32', choices=scan_precomp.FEATURE_DTYPES)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    raw = os.path.join(tmp, 'raw')
    synthetic.generate(raw, seed=0, splits={'train': args.images}, region_dim=args.dim,
                       render_images=False, progress=False)
    start = time.time()
    builder = scan_precomp.build(raw, os.path.join(tmp, 'tfds'), 'butd', region_dim=args.dim,
                                 feature_dtype=args.dtype, progress=False)
    split = loader.SplitSource(builder.as_data_source('train'))
    print(f'build: {time.time() - start:.1f}s for {args.images:,} images')
    start = time.time()
    tokens = split.tokens()
    print(f'tokenise once: {(time.time() - start) / split.num_captions * 1e6:.1f} us/caption')
    make = loader._TrainBatch(  # pylint: disable=protected-access
        split, batch_size=args.batch, seed=0, text=loader.TextOptions(max_len=64),
        size_augment=True, word_augment=True, local_batch=args.batch, process_index=0)
    for step in range(5):   # warm the page cache and the permutation
      make(step)
    start = time.time()
    for step in range(args.steps):
      make(step)
    per_core = args.steps * args.batch / (time.time() - start)
    print(f'training transform ({args.dtype} regions 36x{args.dim}, batch {args.batch}, one '
          f'thread): {per_core:,.0f} captions/s per core (target >= 5,000)')
    assert tokens.pieces.size


if __name__ == '__main__':
  main()
