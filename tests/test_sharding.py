"""Sharded training gives the single-device result: rules, meshes, different-mesh restore.

The end-to-end tests run main.py on 8 / 4 / 1 fake CPU devices in subprocesses (the device count
is fixed when JAX starts, so it cannot change inside this process).
"""

import os
import types

import jax
import numpy as np
import pytest

from aahr_jax import sharding
import scaling_runs

FSDP_MESH = "(('data',4),('fsdp',2))"


def fake_mesh(**axes):
  """What spec_for reads of a mesh: axis names and sizes."""
  return types.SimpleNamespace(axis_names=tuple(axes), shape=dict(axes))


def test_fsdp_splits_the_largest_divisible_dimension():
  mesh = fake_mesh(data=4, fsdp=2)
  assert sharding.spec_for('w', (3, 8), 'fsdp', mesh, 0) == jax.sharding.PartitionSpec(
      None, 'fsdp')
  assert sharding.spec_for('w', (3, 5), 'fsdp', mesh, 0) == jax.sharding.PartitionSpec(
      None, None)  # nothing divisible: replicated
  assert sharding.spec_for('w', (8, 8), 'fsdp', mesh, 100) == jax.sharding.PartitionSpec(
      None, None)  # below the size threshold
  assert sharding.spec_for('w', (8, 8), 'fsdp', fake_mesh(data=8), 0) == \
      jax.sharding.PartitionSpec(None, None)  # no fsdp axis: a no-op


def test_tensor_parallel_rules_and_errors():
  mesh = fake_mesh(data=2, model=2, fsdp=2)
  assert sharding.spec_for('q', (4, 6), 'model:1|fsdp', mesh, 0) == jax.sharding.PartitionSpec(
      'fsdp', 'model')
  assert sharding.spec_for('q', (3, 4, 6), 'model:-1', mesh, 0) == jax.sharding.PartitionSpec(
      None, None, 'model')  # negative dims fit the scanned (stacked) layout too
  with pytest.raises(ValueError, match='cannot be split'):
    sharding.spec_for('q', (4, 5), 'model:1', mesh, 0)
  with pytest.raises(ValueError, match='unknown part'):
    sharding.spec_for('q', (4, 4), 'shard', mesh, 0)


def test_state_rules_first_match_and_catch_all():
  mesh = sharding.create_mesh((('data', -1),))
  state = {'step': jax.ShapeDtypeStruct((), np.int32),
           'params': {'txt': {'w': jax.ShapeDtypeStruct((4, 4), np.float32)}}}
  shardings = sharding.state_shardings(state, (('params/txt/.*', 'fsdp'), ('.*', 'replicate')),
                                       mesh)
  assert shardings['params']['txt']['w'].spec == jax.sharding.PartitionSpec(None, None)
  with pytest.raises(ValueError, match='matches no rule'):
    sharding.state_shardings(state, (('nothing', 'replicate'),), mesh)


def test_mesh_errors_name_the_problem():
  with pytest.raises(ValueError, match='axis names'):
    sharding.create_mesh((('batch', -1),))
  with pytest.raises(ValueError, match='do not divide the 1 devices'):
    sharding.create_mesh((('data', 3),))


def test_prefetch_to_device_keeps_order_and_reads_only_size_ahead():
  pulled = []

  def source():
    for i in range(5):
      pulled.append(i)
      yield i

  out = sharding.prefetch_to_device(source(), lambda i: 10 * i, size=2)
  assert next(out) == (0, 0)
  assert pulled == [0, 1, 2]  # the item in use and two transfers in flight, no more
  assert list(out) == [(1, 10), (2, 20), (3, 30), (4, 40)]
  assert list(sharding.prefetch_to_device(iter([]), lambda i: i)) == []


@pytest.mark.slow
def test_losses_and_params_equal_on_1_8_and_data_x_fsdp(scaling_dir):
  data = str(scaling_dir / 'data')
  reference = str(scaling_dir / 'ref8')
  one = str(scaling_dir / 'one_device')
  fsdp = str(scaling_dir / 'fsdp4x2')
  scaling_runs.run_main(one, data, devices=1)
  scaling_runs.run_main(fsdp, data, devices=8, mesh=FSDP_MESH,
                        extra=["--config.sharding_rules=(('.*','fsdp'),)"])
  steps = range(1, scaling_runs.STEPS_PER_EPOCH + 1)
  ref_logs = scaling_runs.logged_steps(reference)
  for other, what in ((one, '1 device'), (fsdp, '4x2 data x fsdp')):
    scaling_runs.assert_losses_close(ref_logs, scaling_runs.logged_steps(other), steps,
                                     what=what)
  # Every term took part: SwAV and the graph from step 2, MoCo from step 3.
  last = ref_logs[scaling_runs.STEPS_PER_EPOCH]
  assert last['weight_swav'] > 0 and last['weight_graph'] > 0 and last['weight_moco'] > 0
  ref_params = scaling_runs.restore_params(reference, scaling_runs.STEPS_PER_EPOCH)
  for other in (one, fsdp):
    diff, path = scaling_runs.max_param_diff(
        ref_params, scaling_runs.restore_params(other, scaling_runs.STEPS_PER_EPOCH))
    print(f"{other}: largest parameter difference {diff:.2e} ({path})")
    assert diff <= scaling_runs.PARAM_ATOL, (other, path, diff)


@pytest.mark.slow
def test_bert_tensor_parallel_on_data_x_model_matches(scaling_dir):
  """BERT kernels split over a `model` axis (4 x 2 data x model): the same 5 steps."""
  workdir = str(scaling_dir / 'tensor_parallel')
  rules = repr(sharding.BERT_TENSOR_PARALLEL).replace(' ', '')
  scaling_runs.run_main(workdir, str(scaling_dir / 'data'), devices=8,
                        mesh="(('data',4),('model',2))", extra=['--config.sharding_rules=' + rules])
  reference = str(scaling_dir / 'ref8')
  scaling_runs.assert_losses_close(scaling_runs.logged_steps(reference),
                                   scaling_runs.logged_steps(workdir),
                                   range(1, scaling_runs.STEPS_PER_EPOCH + 1), what='4x2 TP')
  diff, path = scaling_runs.max_param_diff(
      scaling_runs.restore_params(reference, scaling_runs.STEPS_PER_EPOCH),
      scaling_runs.restore_params(workdir, scaling_runs.STEPS_PER_EPOCH))
  print(f"largest parameter difference {diff:.2e} ({path})")
  assert diff <= scaling_runs.PARAM_ATOL, (path, diff)


@pytest.mark.slow
@pytest.mark.parametrize('devices', [1, 4])
def test_checkpoint_from_8_devices_resumes_on_fewer(scaling_dir, devices):
  """Saved on 8 devices after step 5; restored into the 1- or 4-device shardings and continued,
  steps 6..10 give the 8-device run's losses."""
  reference = str(scaling_dir / 'ref8')
  workdir = str(scaling_dir / f'resume_on_{devices}')
  scaling_runs.copy_checkpoint(reference, workdir, scaling_runs.STEPS_PER_EPOCH)
  result = scaling_runs.run_main(workdir, str(scaling_dir / 'data'), devices=devices, epochs=2)
  assert f'at step {scaling_runs.STEPS_PER_EPOCH}' in result.stdout
  resumed = scaling_runs.logged_steps(workdir)
  assert min(resumed) == scaling_runs.STEPS_PER_EPOCH + 1
  scaling_runs.assert_losses_close(scaling_runs.logged_steps(reference), resumed,
                                   range(6, 2 * scaling_runs.STEPS_PER_EPOCH + 1),
                                   what=f'resumed on {devices}')
  assert os.path.isfile(os.path.join(workdir, 'eval', 'test.json'))


@pytest.mark.slow
def test_search_over_an_aahr_demo_workdir(scaling_dir):
  """AAHR needs CLIP text features for free-text queries: the demo's seeded CLIP provides them."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  workdir = str(scaling_dir / 'ref8')
  result = subprocess.run([sys.executable, 'main.py', '--workdir', workdir, '--mode', 'search',
                           '--query', 'a red circle left of a blue square', '--top_k', '3'],
                          cwd=scaling_runs.ROOT, env=scaling_runs.env(1), capture_output=True,
                          text=True, timeout=scaling_runs.RUN_TIMEOUT, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  ranked = [line for line in result.stdout.splitlines() if line.strip()[:3] in ('1. ', '2. ', '3. ')]
  assert len(ranked) == 3, result.stdout


# ----------------------------------------------------------------------------------------------
# Memory and precision options (in this process, one device)
# ----------------------------------------------------------------------------------------------

def _tiny_bert():
  from aahr_jax.models import bert as bert_lib  # pylint: disable=import-outside-toplevel
  config = bert_lib.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3,
                               num_attention_heads=2, intermediate_size=32,
                               max_position_embeddings=16)
  ids = np.random.default_rng(0).integers(1, 50, (3, 8)).astype(np.int32)
  ids[1, 5:] = 0
  return bert_lib, config, ids


def test_bert_remat_and_scan_match_the_unrolled_layers():
  bert_lib, config, ids = _tiny_bert()
  mask = (ids != 0).astype(np.int32)
  plain = bert_lib.BertModel(config)
  params = plain.init(jax.random.PRNGKey(0), ids)['params']

  def loss(module, p):
    out = module.apply({'params': p}, ids, attention_mask=mask)
    return (out.last_hidden_state ** 2).sum() + out.pooler_output.sum()

  loss_and_grad = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
  want, want_grad = loss_and_grad(plain, params)
  stacked = bert_lib.stack_layers(params, config.num_hidden_layers)
  scanned_shapes = jax.eval_shape(bert_lib.BertModel(config, scan=True).init,
                                  jax.random.PRNGKey(0), ids)['params']
  assert jax.tree.map(np.shape, scanned_shapes) == jax.tree.map(np.shape, stacked)
  for remat, scan in ((True, False), (False, True), (True, True)):
    module = bert_lib.BertModel(config, remat=remat, scan=scan)
    p = stacked if scan else params
    got, grad = loss_and_grad(module, p)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    expected = bert_lib.stack_layers(want_grad, config.num_hidden_layers) if scan else want_grad
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), grad,
                 expected)
  back = bert_lib.unstack_layers(stacked)
  jax.tree.map(np.testing.assert_array_equal, back, params)


@pytest.mark.parametrize('model_name', ['gpo', 'aahr'])
def test_bfloat16_compute_keeps_float32_params_and_embeddings(model_name):
  from aahr_jax import train  # pylint: disable=import-outside-toplevel
  from aahr_jax.models import aahr  # pylint: disable=import-outside-toplevel
  from configs import demo  # pylint: disable=import-outside-toplevel
  config = demo.get_config(f'model={model_name},region_dim=16,embed_size=32,bert_width=32,'
                           'batch_size=8')
  config.model.clip_dim = 8
  batch = train.sample_batch(config, 8)
  rng = np.random.default_rng(0)
  batch['regions'] = rng.normal(size=batch['regions'].shape).astype(np.float32)
  batch['bert_ids'][:, :6] = rng.integers(1, 100, (8, 6))
  batch['bert_len'][:] = 6
  for name in ('clip_image', 'clip_text'):
    if name in batch:
      batch[name] = rng.normal(size=batch[name].shape).astype(np.float32)
  outputs = {}
  for dtype in ('float32', 'bfloat16'):
    model = aahr.build_model(config.model, dtype)
    variables = jax.jit(lambda b, m=model: m.init({'params': jax.random.PRNGKey(0)}, b,
                                                   train=False))(batch)
    assert {x.dtype for x in jax.tree.leaves(variables)} == {np.dtype(np.float32)}
    out = jax.jit(lambda v, b, m=model: m.apply(v, b, train=False))(variables, batch)
    img, cap = (out['img_emb'], out['cap_emb']) if isinstance(out, dict) else out
    assert img.dtype == cap.dtype == np.float32
    outputs[dtype] = (np.asarray(img), np.asarray(cap))
  for want, got in zip(outputs['float32'], outputs['bfloat16']):
    assert np.all(np.isfinite(got))
    # bf16 keeps 8 significant bits, so one rounding of an entry in [0.5, 1) moves it by up to
    # 2^-9; the unit-norm embeddings (entries below 0.6) come out of the bf16 matmuls (fp32
    # accumulation) within 2^-8 of the fp32 ones: measured 8e-4 (gpo) and 2.4e-3 (aahr).
    np.testing.assert_allclose(got, want, atol=2.0**-8, rtol=0)
