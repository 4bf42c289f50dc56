"""Smoke tests of benchmarks/train_step.py on the CPU at tiny sizes: it runs and prints the
table. No timing assertions (timings are for the GPU suite)."""

import json

import pytest

from benchmarks import selection_ops
from benchmarks import train_step


def run(tmp_path, variants: str) -> dict:
  out = tmp_path / 'result.json'
  train_step.main(['--config', 'configs/demo.py:model=aahr', '--tiny', '--batch_size', '8',
                   '--tokens', '12', '--steps', '1', '--variants', variants, '--json', str(out)])
  rows = {r['variant']: r for r in json.loads(out.read_text())['results']}
  return rows


def test_train_step_benchmark_runs_and_prints_the_table(tmp_path, capsys):
  # The scanned-BERT variant: the same code path as jax_cached plus its config change, and the
  # table's speed-up column falls back to it when jax_cached did not run.
  rows = run(tmp_path, 'jax_cached_scan,torch_eager')
  printed = capsys.readouterr().out
  assert '| variant | ms/step | synced ms/step | examples/s |' in printed
  assert '| jax_cached_scan speed-up |' in printed
  for variant in ('jax_cached_scan', 'torch_eager'):
    assert rows[variant].get('ms') and rows[variant].get('ms_synced'), rows[variant]
  assert rows['jax_cached_scan']['recompiles'] == 0 and rows['jax_cached_scan']['bert_scan']


@pytest.mark.slow
def test_online_clip_variant_runs(tmp_path):
  rows = run(tmp_path, 'jax_online')
  assert rows['jax_online'].get('ms'), rows['jax_online']


def test_selection_ops_benchmark_runs(capsys):
  rows = selection_ops.main(['--batch_size', '8', '--regions', '5', '--dim', '4',
                             '--repeats', '1'])
  assert len(rows) == 3 and all(before > 0 and after > 0 for _, before, after in rows)
  assert '| operation | earlier form ms | current ms | speed-up |' in capsys.readouterr().out
