"""Smoke test of benchmarks/train_step.py: on the CPU at tiny sizes it runs every default
variant and prints the table. No timing assertions (timings are for the GPU suite)."""

import json

from benchmarks import train_step


def test_train_step_benchmark_runs_and_prints_the_table(tmp_path, capsys):
  out = tmp_path / 'result.json'
  train_step.main(['--config', 'configs/demo.py:model=aahr', '--tiny', '--batch_size', '8',
                   '--tokens', '12', '--steps', '1', '--json', str(out)])
  printed = capsys.readouterr().out
  assert '| variant | ms/step | examples/s |' in printed
  rows = {r['variant']: r for r in json.loads(out.read_text())['results']}
  for variant in ('jax_cached', 'jax_online', 'torch_eager'):
    assert rows[variant].get('ms'), rows[variant]
  assert rows['jax_cached']['recompiles'] == 0
