"""Orbax checkpoints of the whole train state plus JSON metadata (step, epoch, best score)."""

import os

from absl import logging as absl_logging
import jax
import orbax.checkpoint as ocp
from flax import serialization

from aahr_jax import json_files


LATEST_DIR = 'checkpoints'  # periodic, final and preemption checkpoints (keep-N)
BEST_DIR = 'best'  # the model selected on the selection split (keep 1)


def manager(workdir: str, keep: int = 3, subdir: str = LATEST_DIR) -> ocp.CheckpointManager:
  """Async orbax manager. A checkpoint appears under its step only once fully written (orbax
  writes to a temporary folder and renames it), so a kill at any moment leaves the previous
  complete checkpoint usable; leftovers of an interrupted write are removed at start."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=True,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, subdir)),
                               options=options, item_names=('state', 'meta'))


def require_checkpoint(workdir: str) -> None:
  """Fails unless `workdir` holds a complete checkpoint in checkpoints/ or best/, looking
  without creating anything (a manager creates its folder and starts a cleanup thread)."""
  for subdir in (LATEST_DIR, BEST_DIR):
    folder = os.path.join(workdir, subdir)
    if os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder)):
      return
  raise FileNotFoundError(f'{workdir}: no checkpoint found under '
                          f'{os.path.join(workdir, LATEST_DIR)}; train first (--mode train)')


UNREADABLE_SUFFIX = '.unreadable'  # a damaged step's folder is renamed, never deleted


class UnreadableCheckpoint(ValueError):
  """A checkpoint's files are missing, truncated or corrupt (damage, not a config change)."""

  def __init__(self, folder: str, reason: str):
    super().__init__(f'checkpoint {folder} cannot be read: {reason}')
    self.folder, self.reason = folder, reason


class StateMismatch(ValueError):
  """A readable checkpoint whose train state does not fit the current config."""

  def __init__(self, folder: str, problems: list[str]):
    super().__init__(f'checkpoint {folder} does not fit this config: {len(problems)} arrays '
                     f'differ, e.g. {"; ".join(problems[:3])}')
    self.folder, self.problems = folder, problems


def step_folder(mngr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(mngr.directory), str(step))


def damage(folder: str) -> str | None:
  """Why the checkpoint in `folder` cannot be restored, judged from its small files alone (no
  array is read), or None. Damaged array data is found by `damaged_array`."""
  if not os.path.isdir(folder) or not os.listdir(folder):
    return 'the folder is empty'
  step = os.path.basename(folder.rstrip(os.sep))
  for name in ('meta/metadata', 'state/_METADATA', 'state/_sharding'):
    path = os.path.join(folder, name)
    if name == 'state/_sharding' and not os.path.isdir(os.path.join(folder, 'state')):
      continue  # reported as the missing state/_METADATA
    if not os.path.isfile(path):
      return f'{name} is missing'
    try:
      value = json_files.read(path, '')
    except (OSError, json_files.DamagedFile) as e:
      return f'{name} is unreadable ({str(e).split(" is damaged: ")[-1].rstrip("; ")})'
    if name == 'meta/metadata' and step.isdigit() and value.get('step') != int(step):
      return f'{name} records step {value.get("step")!r}, not {step}'
  return None


def damaged_array(folder: str, batch: int = 64) -> str | None:
  """The first array of the checkpoint in `folder` whose data cannot be read back and why, or
  None. Every array is read once, `batch` at a time, each batch waited for in full: a failing
  orbax restore abandons its other reads in flight, whose callbacks then print hundreds of lines
  of tracebacks; here no read outlives the call."""
  import tensorstore as ts  # pylint: disable=import-outside-toplevel
  state = os.path.join(folder, 'state') + os.sep
  store = {'driver': 'ocdbt', 'base': {'driver': 'file', 'path': state}}
  context = ts.Context()  # one open database for all the arrays
  try:
    keys = ts.KvStore.open(store, context=context).result().list().result()
  except Exception as e:  # pylint: disable=broad-except
    return f'state/manifest.ocdbt is unreadable ({_reason(e)})'
  drivers = {'.zarray': 'zarr', 'zarr.json': 'zarr3'}
  arrays = sorted((key.decode().rsplit('/', 1)[0], drivers[key.decode().rsplit('/', 1)[1]])
                  for key in keys if key.decode().rsplit('/', 1)[-1] in drivers)
  if not arrays:
    return 'state/ holds no arrays'

  def settle(futures):  # waits for every future; (value or None, error or None) each
    out = []
    for future in futures:
      try:
        out.append((future.result(), None))
      except Exception as e:  # pylint: disable=broad-except
        out.append((None, e))
    return out

  for start in range(0, len(arrays), batch):
    names = [name for name, _ in arrays[start:start + batch]]
    opened = settle([ts.open({'driver': driver, 'kvstore': dict(store, path=name + '/')},
                             context=context, open=True)
                     for name, driver in arrays[start:start + batch]])
    problem = _first_error(names, opened)  # the batch's other operations have all finished
    problem = problem or _first_error(names, settle([array.read() for array, _ in opened]))
    if problem:
      return problem
  return None


def _first_error(names: list[str], settled: list[tuple]) -> str | None:
  for name, (_, error) in zip(names, settled):
    if error is not None:
      return f'array {name}: {_reason(error)}'
  return None


def _reason(error: BaseException) -> str:
  """The first informative line of an orbax / tensorstore error (they dump whole specs)."""
  parts = []
  while error is not None and len(parts) < 3:
    text = str(error).split(' See full TensorStore details')[0].strip()
    line = text.splitlines()[0][:300] if text else type(error).__name__
    if line not in parts:
      parts.append(line)
    error = error.__cause__ or error.__context__
  return ': '.join(parts)


def move_aside(folder: str) -> str:
  """Renames a damaged checkpoint folder to <step>.unreadable (.unreadable.2, ... if taken)."""
  target, n = folder + UNREADABLE_SUFFIX, 1
  while os.path.exists(target):
    n += 1
    target = f'{folder}{UNREADABLE_SUFFIX}.{n}'
  try:
    os.rename(folder, target)
  except OSError as e:
    raise OSError(f'checkpoint {folder} cannot be read and cannot be moved aside to {target} '
                  f'({e.strerror}); make {os.path.dirname(folder)} writable, or move it away '
                  'yourself and run the same command again') from None
  return target


def readable_steps(workdir: str) -> dict[str, list[int]]:
  """{'checkpoints': [...], 'best': [...]}: the steps whose small files are intact."""
  found = {}
  for subdir in (LATEST_DIR, BEST_DIR):
    folder = os.path.join(workdir, subdir)
    names = os.listdir(folder) if os.path.isdir(folder) else []
    found[subdir] = sorted(int(n) for n in names
                           if n.isdigit() and damage(os.path.join(folder, n)) is None)
  return found


def alternatives(workdir: str, bad_folder: str) -> str:
  """What to pass instead of a damaged checkpoint, for error lines: 'readable instead:
  --checkpoint 5, 10 or latest'. A step number names best/ when best/ holds that step."""
  readable = readable_steps(workdir)
  bad_step = int(os.path.basename(os.path.normpath(bad_folder)))
  bad_in_best = os.path.basename(os.path.dirname(os.path.normpath(bad_folder))) == BEST_DIR
  options = sorted({s for s in readable[LATEST_DIR] + readable[BEST_DIR] if s != bad_step})
  options = [str(s) for s in options]
  if not bad_in_best and bad_step in readable[BEST_DIR]:
    options.append(str(bad_step))  # the same step kept in best/
  latest = readable[LATEST_DIR][-1] if readable[LATEST_DIR] else None
  if bad_in_best and latest == bad_step:
    options.append('latest')  # the same step kept in checkpoints/
  if not options:
    return f'{workdir} holds no other readable checkpoint'
  listed = ', '.join(options[:-1]) + (' or ' if len(options) > 1 else '') + options[-1]
  return f'readable instead: --checkpoint {listed}'


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict, force: bool = False) -> None:
  try:
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(serialization.to_state_dict(state)),
        meta=ocp.args.JsonSave(meta)), force=force)
  except OSError as e:
    raise OSError(f'writing the checkpoint of step {step} to {mngr.directory} failed: {e} '
                  '(is the disk full or the workdir not writable?)') from e


def restore(mngr: ocp.CheckpointManager, step: int, target_state):
  """Restores into the structure, dtypes and shardings of `target_state` (arrays or abstract).

  UnreadableCheckpoint if the checkpoint is damaged, StateMismatch if it is intact but saved
  with another structure (a config change), both before anything is restored where possible.
  """
  folder = step_folder(mngr, step)
  problem = damage(folder)
  if problem:
    raise UnreadableCheckpoint(folder, problem)
  problem = damaged_array(folder)  # before orbax reads anything: its failures print storms
  if problem:
    raise UnreadableCheckpoint(folder, problem)
  mismatches = state_mismatches(mngr, step, target_state)
  if mismatches:  # checked before restoring: a failed orbax restore leaves noisy threads
    raise StateMismatch(folder, mismatches)
  target = serialization.to_state_dict(target_state)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    jax.block_until_ready(restored['state'])  # read errors surface here, not later
  except Exception as e:  # pylint: disable=broad-except
    # tensorstore raises bare Exception / ValueError for truncated or corrupt array files.
    raise UnreadableCheckpoint(folder, _reason(e)) from e
  return serialization.from_state_dict(target_state, restored['state']), restored['meta']


def _state_path(mngr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(mngr.directory), str(step), 'state')


def _saved_metadata(checkpointer: ocp.StandardCheckpointer, path: str):
  """The saved state's tree of array metadata (shape, dtype) at `path`, read from its files."""
  verbosity = absl_logging.get_verbosity()
  # Orbax looks for a step-level metadata file inside the item folder and warns that it is
  # missing (it is one level up, where CheckpointManager wrote it): not the user's concern.
  absl_logging.set_verbosity(min(verbosity, absl_logging.ERROR))  # absl: lower is quieter
  try:
    saved = checkpointer.metadata(path)
  finally:
    absl_logging.set_verbosity(verbosity)
  return getattr(saved, 'item_metadata', saved)


def state_mismatches(mngr: ocp.CheckpointManager, step: int, target_state) -> list[str]:
  """Where the saved state of `step` differs from `target_state` in structure or array shapes
  ('path: saved (8, 128), expected (8, 64)', 'path: not saved', 'path: not expected'); empty
  when a restore into `target_state` can succeed. UnreadableCheckpoint if the saved structure
  cannot be read."""
  checkpointer = ocp.StandardCheckpointer()
  try:
    saved = _saved_metadata(checkpointer, _state_path(mngr, step))
  except Exception as e:  # pylint: disable=broad-except
    raise UnreadableCheckpoint(step_folder(mngr, step), _reason(e)) from e
  finally:
    checkpointer.close()

  def shapes(tree) -> dict[str, tuple]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    name = lambda key: str(getattr(key, 'key', getattr(key, 'name', getattr(key, 'idx', key))))
    return {'/'.join(map(name, path)): tuple(leaf.shape) for path, leaf in leaves
            if hasattr(leaf, 'shape')}

  before = shapes(saved)
  if not before:  # damage, not a config change: every saved state holds arrays
    raise UnreadableCheckpoint(step_folder(mngr, step), 'its metadata lists no arrays '
                               '(state/_sharding or state/manifest.ocdbt is damaged)')
  after = shapes(serialization.to_state_dict(target_state))
  problems = [f'{k}: not saved' for k in sorted(set(after) - set(before))]
  problems += [f'{k}: not expected' for k in sorted(set(before) - set(after))]
  problems += [f'{k}: saved {before[k]}, expected {after[k]}'
               for k in sorted(set(before) & set(after)) if before[k] != after[k]]
  return problems


def restore_on_one_device(mngr: ocp.CheckpointManager, step: int) -> dict:
  """The saved state tree as written (no model or optimizer needed to describe it), every array
  on this process's first device, whatever mesh or number of hosts wrote it."""
  path = _state_path(mngr, step)
  problem = damage(step_folder(mngr, step)) or damaged_array(step_folder(mngr, step))
  if problem:
    raise UnreadableCheckpoint(step_folder(mngr, step), problem)
  checkpointer = ocp.StandardCheckpointer()
  try:
    saved = _saved_metadata(checkpointer, path)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          saved)
    return jax.block_until_ready(checkpointer.restore(path, target))
  except Exception as e:  # pylint: disable=broad-except
    raise UnreadableCheckpoint(step_folder(mngr, step), _reason(e)) from e
  finally:
    checkpointer.close()


def resolve_step(mngr: ocp.CheckpointManager, which: str | int | None) -> int:
  """'latest'/None -> the latest complete step; an int -> that step (it must exist)."""
  steps = mngr.all_steps()
  if not steps:
    raise FileNotFoundError(f'no checkpoint in {mngr.directory}')
  if which in (None, '', 'latest'):
    return mngr.latest_step()
  try:
    step = int(which)
  except ValueError:
    raise ValueError(f'--checkpoint {which!r}: expected a step number, "latest" or "best" (for '
                     '--mode eval also a workdir or converted-checkpoint path)') from None
  if step not in steps:
    raise FileNotFoundError(f'no checkpoint for step {step} in {mngr.directory}; '
                            f'available steps: {sorted(steps)}')
  return step
