"""best.json rebuilt from the run when it is damaged: the selected checkpoint in best/ records
its step, score and selection split, and eval/selection.jsonl the validation metrics of that
step."""

import json
import os

from aahr_jax import checkpoint
from aahr_jax import json_files
from aahr_jax import multihost

SELECTION_LOG = os.path.join('eval', 'selection.jsonl')
_NOT_METRICS = ('step', 'selection_split', 'ties')  # the other fields of a selection record


def rebuild(workdir: str, path: str, damage: json_files.DamagedFile) -> dict:
  """The record best.json held, from best/<step> (and the metrics of that step from the
  selection log), written back to `path` by process 0; DamagedFile if best/ cannot tell it."""
  what = damage.args[0].split('; ')[0]  # '<path> is damaged: <why>'
  folder = os.path.join(workdir, checkpoint.BEST_DIR)
  steps = checkpoint.readable_steps(workdir)[checkpoint.BEST_DIR]
  if not steps:
    raise json_files.DamagedFile(
        f'{what}, and {folder} holds no readable checkpoint to rebuild it from; delete it '
        '(the next validation is then selected) or pass --checkpoint STEP') from None
  meta = json_files.read(os.path.join(folder, str(steps[-1]), 'meta', 'metadata'), '')
  record = {'step': int(meta['step']), 'rsum': float(meta['rsum']),
            'selection_split': meta['selection_split'], 'metrics': {}}
  log = os.path.join(workdir, SELECTION_LOG)
  if os.path.isfile(log):
    with open(log, encoding='utf-8', errors='replace') as f:
      for line in f:
        try:
          entry = json.loads(line)
        except ValueError:  # a partial last line: not the one we need
          continue
        if entry.get('step') == record['step']:
          record['metrics'] = {k: v for k, v in entry.items() if k not in _NOT_METRICS}
  if multihost.is_main():
    json_files.write_atomically(path, record, indent=2)
  print(f'{what}: rebuilt it from {folder}/{record["step"]}.',
        flush=True)
  return record
