"""Shared test setup: offline, CPU, repository root importable, the `slow` marker, and the
session's tiny AAHR reference run (`scaling_dir`)."""

import os
import sys

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import pytest  # pylint: disable=wrong-import-position

import scaling_runs  # pylint: disable=wrong-import-position


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: full-size parity or end-to-end runs (minutes)')


@pytest.fixture(scope='session')
def scaling_dir(tmp_path_factory):
  """The shared data_dir and the 8-device reference run (built once per session)."""
  return scaling_runs.prepared_base(tmp_path_factory.getbasetemp() / 'scaling')
