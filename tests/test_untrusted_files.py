"""Loading a file never runs its code: checkpoints, TorchScript archives, results files and the
`.npy` readers, each given a file whose pickle would create a marker directory when unpickled
the ordinary way. The marker must not appear, the refusal names the file (and, for the
converters, the --trust_pickle opt-in, which does run the payload, as documented)."""

import argparse
import collections
import json
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from aahr_jax import numpy_pickle, results_file, search_index
from conversion import torch_load, vse_checkpoint
from conversion.__main__ import main as conversion_main
from input_pipeline import clip_features, scan_files
from input_pipeline.datasets import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class MarkerPayload:
  """Unpickled the ordinary way, it calls os.mkdir(marker): proof that the file ran code."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (os.mkdir, (self.marker,))


def tensors(*names):
  return collections.OrderedDict((n, torch.zeros(2, 3)) for n in names)


def original_checkpoint(opt: argparse.Namespace) -> dict:
  """The layout of the released AAHR / HREM / VSE-infinity model_best.pth."""
  return {'model': [tensors('fc.weight'), tensors('linear.weight')], 'opt': opt, 'epoch': 3,
          'best_rsum': 512.5, 'Eiters': 1234}


def clip_model_json(tmp_path):
  """An open_clip model config file (a name such as ViT-B-32 would import open_clip: seconds)."""
  path = tmp_path / 'clip.json'
  path.write_text(json.dumps({'embed_dim': 8, 'vision_cfg': {'width': 16}}))
  return path


def run_conversion(capsys, *argv):
  capsys.readouterr()
  rc = conversion_main([str(a) for a in argv])
  return rc, capsys.readouterr().err


def assert_refused(rc, err, path, *fragments):
  lines = err.strip().splitlines()
  assert rc == 2 and len(lines) == 1 and lines[0].startswith('error: '), err
  for fragment in (str(path),) + fragments:
    assert fragment in lines[0], (fragment, lines[0])


# ------------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize('subcommand', ['aahr', 'vse_infty'])
def test_original_checkpoint_with_payload_in_opt_is_refused(subcommand, tmp_path, capsys):
  marker = tmp_path / 'ran'
  src = tmp_path / 'model_best.pth'
  torch.save(original_checkpoint(argparse.Namespace(lr=2e-4, hook=MarkerPayload(marker))), src)
  rc, err = run_conversion(capsys, subcommand, '--src', src, '--out', tmp_path / 'out')
  assert_refused(rc, err, src, 'posix.mkdir', '--trust_pickle')
  assert not marker.exists()


@pytest.mark.parametrize('legacy_format', [False, True])
@pytest.mark.parametrize('subcommand', ['bert', 'open_clip'])
def test_weights_file_with_payload_is_refused(subcommand, legacy_format, tmp_path, capsys):
  marker = tmp_path / 'ran'
  src = tmp_path / 'pytorch_model.bin'
  torch.save({'state_dict': tensors('encoder.weight'), 'extra': MarkerPayload(marker)}, src,
             _use_new_zipfile_serialization=not legacy_format)
  model = ['--model', clip_model_json(tmp_path)] if subcommand == 'open_clip' else []
  rc, err = run_conversion(capsys, subcommand, *model, '--src', src,
                           '--out', tmp_path / 'x.safetensors')
  assert_refused(rc, err, src, 'posix.mkdir', '--trust_pickle')
  assert not marker.exists()


def test_original_layout_loads_without_the_flag(tmp_path):
  src = tmp_path / 'model_best.pth'
  torch.save(original_checkpoint(argparse.Namespace(nhead=16, lr_schedules=[15, 25],
                                                    data_path='/data', no_imgnorm=False)), src)
  checkpoint = vse_checkpoint.read(src)
  assert checkpoint.opt == {'nhead': 16, 'lr_schedules': [15, 25], 'data_path': '/data',
                            'no_imgnorm': False}
  assert checkpoint.info == {'epoch': 3, 'best_rsum': 512.5, 'Eiters': 1234}
  assert set(checkpoint.image) == {'fc.weight'} and set(checkpoint.text) == {'linear.weight'}


def test_torch_before_2_6_is_not_trusted_to_load_weights_only(tmp_path, monkeypatch):
  src = tmp_path / 'pytorch_model.bin'
  torch.save(tensors('encoder.weight'), src)
  monkeypatch.setattr(torch, '__version__', '2.5.1+cu124')
  with pytest.raises(torch_load.UntrustedFileError, match='CVE-2025-32434') as refusal:
    torch_load.load(src)
  assert str(src) in str(refusal.value) and '--trust_pickle' in str(refusal.value)


@pytest.mark.parametrize('subcommand', ['aahr', 'bert'])
def test_trust_pickle_runs_the_file_as_documented(subcommand, tmp_path, capsys):
  marker = tmp_path / 'ran'
  src = tmp_path / 'model_best.pth'
  torch.save(original_checkpoint(argparse.Namespace(hook=MarkerPayload(marker))), src)
  run_conversion(capsys, subcommand, '--src', src, '--out', tmp_path / 'x.safetensors',
                 '--trust_pickle')   # the tiny tensors then fail the key checks: irrelevant here
  assert marker.is_dir()


def test_torchscript_archive_needs_the_flag(tmp_path, capsys):
  linear = torch.nn.Linear(3, 2)
  src = tmp_path / 'ViT-B-32.pt'
  torch.jit.script(linear).save(str(src))
  rc, err = run_conversion(capsys, 'open_clip', '--model', clip_model_json(tmp_path),
                           '--src', src, '--out', tmp_path / 'x.safetensors')
  assert_refused(rc, err, src, 'TorchScript', 'open_clip_model.safetensors', '--trust_pickle')
  state = torch_load.load(src, trust_pickle=True)
  assert set(state) == {'weight', 'bias'}
  torch.testing.assert_close(state['weight'], linear.weight.detach())


# ------------------------------------------------------------------------------- results files

def original_results_file(path, npts=2):
  """A results file as the originals wrote it (numpy 1.x, Python 3.9: np.save pickles with
  protocol 3 and `numpy.core` names), with npts a numpy integer to cover numpy's scalars."""
  content = np.empty((), dtype=object)
  sims = np.arange(npts * 5 * npts, dtype=np.float64).reshape(npts, 5 * npts)
  content[()] = {'npts': np.int64(npts), 'sims': sims}
  data = pickle.dumps(content, protocol=3).replace(b'numpy._core.', b'numpy.core.')
  with open(path, 'wb') as f:
    np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(content))
    f.write(data)
  return sims


def test_results_files_of_the_originals_and_of_np_save_load(tmp_path):
  old = tmp_path / 'results_f30k.npy'
  sims = original_results_file(old)
  np.testing.assert_array_equal(results_file.read(str(old)), sims)
  new = tmp_path / 'results_coco.npy'
  sims = np.random.default_rng(0).normal(size=(3, 15))
  np.save(new, {'npts': 3, 'sims': sims})
  np.testing.assert_array_equal(results_file.read(str(new)), sims)


@pytest.mark.parametrize('where', ['dict value', 'sims'])
def test_results_file_with_payload_is_refused(where, tmp_path):
  marker = tmp_path / 'ran'
  content = {'npts': 2, 'sims': np.zeros((2, 10))}
  if where == 'sims':
    content['sims'] = MarkerPayload(marker)
  else:
    content['note'] = MarkerPayload(marker)
  path = tmp_path / 'results_f30k.npy'
  np.save(path, content)
  with pytest.raises(numpy_pickle.ForbiddenContentError) as refusal:
    results_file.read(str(path))
  assert str(path) in str(refusal.value) and 'posix.mkdir' in str(refusal.value)
  assert not marker.exists()


def test_results_pickle_cannot_call_ndarray_directly(tmp_path):
  """Only numpy's _reconstruct may build arrays: the class itself is not callable from the
  file (a hand-written pickle: numpy.ndarray((2,)))."""
  path = tmp_path / 'direct.npy'
  with open(path, 'wb') as f:
    np.lib.format.write_array_header_1_0(f, {'descr': '|O', 'fortran_order': False,
                                             'shape': (2,)})
    f.write(b'\x80\x02cnumpy\nndarray\nK\x02\x85\x85R.')
  with pytest.raises(ValueError, match='damaged pickle'):
    numpy_pickle.load_object_npy(str(path))


def test_main_eval_refuses_results_payload_with_status_2(tmp_path):
  marker = tmp_path / 'ran'
  path = tmp_path / 'results_f30k.npy'
  np.save(path, {'npts': 2, 'sims': np.zeros((2, 10)), 'note': MarkerPayload(marker)})
  env = dict(os.environ, JAX_PLATFORMS='cpu', HF_HUB_OFFLINE='1')
  result = subprocess.run(
      [sys.executable, 'main.py', '--config', 'configs/f30k.py', '--workdir',
       str(tmp_path / 'run'), '--mode', 'eval', '--results', str(path)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert_refused(result.returncode, result.stderr, path, 'posix.mkdir')
  assert not marker.exists()


# ------------------------------------------------------------------------------- .npy readers

def pickled_npy(path, marker):
  np.save(path, np.array([MarkerPayload(marker)], dtype=object))
  return path


def test_npy_readers_never_unpickle(tmp_path):
  marker = tmp_path / 'ran'
  features = pickled_npy(tmp_path / 'train_ims.npy', marker)
  with pytest.raises(DataError, match=re.escape(str(features))):
    scan_files.open_features(str(features))
  pickled_npy(tmp_path / clip_features.IMAGE_FILE, marker)
  with pytest.raises(DataError, match=re.escape(str(tmp_path / clip_features.IMAGE_FILE))):
    open_cache_file = clip_features.CachedClip._open  # pylint: disable=protected-access
    open_cache_file(str(tmp_path), clip_features.IMAGE_FILE, 1)
  images_path, meta_path = search_index.index_paths(str(tmp_path), 'test')
  os.makedirs(os.path.dirname(images_path))
  pickled_npy(images_path, marker)
  with open(meta_path, 'w', encoding='utf-8') as f:
    json.dump({'checkpoint': 'x'}, f)
  with pytest.raises(ValueError, match=re.escape(images_path)):
    search_index.load_index(str(tmp_path), 'test')
  assert not marker.exists()
