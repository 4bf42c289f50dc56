"""Orbax checkpoints of the whole train state plus JSON metadata (step, epoch, best score)."""

import os

from absl import logging as absl_logging
import jax
import orbax.checkpoint as ocp
from flax import serialization


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


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict, force: bool = False) -> None:
  try:
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(serialization.to_state_dict(state)),
        meta=ocp.args.JsonSave(meta)), force=force)
  except OSError as e:
    raise OSError(f'writing the checkpoint of step {step} to {mngr.directory} failed: {e} '
                  '(is the disk full or the workdir not writable?)') from e


def restore(mngr: ocp.CheckpointManager, step: int, target_state):
  """Restores into the structure, dtypes and shardings of `target_state` (arrays or abstract)."""
  target = serialization.to_state_dict(target_state)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
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
  when a restore into `target_state` can succeed."""
  checkpointer = ocp.StandardCheckpointer()
  try:
    saved = _saved_metadata(checkpointer, _state_path(mngr, step))
  finally:
    checkpointer.close()

  def shapes(tree) -> dict[str, tuple]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    name = lambda key: str(getattr(key, 'key', getattr(key, 'name', getattr(key, 'idx', key))))
    return {'/'.join(map(name, path)): tuple(leaf.shape) for path, leaf in leaves
            if hasattr(leaf, 'shape')}

  before = shapes(saved)
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
  checkpointer = ocp.StandardCheckpointer()
  try:
    saved = _saved_metadata(checkpointer, path)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          saved)
    return checkpointer.restore(path, target)
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
