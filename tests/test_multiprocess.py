"""Two local processes joined by jax.distributed (4 fake CPU devices each) train like one process
with 8 devices: same 5-step losses, one writer, the evaluation's metrics of one process.

The processes run main.py with --coordinator_address/--num_processes/--process_id on 127.0.0.1;
the test bounds their time and kills them on a timeout or failure (scaling_runs.run_processes).
"""

import json
import os

import pytest

from aahr_jax import multihost
import scaling_runs


def test_single_process_runs_never_initialize(monkeypatch):
  for name in ('JAX_COORDINATOR_ADDRESS', 'SLURM_JOB_ID', 'SLURM_NTASKS', 'TPU_WORKER_HOSTNAMES'):
    monkeypatch.delenv(name, raising=False)
  assert not multihost.wanted('auto', None)
  assert not multihost.initialize('auto')  # returns without calling jax.distributed
  monkeypatch.setenv('SLURM_JOB_ID', '1')
  monkeypatch.setenv('SLURM_NTASKS', '1')
  assert not multihost.wanted('auto', None)  # a one-task SLURM job is single-process
  monkeypatch.setenv('SLURM_NTASKS', '4')
  assert multihost.wanted('auto', None)
  assert not multihost.wanted('off', '127.0.0.1:1234')


def test_partial_flags_are_an_error():
  with pytest.raises(ValueError, match='go together'):
    multihost.initialize('auto', '127.0.0.1:1234', None, 0)


def eval_results(workdir: str) -> dict:
  with open(os.path.join(workdir, 'eval', 'test.json'), encoding='utf-8') as f:
    return json.load(f)


@pytest.mark.slow
def test_two_processes_match_one_process_on_8_devices(scaling_dir):
  workdir = str(scaling_dir / 'two_processes')
  outputs = scaling_runs.run_processes(workdir, str(scaling_dir / 'data'), processes=2,
                                       devices_each=4)
  assert 'Process 1 of 2: 4 local device(s), 8 in all.' in outputs[1]
  reference = scaling_runs.logged_steps(str(scaling_dir / 'ref8'))
  logged = scaling_runs.logged_steps(workdir)
  assert sorted(logged) == list(range(1, scaling_runs.STEPS_PER_EPOCH + 1))  # one writer
  scaling_runs.assert_losses_close(reference, logged,
                                   range(1, scaling_runs.STEPS_PER_EPOCH + 1),
                                   what='2 processes x 4 devices')
  # The evaluation ran the padded batches on both processes and dropped the padding: all 8 test
  # images and 40 captions, and process 0 wrote the results.
  results = eval_results(workdir)
  assert results['images'] == 8 and results['captions'] == 40
  # One process evaluating the same checkpoint on the same 8 devices gives the same metrics,
  # recall curves and tie counts, bit for bit.
  one_process = str(scaling_dir / 'two_processes_evaluated_by_one')
  scaling_runs.copy_checkpoint(workdir, one_process, scaling_runs.STEPS_PER_EPOCH)
  scaling_runs.run_main(one_process, str(scaling_dir / 'data'), devices=8,
                        extra=['--mode', 'eval'])
  single = eval_results(one_process)
  for key in ('images', 'captions', 'all', 'ties', 'curves'):
    assert results[key] == single[key], key
  params = scaling_runs.restore_params(workdir, scaling_runs.STEPS_PER_EPOCH)
  ref_params = scaling_runs.restore_params(str(scaling_dir / 'ref8'),
                                           scaling_runs.STEPS_PER_EPOCH)
  diff, path = scaling_runs.max_param_diff(ref_params, params)
  print(f"largest parameter difference {diff:.2e} ({path})")
  assert diff <= scaling_runs.PARAM_ATOL, (path, diff)
