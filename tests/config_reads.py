"""Which fields of a config the code reads: records every field access of a ConfigDict tree while
a block runs, so a test can show that no config field is inert (set, documented, read nowhere).

Reads made only to validate, print or serialise the config do not count: a field that is only
checked for a valid value still does nothing.
"""

import contextlib
import os
import sys

import ml_collections

# Fields that no training run reads, each with the reason it is a field all the same.
NOT_READ_BY_TRAINING = {
    'quirks': "records which preset set the quirk flags (configs/aahr_common.py); the flags act",
    'data.verify_deep': 'read by --mode verify_data only (the V12 CLIP pairing probe)',
    'eval.eccv': 'read when COCO testall is evaluated (ECCV Caption and CxC metrics)',
    'eval.pmrp_dir': 'read when COCO testall is evaluated with eval.eccv (PMRP)',
}

# Files whose reads do not make a field act (validation, serialisation, ml_collections itself).
_NOT_USES = ('config_checks.py', 'config_dict.py', 'config_reads.py')


def leaf_paths(config: ml_collections.ConfigDict, prefix: str = '') -> set[str]:
  """'section.field' of every leaf (a dict-valued field such as model.bert is one leaf)."""
  paths = set()
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      paths |= leaf_paths(value, f'{prefix}{key}.')
    else:
      paths.add(prefix + key)
  return paths


def _node_paths(config, prefix='') -> dict[int, str]:
  nodes = {id(config): prefix}
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      nodes.update(_node_paths(value, f'{prefix}{key}.'))
  return nodes


def _caller_file() -> str:
  frame = sys._getframe(2)  # pylint: disable=protected-access
  while frame is not None and os.path.basename(frame.f_code.co_filename) == 'config_dict.py':
    frame = frame.f_back
  return '' if frame is None else os.path.basename(frame.f_code.co_filename)


@contextlib.contextmanager
def recording(config: ml_collections.ConfigDict):
  """Yields a set that collects the paths of the fields of `config` read inside the block."""
  nodes = _node_paths(config)
  reads: set[str] = set()
  original = ml_collections.ConfigDict.__getitem__

  def getitem(self, key):
    value = original(self, key)
    prefix = nodes.get(id(self))
    if prefix is not None and isinstance(key, str) and _caller_file() not in _NOT_USES:
      reads.add(prefix + key)
    return value

  ml_collections.ConfigDict.__getitem__ = getitem
  try:
    yield reads
  finally:
    ml_collections.ConfigDict.__getitem__ = original


def assert_every_field_read(config: ml_collections.ConfigDict, reads: set[str], model: str) -> None:
  """Every leaf of `config` was read, or is listed in NOT_READ_BY_TRAINING."""
  unread = sorted(leaf_paths(config) - reads - set(NOT_READ_BY_TRAINING))
  assert not unread, (f'{model}: config fields that the run never read (inert settings: wire '
                      f'them to the code or remove them): {unread}')
