"""Shared test setup: offline, CPU, repository root importable, the `slow` marker, a compilation
cache shared by the session's processes, and the session's tiny AAHR reference run
(`scaling_dir`).

`make test` runs the files on two pytest-xdist workers (`-n 2 --dist loadfile`): a file's tests
share one worker, so module fixtures are built once; what the whole session shares (the
compilation cache, `scaling_dir`) is shared by the workers too.
"""

import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
from aahr_jax import host_malloc  # pylint: disable=wrong-import-position

host_malloc.configure()  # the test process allocates as main.py does (aahr_jax/host_malloc.py)

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# Tests compile the same steps again and again, in this process and in the `main.py` processes
# they start (resume, preemption, layouts): they share one compilation cache for the session
# (set before JAX is imported; main.py and the subprocesses read the variable). A developer's own
# JAX_COMPILATION_CACHE_DIR is left alone. xdist's workers inherit the variables from the
# controlling process, which imports this file first and removes the folder at the end. With a
# size limit JAX locks the folder for every read and write, so one process never reads an entry
# another is writing (main.py sets one; the tests that compile in their own process get it here).
_SESSION_CACHE = None
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _SESSION_CACHE = tempfile.mkdtemp(prefix='aahr_test_xla_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _SESSION_CACHE
os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(4 * 2**30))

import filelock  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

import scaling_runs  # pylint: disable=wrong-import-position


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: full-size parity or end-to-end runs (minutes)')


def pytest_unconfigure(config):
  del config
  if _SESSION_CACHE:
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope='session')
def scaling_dir(tmp_path_factory):
  """The shared data_dir and the 8-device reference run, built once per session: under xdist by
  the first worker that asks, in the folder the workers' temporary folders share, while the
  others wait."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    base = base.parent  # <basetemp>/popen-gw0 -> <basetemp>, the same for every worker
  with filelock.FileLock(str(base / 'scaling.lock')):
    return scaling_runs.prepared_base(base / 'scaling')
