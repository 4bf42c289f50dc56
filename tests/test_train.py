"""A few-step training run end to end: checkpoints, restore, exact continuation, re-evaluation."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from aahr_jax import checkpoint
from aahr_jax import train
from configs import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(epochs: int):
  """test_reliability.py's TINY run, so that the steps compiled for one file come from the
  session's compilation cache in the other (with log_every_steps=5 and the default threads the
  step compiled again: 55 s for the first run of this test instead of 23 s)."""
  c = demo.get_config(f'epochs={epochs},train_images=48,batch_size=16')
  c.data.synthetic.dev = 4
  c.data.synthetic.test = 10
  c.data.region_dim = 16
  c.model.embed_size = 32
  c.model.bert = dict(c.model.bert, hidden_size=32, intermediate_size=64)
  c.optim.lr_schedules = (100,)  # independent of the epoch count, so runs can be compared
  c.checkpoint_every_steps = 5
  c.log_every_steps = 1
  c.eval.batch_size = 16
  c.data.num_threads = 1
  return c


def final_params(workdir, config):
  mngr = checkpoint.manager(workdir)
  run = train.setup(config, workdir)
  state, meta = checkpoint.restore(mngr, mngr.latest_step(), run['state'])
  return jax.device_get(state.params), meta


def logged(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def stop_after_logging(monkeypatch, stop_step: int):
  """The run gets SIGTERM while it logs step `stop_step`: the preemption path then checkpoints
  that very step and stops (in this process, so the point is exact)."""
  write = train.MetricsWriter.write

  def write_then_signal(self, step, metrics):
    write(self, step, metrics)
    if step == stop_step:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(train.MetricsWriter, 'write', write_then_signal)


def test_train_checkpoint_resume_is_exact_and_eval_reproduces(tmp_path, monkeypatch):
  straight, split = str(tmp_path / 'straight'), str(tmp_path / 'split')
  two_epochs = tiny_config(2)
  train.train_and_evaluate(two_epochs, straight)  # 30 steps (15 per epoch)
  # Stopped at step 20, in the middle of the second epoch, then resumed to 30: the data
  # position, rng, momentum encoders and queues must continue exactly.
  with monkeypatch.context() as patch:
    stop_after_logging(patch, 20)
    with pytest.raises(train.TrainingStopped, match='stopped by SIGTERM at step 20;') as stop:
      train.train_and_evaluate(two_epochs, split)
  assert stop.value.exit_code == train.EXIT_PREEMPTED
  assert checkpoint.manager(split).latest_step() == 20
  train.train_and_evaluate(two_epochs, split)
  params_a, meta_a = final_params(straight, two_epochs)
  params_b, meta_b = final_params(split, two_epochs)
  assert meta_a['step'] == meta_b['step'] == 30
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(a, b)
  with open(os.path.join(straight, 'eval', 'test.json'), encoding='utf-8') as f:
    trained = json.load(f)
  lines = logged(straight)
  assert [x['step'] for x in lines] == list(range(1, 31))
  assert all(np.isfinite(x['loss']) for x in lines)
  # Every logged value of every step, bit for bit, but the throughput.
  timing = lambda x: {k: v for k, v in x.items() if k != 'examples_per_sec'}
  assert [timing(x) for x in logged(split)] == [timing(x) for x in lines]
  assert os.path.isfile(os.path.join(straight, 'config.json'))
  assert os.listdir(os.path.join(straight, 'tensorboard'))

  reevaluated = train.evaluate_checkpoint(two_epochs, straight)
  assert reevaluated['all'] == trained['all']

  # Resuming with a config whose train state has another structure fails before anything is
  # written, naming the fields that changed; the run's config.json still describes the run.
  narrower = tiny_config(2)
  narrower.model.embed_size = 16
  with pytest.raises(ValueError, match=r'cannot resume .*: saved \(32,\), expected \(16,\).* '
                     r'config.json in model.embed_size: 32 -> 16\. Resume with'):
    train.train_and_evaluate(narrower, straight)
  with open(os.path.join(straight, 'config.json'), encoding='utf-8') as f:
    assert json.load(f)['model']['embed_size'] == 32


def run_main(*args, timeout=300):
  env = dict(os.environ, HF_HUB_OFFLINE='1', JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, 'main.py', *args], cwd=ROOT, env=env, timeout=timeout,
                        capture_output=True, text=True, check=False)


def test_cli_errors_are_one_line_and_nonzero(tmp_path):
  missing = run_main('--config', 'configs/demo.py', '--workdir', str(tmp_path / 'w'),
                     f'--config.data.manual_dir={tmp_path}/does_not_exist')
  assert missing.returncode == 2
  assert 'error: data directory not found' in missing.stderr
  assert str(tmp_path / 'does_not_exist') in missing.stderr

  raw = tmp_path / 'raw'
  raw.mkdir()
  np.save(raw / 'train_ims.npy', np.zeros((2, 36, 128), np.float32))
  (raw / 'train_caps.txt').write_text('\n'.join(['a caption .'] * 9) + '\n')
  bad_caps = run_main('--config', 'configs/demo.py', '--workdir', str(tmp_path / 'w2'),
                      f'--config.data.manual_dir={raw}')
  assert bad_caps.returncode == 2
  assert 'train_caps.txt: 9 caption lines, expected a multiple of 5' in bad_caps.stderr

  unknown = run_main('--config', 'configs/demo.py', '--workdir', str(tmp_path / 'w3'),
                     '--config.optim.no_such_field=1')
  assert unknown.returncode != 0
  assert 'no_such_field' in unknown.stderr

  unknown_arg = run_main('--config', 'configs/demo.py:no_such_arg=1', '--workdir',
                         str(tmp_path / 'w4'))
  assert unknown_arg.returncode != 0
  assert 'no_such_arg' in unknown_arg.stderr

  empty = tmp_path / 'empty'
  empty.mkdir()
  no_checkpoint = run_main('--config', 'configs/demo.py', '--workdir', str(empty), '--mode', 'eval')
  assert no_checkpoint.returncode == 2
  assert no_checkpoint.stderr.strip().splitlines() == [  # nothing from orbax's threads either
      f'error: {empty}: no checkpoint found under {empty}/checkpoints; train first (--mode train)']
  assert not os.listdir(empty)  # a read-only look: no checkpoint folders created

  bad_value = run_main('--config', 'configs/demo.py:model=xyz', '--workdir', str(tmp_path / 'w5'))
  assert bad_value.returncode == 2
  assert bad_value.stderr.strip().splitlines() == [  # get_config's message, no traceback
      "error: invalid --config configs/demo.py:model=xyz: configs/demo.py: model='xyz'; "
      "expected 'gpo' or 'aahr'"]
