"""A damaged workdir: copies of one finished tiny run, damaged as disks, copies and crashes damage
them, then resumed, evaluated or searched. Recovery gives the uninterrupted run's results; what
cannot be recovered is one line naming the file and what to do; nothing is deleted."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from aahr_jax import checkpoint
from aahr_jax import evaluate
from aahr_jax import inference
from aahr_jax import json_files
from aahr_jax import resume
from aahr_jax import train
from input_pipeline import clip_features
from input_pipeline import datasets
from test_train import tiny_config  # the same tiny run: its steps come from the session cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 15  # one epoch: checkpoints after steps 5, 10, 15, best/15 after the epoch's validation


def run_config():
  """test_train's tiny run with a corrupt batch at step 2 (skipped and counted), so that the
  logged skip counter must come back from the checkpoint on resume."""
  config = tiny_config(1)
  config.debug.nan_steps = (1,)  # 0-based: logged step 2
  return config


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """(workdir, config, restored params of its last step) of a finished 15-step run."""
  workdir = str(tmp_path_factory.mktemp('finished'))
  config = run_config()
  train.train_and_evaluate(config, workdir)
  return workdir, config


def copy_run(finished, tmp_path) -> str:
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished[0], workdir)
  return workdir


def files_of(folder: str) -> dict[str, bytes]:
  return {os.path.relpath(os.path.join(r, f), folder): open(os.path.join(r, f), 'rb').read()
          for r, _, names in os.walk(folder) for f in names}


def largest_array_file(step_folder: str) -> str:
  files = [os.path.join(r, f) for r, _, names in os.walk(os.path.join(step_folder, 'state'))
           for f in names if os.sep + 'd' + os.sep in os.path.join(r, f)]
  return max(files, key=os.path.getsize)


def truncate(path: str, size: int | None = None) -> None:
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2 if size is None else size)


def overwrite(path: str, at: int, data: bytes) -> None:
  with open(path, 'r+b') as f:
    f.seek(at)
    f.write(data)


def empty_folder(folder: str) -> None:
  shutil.rmtree(folder)
  os.mkdir(folder)


# damage -> what the one-line reason says
DAMAGE = {
    'truncated array file': (lambda f: truncate(largest_array_file(f)), 'OUT_OF_RANGE'),
    'garbage in an array file': (lambda f: overwrite(largest_array_file(f), 0, b'\xff' * 64),
                                 'ZSTD'),
    'meta deleted': (lambda f: shutil.rmtree(os.path.join(f, 'meta')), 'meta/metadata is missing'),
    'truncated _sharding': (lambda f: truncate(os.path.join(f, 'state', '_sharding'), 1000),
                            'state/_sharding is unreadable (not valid JSON'),
    'garbage manifest': (lambda f: overwrite(os.path.join(f, 'state', 'manifest.ocdbt'), 0,
                                             b'\xff' * 16), 'manifest.ocdbt'),
    'empty step folder': (empty_folder, 'the folder is empty'),
}


@pytest.mark.parametrize('kind', sorted(DAMAGE))
def test_each_damage_is_named_as_damage_in_one_line(finished, tmp_path, kind):
  """Found from the checkpoint's own files, before orbax reads anything (a failing orbax read
  prints hundreds of lines) and before the saved structure is compared with the config's (a
  damaged structure is not a config change)."""
  workdir = str(tmp_path)
  folder = os.path.join(workdir, 'checkpoints', str(STEPS))
  shutil.copytree(os.path.join(finished[0], 'checkpoints', str(STEPS)), folder)
  damage, reason = DAMAGE[kind]
  damage(folder)
  mngr = checkpoint.manager(workdir)
  with pytest.raises(checkpoint.UnreadableCheckpoint) as raised:
    checkpoint.restore(mngr, STEPS, target_state=None)  # refused before the target is needed
  message = str(raised.value)
  assert message.startswith(f'checkpoint {folder} cannot be read: ') and reason in message
  assert '\n' not in message and len(message) < 700
  with pytest.raises(checkpoint.UnreadableCheckpoint, match=re.escape(message)):
    checkpoint.restore_on_one_device(mngr, STEPS)  # --mode search and ensembles read this way
  mngr.close()


def logged(workdir: str) -> list[dict]:
  """metrics.jsonl without its timing field (examples_per_sec differs between any two runs)."""
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [{k: v for k, v in json.loads(line).items() if k != 'examples_per_sec'} for line in f]


def tensorboard_restarts(workdir: str) -> list[int]:
  """The steps of the purge markers (SessionLog START) in the TensorBoard event files: from the
  marker's step on, TensorBoard hides the events written before it."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  steps = []
  folder = os.path.join(workdir, 'tensorboard')
  for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name), 'rb') as f:
      data = f.read()
    at = 0
    while at < len(data):  # TFRecord: length (8), its CRC (4), the record, its CRC (4)
      length = int.from_bytes(data[at:at + 8], 'little')
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
      at += 16 + length
      if event.session_log.status == event_pb2.SessionLog.START:
        steps.append(event.step)
  return steps


def read(workdir: str, name: str):
  with open(os.path.join(workdir, name), encoding='utf-8') as f:
    return f.read()


def final_params(workdir: str):
  mngr = checkpoint.manager(workdir)
  params = checkpoint.restore_on_one_device(mngr, STEPS)['params']
  mngr.close()
  return jax.device_get(params)


def test_resume_moves_damaged_checkpoints_aside_and_matches_the_run(finished, tmp_path, capsys):
  """The issue's table at once: the newest checkpoint's array file truncated, the one before
  without meta/, metrics.jsonl cut inside a record, config.json and best.json broken."""
  workdir = copy_run(finished, tmp_path)
  ckpts = os.path.join(workdir, 'checkpoints')
  truncate(largest_array_file(os.path.join(ckpts, '15')))
  shutil.rmtree(os.path.join(ckpts, '10', 'meta'))
  damaged = {step: files_of(os.path.join(ckpts, step)) for step in ('10', '15')}
  metrics = os.path.join(workdir, 'metrics.jsonl')
  truncate(metrics, os.path.getsize(metrics) - 40)  # the kill came while step 15 was written
  for name in ('config.json', 'best.json'):
    truncate(os.path.join(workdir, name), 9)
  capsys.readouterr()

  train.train_and_evaluate(run_config(), workdir)

  out = capsys.readouterr().out
  for step in ('15', '10'):
    assert f'checkpoint {ckpts}/{step} cannot be read: ' in out
    assert f'moved to {ckpts}/{step}.unreadable.' in out
    assert files_of(os.path.join(ckpts, f'{step}.unreadable')) == damaged[step]  # kept as found
  assert f'Resumed from {ckpts} at step 5.' in out
  assert f'{workdir}/config.json is damaged: not valid JSON' in out
  assert f'{workdir}/best.json is damaged: not valid JSON' in out
  reference = finished[0]
  assert logged(workdir) == logged(reference)  # the partial record and steps 6-15 logged once
  assert [r['skipped_total'] for r in logged(workdir)] == [0] + [1] * (STEPS - 1)
  assert tensorboard_restarts(workdir) == [6]  # the events of steps 6-15 written before: hidden
  for name in ('config.json', 'eval/selection.jsonl'):
    assert read(workdir, name) == read(reference, name), name
  assert json.loads(read(workdir, 'best.json')) == json.loads(read(reference, 'best.json'))
  test_json = [json.loads(read(w, 'eval/test.json')) for w in (workdir, reference)]
  assert test_json[0]['all'] == test_json[1]['all']  # (its timing fields differ)
  for a, b in zip(jax.tree.leaves(final_params(workdir)), jax.tree.leaves(final_params(reference))):
    np.testing.assert_array_equal(a, b)


def test_no_readable_checkpoint_refuses_and_moves_nothing(finished, tmp_path):
  workdir = copy_run(finished, tmp_path)
  ckpts = os.path.join(workdir, 'checkpoints')
  DAMAGE['garbage in an array file'][0](os.path.join(ckpts, '15'))
  DAMAGE['truncated _sharding'][0](os.path.join(ckpts, '10'))
  empty_folder(os.path.join(ckpts, '5'))
  before = files_of(workdir)
  mngr = checkpoint.manager(workdir)
  with pytest.raises(ValueError, match=rf'^none of the 3 checkpoints in {ckpts} can be read '
                     r'\(step 15: array .*ZSTD.*; step 10: state/_sharding is unreadable .*; '
                     r'step 5: the folder is empty\); copy them back from a backup, or start '
                     r'again with --fresh --overwrite \(deletes them\) or another --workdir$'):
    resume.restore_newest_readable(mngr, None, workdir, [])
  mngr.close()
  assert files_of(workdir) == before


def test_read_only_checkpoints_folder_is_one_line_and_keeps_everything(finished, tmp_path,
                                                                       monkeypatch):
  """A damaged checkpoint in a folder the run may not change: the rename is refused (simulated:
  the tests may run as root, whom permissions do not stop)."""
  workdir = copy_run(finished, tmp_path)
  folder = os.path.join(workdir, 'checkpoints', '15')
  truncate(largest_array_file(folder))
  before = files_of(workdir)

  def refuse(src, dst):
    raise PermissionError(13, 'Permission denied', src, None, dst)

  mngr = checkpoint.manager(workdir)
  target = checkpoint.restore_on_one_device(mngr, 5)  # the saved tree, as a restore target
  monkeypatch.setattr(os, 'rename', refuse)
  with pytest.raises(OSError, match=rf'^checkpoint {folder} cannot be read and cannot be moved '
                     rf'aside to {folder}.unreadable \(Permission denied\); make '
                     rf'{os.path.dirname(folder)} writable, or move it away yourself'):
    resume.restore_newest_readable(mngr, target, workdir, [])
  mngr.close()
  assert files_of(workdir) == before


def test_eval_names_the_readable_steps_instead(finished, tmp_path):
  workdir = copy_run(finished, tmp_path)
  best = os.path.join(workdir, 'best', '15')
  DAMAGE['garbage in an array file'][0](best)
  with pytest.raises(checkpoint.UnreadableCheckpoint,
                     match=rf'^checkpoint {best} cannot be read: array .*ZSTD.*; readable '
                     r'instead: --checkpoint 5, 10 or latest$'):
    train.evaluate_checkpoint(finished[1], workdir)
  assert os.path.isdir(best)  # evaluation moves nothing: the user chooses


def test_search_with_a_damaged_best_is_one_line_with_status_2(finished, tmp_path):
  workdir = copy_run(finished, tmp_path)
  best = os.path.join(workdir, 'best', '15')
  shutil.rmtree(os.path.join(best, 'meta'))
  result = subprocess.run(
      [sys.executable, 'main.py', '--workdir', workdir, '--mode', 'search', '--query', 'a red '
       'circle'], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True,
      text=True, timeout=300, check=False)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines() == [
      f'error: checkpoint {best} cannot be read: meta/metadata is missing; readable instead: '
      '--checkpoint 5, 10 or latest']


def test_broken_best_json_is_rebuilt_from_best(finished, tmp_path, capsys):
  workdir = copy_run(finished, tmp_path)
  path = os.path.join(workdir, 'best.json')
  recorded = json.loads(read(workdir, 'best.json'))
  truncate(path, 9)
  assert evaluate.read_best(workdir) == recorded
  assert json.loads(read(workdir, 'best.json')) == recorded
  assert f'{path} is damaged: not valid JSON' in capsys.readouterr().out
  shutil.rmtree(os.path.join(workdir, 'best'))  # nothing to rebuild it from
  truncate(path, 9)
  with pytest.raises(json_files.DamagedFile, match=rf'^{path} is damaged: not valid JSON \(.*\), '
                     rf'and {workdir}/best holds no readable checkpoint to rebuild it from; '
                     r'delete it \(the next validation is then selected\) or pass '
                     r'--checkpoint STEP$'):
    evaluate.read_best(workdir)


def test_broken_config_json_names_the_file_and_the_remedy(finished, tmp_path):
  workdir = copy_run(finished, tmp_path)
  path = os.path.join(workdir, 'config.json')
  with open(path, 'w', encoding='utf-8') as f:
    f.write('{"model": ')
  with pytest.raises(json_files.DamagedFile, match=rf'^{path} is damaged: not valid JSON '
                     r'\(Expecting value: line 1 column 11 \(char 10\)\); copy it back from a '
                     r'backup, or rewrite it by running the training command'):
    inference.load_workdir_config(workdir)


def test_damaged_dataset_and_clip_cache_name_the_rebuild_command(finished, tmp_path):
  workdir = copy_run(finished, tmp_path)
  config = finished[1]
  builder = datasets.build(config, workdir)
  shard = [n for n in os.listdir(builder.data_dir) if n.startswith('scan_precomp-train.')][0]
  os.remove(os.path.join(builder.data_dir, shard))
  with pytest.raises(datasets.DataError, match=rf'^the built dataset in {builder.data_dir} is '
                     r'damaged \(split train: .*No such file.*\); delete .* and build it again '
                     r'with `python main.py --config <your config> --workdir <workdir> --mode '
                     r'build_data`$'):
    datasets.open_split(builder, 'train')

  clip_files = [os.path.join(r, f) for r, _, names in os.walk(workdir) for f in names
                if f.endswith('.npy') and 'clip_cache' in r and os.path.basename(r) == 'dev']
  assert clip_files
  truncate(clip_files[0])
  with pytest.raises(datasets.DataError, match=rf'^{clip_files[0]}: unreadable \(.*\); delete '
                     rf'.* and rebuild it with `{clip_features.BUILD_COMMAND}`'):
    datasets.open_split(builder, 'dev')
