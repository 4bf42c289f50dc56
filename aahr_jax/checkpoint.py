"""Orbax checkpoints of the whole train state plus JSON metadata (step, epoch, best score)."""

import os

import jax
import orbax.checkpoint as ocp
from flax import serialization


def manager(workdir: str, keep: int = 3) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')),
                               options=options, item_names=('state', 'meta'))


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(serialization.to_state_dict(state)),
      meta=ocp.args.JsonSave(meta)))


def restore(mngr: ocp.CheckpointManager, step: int, target_state):
  """Restores into the structure, dtypes and shardings of `target_state` (arrays or abstract)."""
  target = serialization.to_state_dict(target_state)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  return serialization.from_state_dict(target_state, restored['state']), restored['meta']


def resolve_step(mngr: ocp.CheckpointManager, which: str | int | None) -> int:
  """'latest'/None -> the latest complete step; an int -> that step (it must exist)."""
  steps = mngr.all_steps()
  if not steps:
    raise FileNotFoundError(f'no checkpoint in {mngr.directory}')
  if which in (None, '', 'latest'):
    return mngr.latest_step()
  step = int(which)
  if step not in steps:
    raise FileNotFoundError(f'no checkpoint for step {step} in {mngr.directory}; '
                            f'available steps: {sorted(steps)}')
  return step
