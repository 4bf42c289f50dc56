"""Preemption, kill -9 and NaN guards, checked on real `main.py` processes of a tiny demo run.

Each test bounds its own time (subprocess timeouts) and kills the processes it starts.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import scaling_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 30  # 2 epochs of 15 steps
TINY = ['--config', 'configs/demo.py:epochs=2,train_images=48,batch_size=16,region_dim=16,'
        'embed_size=32,bert_width=32',
        '--config.data.synthetic.dev=4', '--config.data.synthetic.test=10',
        '--config.log_every_steps=1', '--config.checkpoint_every_steps=5',
        '--config.optim.lr_schedules=(100,)', '--config.eval.batch_size=16',
        '--config.data.num_threads=1']
RUN_TIMEOUT = 300


def env():
  return dict(os.environ, HF_HUB_OFFLINE='1', JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')


SHARED_DATA_DIR = []  # the tfds dataset and CLIP cache, built by the module's first run


@pytest.fixture(scope='module', autouse=True)
def shared_data_dir(tmp_path_factory):
  SHARED_DATA_DIR[:] = [str(tmp_path_factory.mktemp('data'))]


def command(workdir, *extra):
  return [sys.executable, 'main.py', *TINY, f'--config.data.data_dir={SHARED_DATA_DIR[0]}',
          '--workdir', str(workdir), *extra]


def run(workdir, *extra):
  return subprocess.run(command(workdir, *extra), cwd=ROOT, env=env(), capture_output=True,
                        text=True, timeout=RUN_TIMEOUT, check=False)


def final_params(workdir):
  mngr = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'), item_names=('state', 'meta'))
  step = mngr.latest_step()
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
  return step, state['params']


def assert_same_params(a, b, atol=1e-6):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def start_and_interrupt(workdir, sig, when, *extra, look=lambda workdir: None):
  """Starts a run, sends `sig` once `when(workdir)` holds; returns (exit code, stderr, what
  `look(workdir)` saw at that moment). For SIGKILL the process is frozen (SIGSTOP) as soon as
  the condition is seen, so `look` sees exactly what the kill leaves on disk."""
  proc = subprocess.Popen(command(workdir, *extra), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + RUN_TIMEOUT
    while not when(workdir):
      if proc.poll() is not None:
        raise AssertionError(f'run ended before the interruption: {proc.stderr.read()[-2000:]}')
      if time.time() > deadline:
        raise AssertionError('the interruption point was never reached')
      time.sleep(0.005)
    if sig == signal.SIGKILL:
      proc.send_signal(signal.SIGSTOP)  # no thread of it writes anything from here on
    seen = look(workdir)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=RUN_TIMEOUT)
    return proc.returncode, stderr, seen
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def checkpoint_names(workdir) -> tuple[list[int], list[str]]:
  """(committed checkpoint steps, sorted; names of checkpoints still being written)."""
  folder = os.path.join(workdir, 'checkpoints')
  names = os.listdir(folder) if os.path.isdir(folder) else []
  return (sorted(int(n) for n in names if n.isdigit()),
          sorted(n for n in names if not n.isdigit() and 'tmp' in n))


def logged_step(workdir) -> int:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isfile(path):
    return 0
  with open(path, encoding='utf-8') as f:
    lines = f.read().strip().split('\n')
  try:
    return json.loads(lines[-1])['step'] if lines and lines[-1] else 0
  except json.JSONDecodeError:  # a line being written
    return 0


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('uninterrupted')
  result = run(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def compare_with_uninterrupted(workdir, reference, resumed_from: int):
  """Every loss term of the steps after the resume and the final parameters, bit for bit (the
  same programs on the same inputs)."""
  got, want = scaling_runs.logged_steps(workdir), scaling_runs.logged_steps(reference)
  assert sorted(got) == sorted(want) == list(range(1, TOTAL_STEPS + 1))
  for step in range(resumed_from + 1, TOTAL_STEPS + 1):
    assert scaling_runs.loss_terms(got[step]) == scaling_runs.loss_terms(want[step]), step
  step_a, params_a = final_params(workdir)
  step_b, params_b = final_params(reference)
  assert step_a == step_b == TOTAL_STEPS
  assert_same_params(params_a, params_b, atol=0)


def resumed_step(stdout: str) -> int:
  assert 'Resumed from' in stdout, stdout[-2000:]
  return int(stdout.split('Resumed from')[1].split('at step ')[1].split('.')[0])


@pytest.mark.slow
def test_kill_9_then_resume_is_exact(uninterrupted, tmp_path):
  # Killed once step 6 is logged and checkpoint 5 is committed: mid-epoch (15 steps each), far
  # from the next epoch's start; the resume step is whatever was committed at the kill.
  first = tmp_path / 'checkpoints' / '5'  # committed (renamed from its temporary folder)
  code, _, (committed, _) = start_and_interrupt(
      tmp_path, signal.SIGKILL, lambda w: logged_step(w) >= 6 and first.is_dir(),
      look=checkpoint_names)
  assert code == -signal.SIGKILL
  resumed = run(tmp_path)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  resumed_from = resumed_step(resumed.stdout)
  assert resumed_from == committed[-1] and resumed_from % (TOTAL_STEPS // 2), committed
  compare_with_uninterrupted(tmp_path, uninterrupted, resumed_from)


@pytest.mark.slow
def test_sigterm_checkpoints_and_resumes_exactly(uninterrupted, tmp_path):
  code, stderr, _ = start_and_interrupt(tmp_path, signal.SIGTERM, lambda w: logged_step(w) >= 12)
  assert code == 75, stderr[-2000:]
  assert 'stopped by SIGTERM at step' in stderr
  stopped_at = int(stderr.split('stopped by SIGTERM at step ')[1].split(';')[0])
  step, _ = final_params(tmp_path)
  assert step == stopped_at  # the checkpoint of the very step it stopped at, committed
  resumed = run(tmp_path)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'at step {stopped_at}.' in resumed.stdout
  compare_with_uninterrupted(tmp_path, uninterrupted, stopped_at)


@pytest.mark.slow
def test_kill_during_checkpoint_write_resumes_from_previous(uninterrupted, tmp_path):
  ckpt_dir = tmp_path / 'checkpoints'

  def writing(workdir):  # a later checkpoint is being written while an earlier one is complete
    committed, in_flight = checkpoint_names(workdir)
    return bool(committed) and bool(in_flight)

  # Checkpoints every 2 steps: many writes in flight to catch one (results do not change).
  code, _, (committed, in_flight) = start_and_interrupt(
      tmp_path, signal.SIGKILL, writing, '--config.checkpoint_every_steps=2',
      look=checkpoint_names)
  assert code == -signal.SIGKILL
  # The kill came during the write: the process was frozen with the write's temporary folder
  # present, and the kill left it unfinished (never renamed to its step).
  assert in_flight and checkpoint_names(tmp_path) == (committed, in_flight)
  writing_step = int(in_flight[-1].split('.')[0])
  assert writing_step > committed[-1] and writing_step not in committed
  resumed = run(tmp_path, '--config.checkpoint_every_steps=2')
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert resumed_step(resumed.stdout) == committed[-1]
  assert not any('tmp' in n for n in os.listdir(ckpt_dir))  # leftovers cleaned up
  compare_with_uninterrupted(tmp_path, uninterrupted, committed[-1])


def test_nan_batch_is_skipped_and_counted(tmp_path):
  result = run(tmp_path, '--config.debug.nan_steps=(7,)', '--config.checkpoint_every_steps=1',
               '--config.keep_checkpoints=40', '--config.num_epochs=1')
  assert result.returncode == 0, result.stderr[-3000:]
  logs = scaling_runs.logged_steps(tmp_path)
  assert logs[8]['skipped'] == 1 and logs[8]['skipped_total'] == 1  # step index 7 = 8th step
  assert logs[7]['skipped'] == 0 and logs[9]['skipped'] == 0 and logs[15]['skipped_total'] == 1
  assert np.isfinite(logs[9]['loss'])
  mngr = ocp.CheckpointManager(os.path.join(tmp_path, 'checkpoints'), item_names=('state', 'meta'))
  restore = lambda s: mngr.restore(s, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))['state']
  before, after = restore(7), restore(8)
  assert_same_params(before['params'], after['params'], atol=0)
  assert_same_params(before['batch_stats'], after['batch_stats'], atol=0)
  assert int(after['step']) == 8


def test_repeated_nan_stops_with_a_message(tmp_path):
  result = run(tmp_path, '--config.debug.nan_steps=(6,7,8,9,10,11)',
               '--config.max_consecutive_skips=3')
  assert result.returncode == 3, result.stderr[-3000:]
  assert 'not finite for 4 steps in a row' in result.stderr
  assert 'loss terms' in result.stderr
  assert 'The last checkpoint before these steps is step 5' in result.stderr


def test_fresh_refuses_an_existing_run(tmp_path):
  (tmp_path / 'checkpoints' / '5').mkdir(parents=True)
  result = run(tmp_path, '--fresh')
  assert result.returncode == 2
  assert '--fresh' in result.stderr and '--overwrite' in result.stderr


def test_invalid_config_and_unwritable_workdir(tmp_path):
  bad = run(tmp_path / 'w', '--config.batch_size=0')
  assert bad.returncode == 2 and 'config.batch_size = 0' in bad.stderr
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  unwritable = run(blocker / 'sub')
  assert unwritable.returncode == 2 and 'is not writable' in unwritable.stderr


def test_second_run_loads_its_compiled_steps_from_the_cache(tmp_path):
  """A rerun (or a resume after preemption) compiles nothing the first run compiled, and
  computes the same losses from the cached executables."""
  cache = tmp_path / 'xla'
  first = run(tmp_path / 'a', f'--compilation_cache_dir={cache}', '--config.num_epochs=1')
  assert first.returncode == 0, first.stderr[-3000:]
  entries = sorted(os.listdir(cache))
  assert any(name.startswith('jit_train_step') for name in entries), entries
  second = run(tmp_path / 'b', f'--compilation_cache_dir={cache}', '--config.num_epochs=1')
  assert second.returncode == 0, second.stderr[-3000:]
  assert sorted(os.listdir(cache)) == entries  # every compilation was a cache hit
  losses = lambda w: {s: m.get('loss') for s, m in scaling_runs.logged_steps(w).items()}
  assert losses(tmp_path / 'b') == losses(tmp_path / 'a')


def test_compilation_cache_flag_and_unusable_directory(tmp_path, monkeypatch, capsys):
  from aahr_jax import compilation_cache  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path / 'env'))
  assert compilation_cache.resolve(None) == str(tmp_path / 'env')
  assert compilation_cache.resolve('gs://bucket/xla') == 'gs://bucket/xla'
  assert compilation_cache.resolve('off') is None
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'home_cache'))
  assert compilation_cache.resolve(None) == str(tmp_path / 'home_cache' / 'aahr_jax' / 'xla')
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  session_cache = jax.config.jax_compilation_cache_dir  # conftest's, for this process's tests
  try:
    assert compilation_cache.enable(str(blocker / 'xla')) is None
    assert jax.config.jax_compilation_cache_dir is None
    assert 'compilation cache off' in capsys.readouterr().err
  finally:
    jax.config.update('jax_compilation_cache_dir', session_cache)
