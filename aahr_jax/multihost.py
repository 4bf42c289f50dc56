"""Joining the processes of a multi-host run (`jax.distributed`) and keeping them in step.

`initialize` must run before anything touches a JAX backend. It is called only when the run is
multi-process: explicit flags (--coordinator_address/--num_processes/--process_id), the
JAX_COORDINATOR_ADDRESS variable, a SLURM job step with several tasks, a multi-host Cloud TPU
slice, or --distributed=on (JAX's own cluster detection). Single-process runs never call it:
an unguarded `jax.distributed.initialize()` raises off-cluster.
"""

import os

import jax


def _slurm_tasks() -> int:
  return int(os.environ.get('SLURM_NTASKS', os.environ.get('SLURM_NPROCS', '1')) or 1)


def _tpu_hosts() -> int:
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return len([h for h in hosts.split(',') if h.strip()]) or 1


def wanted(mode: str, coordinator_address: str | None) -> bool:
  """Whether this run is multi-process: mode 'on' | 'off' | 'auto' (look at the environment)."""
  if mode not in ('auto', 'on', 'off'):
    raise ValueError(f"--distributed={mode!r}: expected 'auto', 'on' or 'off'")
  if mode != 'auto':
    return mode == 'on'
  return bool(coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')
              or (os.environ.get('SLURM_JOB_ID') and _slurm_tasks() > 1)
              or _tpu_hosts() > 1)


def initialize(mode: str = 'auto', coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Joins the other processes when the run is multi-process; returns whether it did."""
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
    raise ValueError('--coordinator_address, --num_processes and --process_id go together: '
                     f'got {coordinator_address!r}, {num_processes!r}, {process_id!r}')
  if not wanted(mode, coordinator_address):
    return False
  if coordinator_address is not None:
    if not 0 <= process_id < num_processes:
      raise ValueError(f'--process_id={process_id} is not in [0, --num_processes='
                       f'{num_processes})')
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  else:
    jax.distributed.initialize()  # TPU pod / SLURM / environment variables: JAX detects them
  print(f'Process {jax.process_index()} of {jax.process_count()}: '
        f'{jax.local_device_count()} local device(s), {jax.device_count()} in all.', flush=True)
  return True


def is_main() -> bool:
  """Process 0 writes logs, JSON and plots; every process takes part in checkpoints."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Barrier across processes (a no-op in single-process runs)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def main_first(name: str, fn):
  """Runs `fn` on process 0, then on the others once it is done (builds of shared files: the
  dataset, the CLIP cache). Returns fn's result on every process."""
  if jax.process_count() == 1:
    return fn()
  result = fn() if is_main() else None
  sync(f'{name}:main_done')
  if not is_main():
    result = fn()
  sync(f'{name}:all_done')
  return result
