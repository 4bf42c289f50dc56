"""Smoke tests of benchmarks/train_step.py on the CPU at tiny sizes: it runs and prints the
table. No timing assertions (timings are for the GPU suite)."""

import json

import pytest

from benchmarks import bert_layer
from benchmarks import residuals
from benchmarks import selection_ops
from benchmarks import trace_report
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


@pytest.mark.parametrize('args, message', [
    (['--variants', 'jax_cached,bogus'], "unknown variant(s) ['bogus']"),
    (['--batch_size', '0'], '--batch_size 0: expected a positive batch size'),
])
def test_train_step_benchmark_refuses_bad_arguments_before_measuring(args, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    train_step.main(['--config', 'configs/demo.py:model=aahr', *args])
  assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_online_clip_variant_runs(tmp_path):
  rows = run(tmp_path, 'jax_online')
  assert rows['jax_online'].get('ms'), rows['jax_online']


def test_selection_ops_benchmark_runs(capsys):
  rows = selection_ops.main(['--batch_size', '8', '--regions', '5', '--words', '6', '--dim', '4',
                             '--chunks', '3,4', '--repeats', '1'])
  assert len(rows) == 5 and all(before > 0 and after > 0 for _, before, after in rows)
  assert '| operation | earlier form ms | current ms | speed-up |' in capsys.readouterr().out


def test_bert_layer_benchmark_runs(capsys):
  results = bert_layer.main(['--batch_size', '4', '--tokens', '8', '--hidden', '64',
                             '--dtype', 'float32', '--repeats', '1'])
  assert set(results) == {'earlier form', 'current'}
  assert all(saved > 0 and ms > 0 for saved, ms in results.values())
  assert '| form | saved for backward MB | forward+backward ms |' in capsys.readouterr().out


def test_residuals_report_runs_and_shows_no_flax_layer_norm_intermediates(capsys):
  report = residuals.main(['--config', 'configs/coco.py', '--tiny', '--batch_size', '8',
                           '--tokens', '12', '--top', '5'])
  assert report['total_bytes'] > 0
  sources = [source for source, _, _ in report['by_source']]
  assert any('_gelu_exact_fwd' in source for source in sources)
  assert any('_cosine_logits_fwd' in source for source in sources)
  # The step's LayerNorms keep their inputs and row statistics only (layers.LayerNorm).
  assert not any('normalization.py' in source for source in sources)
  assert '| MB | share | dtype | output of | made at |' in capsys.readouterr().out


def test_trace_report_attributes_kernels_to_model_parts():
  hlo = '\n'.join([
      '  %loop_add_fusion.7 = bf16[8,4]{1,0} fusion(%p0, %p1), kind=kLoop, calls=%f, '
      'metadata={op_name="jit(<lambda>)/AAHR/AAHR.encode_captions/txt/bert/encoder/add"}',
      '  ROOT %input_reduce_fusion.2 = f32[8]{0} fusion(%a), kind=kInput, calls=%g, metadata={'
      'op_name="jit(<lambda>)/transpose(jvp(AAHR))/AAHR.encode_images/img/while/body/fc/reduce_sum"}',
      '  %sort.3.0 = s32[8,4]{1,0} sort(%x), dimensions={1}, to_apply=%cmp',
  ])
  device = lambda name, ts, dur, tid=1: {'ph': 'X', 'pid': 7, 'tid': tid, 'name': name,
                                         'ts': ts, 'dur': dur}
  trace = {'traceEvents': [
      {'ph': 'M', 'pid': 7, 'name': 'process_name', 'args': {'name': '/device:GPU:0'}},
      {'ph': 'M', 'pid': 9, 'name': 'process_name', 'args': {'name': '/host:CPU'}},
      {'ph': 'X', 'pid': 9, 'tid': 1, 'name': 'loop_add_fusion_7', 'ts': 0, 'dur': 999},
      device('loop_add_fusion_7', 0, 10), device('nvjet_sm90_gemm', 10, 30),
      device('input_reduce_fusion_2', 40, 20), device('memcpy128', 60, 4),
      device('sort_3_0', 64, 6), device('nvjet_sm90_gemm', 0, 8, tid=2),  # another stream
  ]}
  result = trace_report.analyse(trace, hlo, steps=2, depth=3)
  assert result['kernels_per_step'] == 3 and result['busy_ms'] == 78 / 2 / 1e3
  scope = {k: v * 2e3 for k, v in result['by_scope_ms'].items()}  # back to microseconds
  assert scope == pytest.approx({'FWD AAHR.encode_captions/txt/bert': 10,
                   'FWD AAHR.encode_captions/txt/bert [after]': 30,
                   'BWD AAHR.encode_images/img/fc': 20,
                   'BWD AAHR.encode_images/img/fc [after]': 4 + 6,  # the sort has no op_name
                   '(unattributed) [after]': 8})
  category = {k: v * 2e3 for k, v in result['by_category_ms'].items()}
  assert category == pytest.approx({'gemm (library)': 38, 'elementwise fusion': 10,
                                    'reduction / transpose fusion': 20, 'copy / memset': 4,
                                    'sort': 6})


def test_trace_report_reads_cpu_thunks_without_counting_containers_twice():
  hlo = '\n'.join([
      '  %add_fusion.7 = f32[8,4]{1,0} fusion(%p0, %p1), kind=kLoop, calls=%f, '
      'metadata={op_name="jit(<lambda>)/AAHR/AAHR.encode_captions/txt/Dropout_0/add"}',
      '  %ynn_fusion.2 = f32[8,8]{1,0} fusion(%a, %b), kind=kCustom, calls=%g, metadata={'
      'op_name="jit(<lambda>)/transpose(jvp(AAHR))/AAHR.encode_images/img/fc/dot_general"}',
      '  %ynn_fusion.3 = f32[8]{0} fusion(%a), kind=kCustom, calls=%h, metadata={'
      'op_name="jit(<lambda>)/AAHR/AAHR.encode_images/img/reduce_sum"}',
      '%g (a: f32[8,4], b: f32[4,8]) -> f32[8,8] {',
      '  ROOT %dot.1 = f32[8,8]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}',
      '}',
      '%h (a: f32[8,4]) -> f32[8] {',
      '  ROOT %reduce.1 = f32[8]{0} reduce(%a, %z), dimensions={1}, to_apply=%add',
      '}',
      '  %while.5 = (s32[], f32[8]{0}) while(%t), condition=%c, body=%b, '
      'metadata={op_name="jit(<lambda>)/AAHR/AAHR.encode_images/img/while"}',
  ])
  host = lambda name, ts, dur, tid=1: {'ph': 'X', 'pid': 9, 'tid': tid, 'name': name,
                                       'ts': ts, 'dur': dur}
  trace = {'traceEvents': [
      {'ph': 'M', 'pid': 9, 'name': 'process_name', 'args': {'name': '/host:CPU'}},
      host('ThunkExecutor::Execute', 0, 500), host('while.5', 0, 100),  # holds add_fusion.7
      host('add_fusion.7', 10, 40), host('ynn_fusion.2', 120, 60, tid=2),
      host('ynn_fusion.3', 200, 5),
  ]}
  result = trace_report.analyse(trace, hlo, steps=1, depth=3)
  assert result['kernels_per_step'] == 3 and result['busy_ms'] == 105 / 1e3
  assert result['by_scope_ms'] == pytest.approx({'FWD AAHR.encode_captions/txt/Dropout_0': 0.04,
                                                 'BWD AAHR.encode_images/img/fc': 0.06,
                                                 'FWD AAHR.encode_images/img/reduce_sum': 0.005})
  assert result['by_category_ms'] == pytest.approx({
      'elementwise fusion': 0.04, 'gemm (XNNPACK fusion)': 0.06,
      'XNNPACK fusion without a matmul': 0.005})
