"""The one entry point.

  python main.py --config configs/demo.py --workdir runs/demo                 # train + evaluate
  python main.py --config configs/demo.py --workdir runs/demo --mode eval     # re-evaluate
  python main.py --config configs/gpo_f30k.py:batch_size=64 --config.optim.lr=2e-4 ...
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path.py[:args]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'build_data'], 'What to do.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None,
                                  '--mode eval: checkpoint step to evaluate (default: latest).')

# Errors that mean "the user's input is wrong": one line on stderr and exit status 2.
EXIT_BAD_INPUT = 2


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config is required, e.g. --config configs/demo.py')
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required')
  os.environ.setdefault('HF_HUB_OFFLINE', '1')
  logging.set_verbosity(logging.WARNING)  # orbax and tfds log every file they touch at INFO
  # Imports after flag parsing keep `--help` fast.
  from aahr_jax import train  # pylint: disable=import-outside-toplevel
  from input_pipeline import datasets  # pylint: disable=import-outside-toplevel
  try:
    if _MODE.value == 'train':
      train.train_and_evaluate(config, _WORKDIR.value)
    elif _MODE.value == 'eval':
      train.evaluate_checkpoint(config, _WORKDIR.value, _CHECKPOINT.value)
    elif _MODE.value == 'build_data':
      builder = datasets.build(config, _WORKDIR.value)
      print(f'Built {builder.info.full_name} at {builder.data_dir}: '
            + ', '.join(f'{k} {v.num_examples} images' for k, v in builder.info.splits.items()))
  except (datasets.DataError, FileNotFoundError, KeyError) as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f'error: {message}', file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


if __name__ == '__main__':
  app.run(main)
