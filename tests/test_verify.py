"""verify_data (V1-V14) and the build-time checks on broken miniatures: each problem is one line
naming the file and the expectation, the exit status is non-zero, and no dataset is half-built."""

import os
import subprocess
import sys

import numpy as np
import pytest

import test_datasets as miniature   # the miniature layouts of tests/test_datasets.py
from input_pipeline import datasets
from input_pipeline import scan_files
from input_pipeline import verify

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {'captions': {'train': 60, 'dev': 35, 'test': 25},
         'rows': {'train': (12,), 'dev': (35, 7), 'test': (25, 5)},
         'id_range': (0, 23), 'id_union': 24}
PRECOMP = os.path.join('f30k', 'precomp')


@pytest.fixture
def data(tmp_path):
  miniature.f30k_aahr(tmp_path / 'data')
  return tmp_path / 'data'


def check(data, **kwargs) -> verify.Report:
  return verify.run(str(data), 'f30k', region_dim=miniature.DIM, expected=SMALL, **kwargs)


def truncate_npy(data):
  path = data / PRECOMP / 'train_ims.npy'
  path.write_bytes(path.read_bytes()[:-5000])


def wrong_dimension(data):
  np.save(data / PRECOMP / 'test_ims.npy', np.zeros((25, 36, miniature.DIM + 1), np.float32))


def drop_captions(data):
  path = data / PRECOMP / 'dev_caps.txt'
  path.write_text('\n'.join(path.read_text().split('\n')[:-3]) + '\n')   # 33 lines


def empty_line(data):
  path = data / PRECOMP / 'test_caps.txt'
  lines = path.read_text().split('\n')
  lines[3] = '   '
  path.write_text('\n'.join(lines))


def not_utf8(data):
  path = data / PRECOMP / 'train_caps.txt'
  path.write_bytes(path.read_bytes().replace(b'picture 4 ', b'picture \xff\xfe4 ', 1))


def missing_image(data):
  os.remove(data / 'f30k' / 'flickr30k-images' / '1020.jpg')


def corrupt_jpeg(data):
  path = data / 'f30k' / 'flickr30k-images' / '1003.jpg'
  path.write_bytes(path.read_bytes()[:40])


def unmapped_id(data):
  path = data / 'f30k' / 'id_mapping.json'
  path.write_text(path.read_text().replace('"17": "1017.jpg", ', ''))


BROKEN = {   # how to break it -> (check id, file named in the message, expectation stated)
    'truncated npy': (truncate_npy, 'V5', 'train_ims.npy', 'truncated'),
    'wrong feature dimension': (wrong_dimension, 'V4', 'test_ims.npy', '(R, 36, 8)'),
    'caption count': (drop_captions, 'V3', 'dev_caps.txt', 'expected a multiple of 5'),
    'empty caption line': (empty_line, 'V3', 'test_caps.txt', 'line(s) 4'),
    'non-UTF-8 text': (not_utf8, 'V3', 'train_caps.txt:21', 'expected UTF-8'),
    'missing image file': (missing_image, 'V11', '1020.jpg', 'image file not found'),
    'corrupt JPEG': (corrupt_jpeg, 'V11', '1003.jpg', 'cannot decode'),
    'id missing from id_mapping.json': (unmapped_id, 'V11', 'id_mapping.json', 'image id 17'),
}
# What the build (training's path) says for the same problems; image problems need use_clip.
BUILD_MESSAGES = {
    'truncated npy': 'train_ims.npy: .* bytes, expected',
    'wrong feature dimension': r'test_ims.npy: shape \(25, 36, 9\), expected',
    'caption count': 'dev_caps.txt: 33 caption lines, expected a multiple of 5',
    'empty caption line': 'test_caps.txt: 1 empty caption line',
    'non-UTF-8 text': 'train_caps.txt:21: not UTF-8',
    'missing image file': '1020.jpg: image file not found',
    'id missing from id_mapping.json': 'id_mapping.json: no entry for image id 17',
}


def test_clean_miniature_passes(data):
  report = check(data)
  assert report.errors == [] and report.warnings == [], report.lines()
  assert any(line.startswith('V13 test') for line in report.info)
  assert any('one per caption' in line for line in report.info)


@pytest.mark.parametrize('name', list(BROKEN))
def test_each_problem_is_reported_with_file_and_expectation(data, name):
  breaker, check_id, where, expected = BROKEN[name]
  breaker(data)
  report = check(data)
  matching = [e for e in report.errors if e.startswith(check_id) and where in e and expected in e]
  assert matching, report.errors


@pytest.mark.parametrize('name', list(BUILD_MESSAGES))
def test_build_refuses_broken_files_and_writes_nothing(data, tmp_path, name):
  BROKEN[name][0](data)
  config = miniature.config_for('f30k', data, tmp_path)
  config.model.use_clip = True
  with pytest.raises(scan_files.DataError, match=BUILD_MESSAGES[name]):
    datasets.build(config, str(tmp_path / 'w'))
  written = [f for d, _, files in os.walk(tmp_path / 'tfds') for f in files if '.config' not in d]
  assert written == []


def test_per_caption_rows_must_repeat_and_ids_must_be_disjoint(data):
  feats = np.load(data / PRECOMP / 'dev_ims.npy')
  feats[1, 0, 0] += 1.0
  np.save(data / PRECOMP / 'dev_ims.npy', feats)
  ids = (data / PRECOMP / 'test_ids.txt').read_text().replace('19\n', '3\n')
  (data / PRECOMP / 'test_ids.txt').write_text(ids)
  errors = check(data).errors
  assert any(e.startswith('V9') and 'rows 0..4 differ' in e for e in errors), errors
  assert any(e.startswith('V10') and 'expected disjoint' in e for e in errors), errors


def test_cli_prints_one_line_per_problem_and_fails(data, tmp_path):
  corrupt_jpeg(data)
  missing_image(data)
  env = dict(os.environ, HF_HUB_OFFLINE='1', JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, 'main.py', '--config', 'configs/demo.py', '--workdir', str(tmp_path / 'w'),
       '--mode', 'verify_data', '--config.data.name=f30k', f'--config.data.manual_dir={data}',
       f'--config.data.region_dim={miniature.DIM}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 1, result.stderr
  errors = [line for line in result.stdout.splitlines() if line.startswith('ERROR')]
  assert any('1020.jpg: image file not found' in e for e in errors)
  assert any('1003.jpg: cannot decode' in e for e in errors)
  assert any('train_caps.txt: 60 captions, expected 145,000' in e for e in errors)
  assert 'verify_data FAILED' in result.stdout.splitlines()[-1]
  assert os.path.isfile(tmp_path / 'w' / 'verify_data.json')
