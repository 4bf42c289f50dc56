"""The command line of main.py and of the `aahr-jax` console command (pyproject.toml).

  python main.py --config configs/demo.py --workdir runs/demo                 # train + evaluate
  aahr-jax --config configs/demo.py --workdir runs/demo --mode eval           # the same, installed
  python main.py --workdir runs/demo --mode search --query "a red circle" --top_k 5
  python main.py --workdir runs/demo --mode encode_texts --texts my_texts.txt --out my_texts.npy
  python main.py --config configs/gpo_f30k.py:batch_size=64 --config.optim.lr=2e-4 ...
"""

import os
import sys

from aahr_jax import host_malloc

host_malloc.configure()  # before any library starts a thread (aahr_jax/host_malloc.py)

# pylint: disable=wrong-import-position
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path.py[:args]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
MODES = {
    'train': 'train, keep the best checkpoint, evaluate it (default)',
    'eval': 'evaluate checkpoints by the original protocol',
    'build_data': 'build the tfds dataset from config.data.manual_dir',
    'clip_cache': 'cache the frozen-CLIP features of every image',
    'verify_data': 'check the raw data files, V1-V14 (docs/data.md)',
    'search': 'rank the test images for --query',
    'encode_texts': 'embed the lines of --texts into --out (.npy)',
}
_MODE = flags.DEFINE_enum('mode', 'train', list(MODES), 'What to do:\n' + '\n'.join(
    f'  {name}: {line}' for name, line in MODES.items()))
_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', None, '--mode eval/search/encode_texts: checkpoint step, "latest" or "best" '
    '(default: best if recorded, else latest); for eval several comma-separated steps or paths '
    '(workdirs, converted checkpoints) evaluate their ensemble.')
_RESULTS = flags.DEFINE_string('results', None, '--mode eval: re-score results_*.npy files '
                               '(comma-separated: their ensemble) with the original procedure.')
_QUERY = flags.DEFINE_string('query', None, '--mode search: the text to search images for.')
_TOP_K = flags.DEFINE_integer('top_k', 10, '--mode search: how many images to list.')
_TEXTS = flags.DEFINE_string('texts', None, '--mode encode_texts: a UTF-8 file, one text per '
                             'line.')
_OUT = flags.DEFINE_string('out', None, '--mode encode_texts: where to write the embeddings '
                           '(.npy, float32, with a .json of metadata beside it).')
_FRESH = flags.DEFINE_bool('fresh', False, '--mode train: start from scratch; refuses a workdir '
                           'that holds a run unless --overwrite is given too.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'With --fresh: delete the existing run first.')
_COMPILATION_CACHE = flags.DEFINE_string(
    'compilation_cache_dir', None, "JAX's persistent compilation cache, so that resumed and "
    'repeated runs skip compiling (default: $JAX_COMPILATION_CACHE_DIR, else '
    '~/.cache/aahr_jax/xla, at most 4 GiB); "off" disables it.')
# Multi-process runs (docs/scaling.md): one command per host / task.
_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', 'auto', ['auto', 'on', 'off'],
    'auto: join other processes when the flags below, JAX_COORDINATOR_ADDRESS, a multi-task '
    'SLURM step or a multi-host TPU slice say so; on: always call jax.distributed.initialize() '
    '(JAX detects the cluster); off: never.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'HOST:PORT of process 0 (with --num_processes, --process_id).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes - 1.')

# Errors that mean "the user's input is wrong": one line on stderr and exit status 2.
EXIT_BAD_INPUT = 2


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  if config is None and _MODE.value not in ('search', 'encode_texts'):  # they read the workdir's
    raise app.UsageError('--config is required, e.g. --config configs/demo.py')
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required')
  os.environ.setdefault('HF_HUB_OFFLINE', '1')
  logging.set_verbosity(logging.WARNING)  # orbax and tfds log every file they touch at INFO
  from aahr_jax import multihost  # pylint: disable=import-outside-toplevel
  try:  # before anything touches a JAX backend
    multihost.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                         _PROCESS_ID.value)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
  from aahr_jax import compilation_cache  # pylint: disable=import-outside-toplevel
  compilation_cache.enable(_COMPILATION_CACHE.value)  # before the first compilation
  # Imports after flag parsing keep `--help` fast.
  from aahr_jax import train  # pylint: disable=import-outside-toplevel
  from aahr_jax import eval_modes  # pylint: disable=import-outside-toplevel
  from input_pipeline import datasets  # pylint: disable=import-outside-toplevel
  user_errors = (datasets.DataError, FileNotFoundError, FileExistsError, KeyError, OSError)
  if _MODE.value in ('train', 'eval', 'search', 'encode_texts'):  # bad configs, checkpoints, ...
    user_errors += (ValueError,)
  try:
    if _MODE.value == 'train':
      train.train_and_evaluate(config, _WORKDIR.value, fresh=_FRESH.value,
                               overwrite=_OVERWRITE.value)
    elif _MODE.value == 'eval':
      eval_modes.run_eval(config, _WORKDIR.value, eval_modes.split_list(_CHECKPOINT.value),
                          eval_modes.split_list(_RESULTS.value))
    elif _MODE.value == 'search':
      eval_modes.run_search(_WORKDIR.value, _QUERY.value, _TOP_K.value, _CHECKPOINT.value)
    elif _MODE.value == 'encode_texts':
      eval_modes.run_encode_texts(_WORKDIR.value, _TEXTS.value, _OUT.value, _CHECKPOINT.value)
    elif _MODE.value == 'build_data':
      builder = datasets.build(config, _WORKDIR.value)
      print(f'Built {builder.info.full_name} at {builder.data_dir}: '
            + ', '.join(f'{k} {v.num_examples} images' for k, v in builder.info.splits.items()))
    elif _MODE.value == 'clip_cache':
      from input_pipeline import clip_cache  # pylint: disable=import-outside-toplevel
      print(f'CLIP features ready in {clip_cache.build(config, _WORKDIR.value)}')
    elif _MODE.value == 'verify_data':
      from input_pipeline import verify  # pylint: disable=import-outside-toplevel
      sys.exit(verify.main(config, _WORKDIR.value))
  except train.TrainingStopped as e:
    print(f'error: {e}' if e.exit_code != train.EXIT_PREEMPTED else str(e), file=sys.stderr)
    sys.exit(e.exit_code)
  except user_errors as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f'error: {message}', file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def _config_value(argv) -> str | None:
  """The --config flag's value (path.py[:args]) in argv, if given."""
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith('--config='):
      return arg[len('--config='):]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def parse_flags(argv):
  """absl flag parsing with one-line errors for bad configs and overrides (no tracebacks)."""
  value = _config_value(argv)
  if value is not None and not os.path.isfile(value.split(':')[0]):
    print(f'error: config file not found: {value.split(":")[0]} (--config expects a path such '
          'as configs/demo.py, optionally followed by :key=value,...)', file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
  try:
    return flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, ValueError, TypeError) as e:
    detail = str(e.args[0]) if e.args else str(e)
    if 'Traceback (most recent call last)' in detail:  # the config file's get_config() raised
      raised = [line for line in detail.splitlines() if line.strip()][-1]  # 'ValueError: ...'
      print(f'error: invalid --config {value}: {raised.split(": ", 1)[-1]}', file=sys.stderr)
      sys.exit(EXIT_BAD_INPUT)
    culprit = [a for a in argv[1:] if a.startswith('--config')
               and detail.strip('"\'').split("'")[-1] in a]
    if culprit and isinstance(e, (KeyError, AttributeError)):
      detail = f'no such config field {detail.strip(chr(34))} (see the config file for the fields)'
    where = f' in {culprit[0]}' if culprit else ''
    print(f'error: invalid command line{where}: {detail}', file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def run():
  """The console command `aahr-jax` and `python main.py`."""
  # absl's --help lists the flags of the program's __main__ (main.py or the console script).
  for flag in flags.FLAGS.get_key_flags_for_module(__name__):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  app.run(main, flags_parser=parse_flags)
