"""Resuming a run: the newest readable checkpoint, damaged ones moved aside, logs trimmed to it.

A checkpoint damaged after it was written (a truncated copy, a full disk, a crash of the
machine) is renamed to `<step>.unreadable`, never deleted, and the run goes on from the newest
checkpoint that restores. The logs are then cut back to the restored step, so that the steps
after it, trained again, are logged once, exactly as an uninterrupted run logs them.
"""

import json
import os

from aahr_jax import checkpoint
from aahr_jax import evaluate
from aahr_jax import multihost

METRICS_FILE = 'metrics.jsonl'


def restore_newest_readable(mngr, state, workdir: str, changes: list[str]):
  """(state, meta) of the newest checkpoint of `mngr` that restores into `state`; (state, None)
  when there is none. Damaged newer ones are moved aside once an older one restored; a
  readable checkpoint that does not fit the config (a config change) stops the run."""
  unreadable = []
  restored = None
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      restored = checkpoint.restore(mngr, step, state)
      break
    except checkpoint.UnreadableCheckpoint as e:
      unreadable.append(e)
    except checkpoint.StateMismatch as e:
      raise ValueError(
          f'cannot resume {workdir} at step {step} with this config: the saved train state has '
          f'another structure ({len(e.problems)} arrays differ, e.g. '
          f'{"; ".join(e.problems[:3])})'
          + (f'; the config differs from the run\'s config.json in {"; ".join(changes)}'
             if changes else '')
          + '. Resume with the run\'s config, or train the new config in another --workdir.'
      ) from None
  if unreadable and restored is None:
    raise ValueError(
        f'none of the {len(unreadable)} checkpoints in {mngr.directory} can be read ('
        + '; '.join(f'step {os.path.basename(e.folder)}: {e.reason}' for e in unreadable)
        + '); copy them back from a backup, or start again with --fresh --overwrite (deletes '
        'them) or another --workdir')
  for e in unreadable:
    set_aside(e)
  if unreadable:
    mngr.reload()
  return restored if restored is not None else (state, None)


def set_aside(error: 'checkpoint.UnreadableCheckpoint') -> None:
  """Process 0 renames the folder and says so; the other processes wait for the rename."""
  if multihost.is_main():
    moved = checkpoint.move_aside(error.folder)
    print(f'{error}; moved to {moved}.', flush=True)
  multihost.sync(f'set_aside:{error.folder}')


def check_best(best_mngr) -> None:
  """Moves an unreadable best/ checkpoint aside (its record in best.json stays: a later model
  replaces it only if it scores higher; until then the final step is evaluated)."""
  for step in best_mngr.all_steps():
    folder = checkpoint.step_folder(best_mngr, step)
    problem = checkpoint.damage(folder)
    if problem:
      set_aside(checkpoint.UnreadableCheckpoint(folder, problem))
      best_mngr.reload()


def trim_logs(workdir: str, step: int) -> None:
  """Cuts metrics.jsonl and eval/selection.jsonl back to the records of steps <= `step`: a
  partial last record (a kill during a write) and the records of steps trained after the
  restored checkpoint go; those steps are trained and logged again."""
  if not multihost.is_main():
    return
  for name in (METRICS_FILE, evaluate.SELECTION_LOG):
    path = os.path.join(workdir, name)
    if not os.path.isfile(path):
      continue
    with open(path, 'rb') as f:
      lines = f.read().split(b'\n')
    kept, dropped_after, dropped_partial = [], 0, 0
    for line in lines:
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        record_step = int(record['step'])
      except (ValueError, KeyError, TypeError):
        dropped_partial += 1
        continue
      if record_step > step:
        dropped_after += 1
      else:
        kept.append(line)
    if not (dropped_after or dropped_partial):
      continue
    with open(path + '.tmp', 'wb') as f:
      f.write(b''.join(line + b'\n' for line in kept))
    os.replace(path + '.tmp', path)
    print(f'{path}: kept the records up to step {step}'
          + (f', removed {dropped_after} of later steps (they are logged again)'
             if dropped_after else '')
          + (f', removed {dropped_partial} unreadable (partly written)' if dropped_partial
             else '') + '.', flush=True)
