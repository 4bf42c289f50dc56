"""pyproject.toml: the console command resolves, the packages are found, dependencies are the
running requirements; the Makefile's venv gets the development ones."""

import importlib
import os
import subprocess
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('aahr_jax', 'input_pipeline', 'conversion', 'configs', 'benchmarks')


def _pyproject() -> dict:
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    return tomllib.load(f)


def test_console_command_is_the_main_py_entry_point():
  target = _pyproject()['project']['scripts']['aahr-jax']
  module_name, function = target.split(':')
  module = importlib.import_module(module_name)
  assert callable(getattr(module, function))
  with open(os.path.join(ROOT, 'main.py'), encoding='utf-8') as f:
    assert f'{module_name.split(".")[-1]}.{function}()' in f.read()   # main.py calls the same


def test_every_package_with_code_is_installed():
  include = _pyproject()['tool']['setuptools']['packages']['find']['include']
  assert include == [f'{name}*' for name in PACKAGES]
  for root, dirs, files in os.walk(ROOT):
    dirs[:] = [d for d in dirs if not d.startswith(('.', '__')) and d not in ('tests', 'runs')]
    relative = os.path.relpath(root, ROOT)
    if relative == '.' or not any(f.endswith('.py') for f in files):
      continue
    assert relative.split(os.sep)[0] in PACKAGES, f'{relative} is not installed'
    assert '__init__.py' in files, f'{relative} has no __init__.py (not found by setuptools)'


def test_dependencies_are_the_running_requirements():
  dynamic = _pyproject()['tool']['setuptools']['dynamic']['dependencies']['file']
  assert dynamic == ['requirements.txt']
  with open(os.path.join(ROOT, 'requirements.txt'), encoding='utf-8') as f:
    lines = [line.strip() for line in f if line.strip()[:1].isalnum()]
  assert all('#' not in line for line in lines), 'pyproject.toml would take the comment in'
  names = {line.split('==')[0] for line in lines}
  assert {'jax', 'flax', 'optax', 'orbax-checkpoint', 'grain', 'tokenizers'} <= names
  assert not names & {'torch', 'transformers', 'pytest'}, 'conversion/test pins: -dev file'
  with open(os.path.join(ROOT, 'requirements-dev.txt'), encoding='utf-8') as f:
    assert '-r requirements.txt' in f.read().splitlines()
  with open(os.path.join(ROOT, 'Makefile'), encoding='utf-8') as f:
    assert 'pip install --disable-pip-version-check -r requirements-dev.txt' in f.read()


def test_help_lists_every_mode_on_one_line():
  from aahr_jax import cli   # pylint: disable=import-outside-toplevel
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), '--help'], cwd='/',
                       capture_output=True, text=True, timeout=60).stdout   # absl exits 1 after --help
  for mode, line in cli.MODES.items():
    assert f'{mode}: {line}' in out
