"""The AAHR training step: every loss term, its gates, momentum encoders, queues, NaN guard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aahr_jax import aahr_step
from aahr_jax import optim
from aahr_jax import train
from aahr_jax.models import aahr
from configs import aahr_common
from configs import common

B = 8


def tiny_aahr_config():
  c = aahr_common.aahr_config('f30k', batch_size=B, nmb_prototypes=6, mask_weight=1.0)
  c.data.region_dim = 12
  c.data.max_len = 10
  c.model.embed_size = 16
  c.model.region_hidden = 8
  c.model.num_heads = 2
  c.model.gglp_heads = 2
  c.model.clip_dim = 6
  c.model.bert = dict(common.BERT_BASE, vocab_size=50, hidden_size=8, num_hidden_layers=1,
                      num_attention_heads=2, intermediate_size=16, max_position_embeddings=16)
  c.relation.num_heads = 2
  c.relation.topk = 3
  c.moco.queue_length = 2 * B
  c.loss.freeze_prototypes_niters = 1  # SwAV from it = 2
  c.relation.warmup = 3                # graph from it = 3
  c.batch_size = B
  return c


def random_batch(config, seed):
  rng = np.random.default_rng(seed)
  batch = train.sample_batch(config, B)
  batch['region_len'] = rng.integers(3, 37, B).astype(np.int32)
  batch['regions'] = (rng.random(batch['regions'].shape) *
                      (np.arange(36)[None, :, None] < batch['region_len'][:, None, None]))
  batch['regions'] = batch['regions'].astype(np.float32)
  lengths = rng.integers(4, 11, B)
  for i, n in enumerate(lengths):
    batch['bert_ids'][i, :n] = rng.integers(1, 50, n)
  batch['bert_len'] = lengths.astype(np.int32)
  batch['image_index'] = np.array([0, 1, 1, 2, 3, 4, 5, 5], np.int32)
  batch['clip_image'] = rng.normal(size=(B, 6)).astype(np.float32)
  batch['clip_text'] = rng.normal(size=(B, 6)).astype(np.float32)
  return batch


@pytest.fixture(scope='module')
def setup():
  config = tiny_aahr_config()
  model = aahr.build_model(config.model)
  from aahr_jax import aahr_step, sharding  # pylint: disable=import-outside-toplevel
  shapes = jax.eval_shape(lambda: train.create_state_fn(
      model, __import__('optax').identity(), config, B)(jax.random.PRNGKey(0)).params)
  tx, schedule = optim.make_optimizer(config.optim, shapes, 10,
                                      late_groups=aahr_step.late_groups(config))
  mesh = sharding.create_mesh(config.mesh)
  state, _ = train.create_state(model, tx, config, mesh, B)
  step = jax.jit(train.make_train_step(model, tx, config, 10, schedule))
  return config, state, step


def assert_momentum_is_the_ema(config, before, after):
  """The key encoders after a step are m * keys + (1 - m) * the query encoders before its
  update, to float32 round-off: the EMA is recomputed here in float64 from the float32 inputs,
  and a float32 result may differ from it by its own rounding plus that of the two products
  (3 ulp; 0.9995 for 0.999 moves an element by 5e-4 |key - query|, >= 1e-4 after displacing)."""
  m = config.moco.momentum
  for name in aahr_step.ENCODERS:
    keys = jax.tree.leaves(jax.device_get(before.extra['momentum'][name]))
    queries = jax.tree.leaves(jax.device_get(before.params[name]))
    got = jax.tree.leaves(jax.device_get(after.extra['momentum'][name]))
    assert len(keys) == len(queries) == len(got)
    for k, q, g in zip(keys, queries, got):
      want = m * np.asarray(k, np.float64) + (1 - m) * np.asarray(q, np.float64)
      scale = np.max([np.abs(want), np.abs(np.asarray(k)), np.abs(np.asarray(q))], axis=0)
      ulp = np.spacing(scale.astype(np.float32))
      assert np.all(np.abs(np.asarray(g, np.float64) - want) <= 3 * ulp), name


def test_gates_terms_queues_and_momentum(setup):
  config, state, step = setup
  first_params = jax.device_get(state.params)
  history, states = [], [jax.device_get(state)]
  for i in range(5):
    previous = state
    state, metrics = step(state, random_batch(config, i))
    states.append(jax.device_get(state))
    metrics = jax.device_get(metrics)
    history.append(metrics)
    assert int(state.extra['queue_ptr']) == ((i + 1) * B) % config.moco.queue_length
    # The keys just enqueued are the momentum encoders' fused embeddings: unit-bounded columns.
    start = (i * B) % config.moco.queue_length
    assert not np.allclose(np.asarray(state.extra['queue_img'][:, start:start + B]),
                           np.asarray(previous.extra['queue_img'][:, start:start + B]))
  weights = [(m['weight_swav'], m['weight_graph'], m['weight_moco']) for m in history]
  # SwAV after it > 1, graph from it >= 3, MoCo once (it + 1) > M / B = 2 (the queue is full).
  assert weights == [(0, 0, 0), (0, 0, 0), (0.2, 0, 1), (0.2, 1, 1), (0.2, 1, 1)]
  for m in history:
    assert np.isfinite(m['loss']) and m['skipped'] == 0
    assert m['loss_swav'] > 0 and m['loss_moco'] > 0
    expected = (m['loss_base'] + m['weight_swav'] * m['loss_swav'] +
                m['weight_graph'] * m['loss_graph'] + m['weight_reg'] * m['loss_reg'] +
                m['weight_moco'] * m['loss_moco'])
    assert m['loss'] == pytest.approx(expected, rel=1e-5)
  assert history[3]['loss_graph'] > 0 and history[2]['loss_graph'] == 0
  # Prototypes are unit rows after every step's renormalisation (+ at most one update).
  assert np.allclose(np.linalg.norm(np.asarray(state.params['criterion']['prototypes']), axis=1),
                     1.0, atol=0.05)
  # The relation module's parameters only move once the graph losses are on (it >= 3).
  rel_before = jax.tree.leaves(first_params['criterion']['relation'])
  rel_after = jax.tree.leaves(jax.device_get(state.params['criterion']['relation']))
  assert any(not np.allclose(a, b) for a, b in zip(rel_before, rel_after))
  assert config.moco.momentum == 0.999
  for before, after in zip(states, states[1:]):
    assert_momentum_is_the_ema(config, before, after)
  # From key encoders far from the query encoders (a factor off by 5e-4 moves them ~1e-4).
  displaced = state.replace(extra=dict(state.extra, momentum=jax.tree.map(
      lambda k: k + 0.5, state.extra['momentum'])))
  assert_momentum_is_the_ema(config, displaced, step(displaced, random_batch(config, 5))[0])


def test_relation_parameters_frozen_before_warmup(setup):
  config, state, step = setup
  before = jax.device_get(state.params['criterion'])
  state, _ = step(state, random_batch(config, 11))
  after = jax.device_get(state.params['criterion'])
  for a, b in zip(jax.tree.leaves(before['relation']), jax.tree.leaves(after['relation'])):
    np.testing.assert_array_equal(a, b)  # no gradient yet: no Adam update, no weight decay


def test_non_finite_batch_skips_the_update(setup):
  config, state, step = setup
  batch = random_batch(config, 20)
  batch['clip_text'][0, 0] = np.nan
  new_state, metrics = step(state, batch)
  assert int(metrics['skipped']) == 1
  # The whole train state is as it was (parameters, the optimizer's moments and counts,
  # BatchNorm statistics, rng, queues and their pointer) but the step counter and the momentum
  # encoders, which move on as in the original (quirk Q25).
  before, after = jax.device_get(state), jax.device_get(new_state)
  kept = lambda s: (s.params, s.opt_state, s.batch_stats, s.rng,
                    {k: v for k, v in s.extra.items() if k != 'momentum'})
  assert jax.tree.structure(kept(before)) == jax.tree.structure(kept(after))
  for a, b in zip(jax.tree.leaves(kept(before)), jax.tree.leaves(kept(after))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(after.step) == int(before.step) + 1
  assert_momentum_is_the_ema(config, before, after)
  # The NaN reaches the momentum keys too: they must not enter the queues (else every later
  # InfoNCE term is NaN until the ring buffer comes round); the EMA still moves (Q25).
  assert int(new_state.extra['queue_ptr']) == int(state.extra['queue_ptr'])
  np.testing.assert_array_equal(np.asarray(new_state.extra['queue_cap']),
                                np.asarray(state.extra['queue_cap']))
  later, metrics = step(new_state, random_batch(config, 21))
  assert int(metrics['skipped']) == 0 and np.isfinite(float(metrics['loss_moco']))
  assert int(later.extra['queue_ptr']) != int(new_state.extra['queue_ptr'])
  # A finite step moves every part the skipped one kept (so the checks above can fail).
  moved = jax.device_get(later)
  for part in ('opt_state', 'batch_stats'):
    assert any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(getattr(after, part)), jax.tree.leaves(getattr(moved, part)))), part


def test_caption_chunks_give_the_same_step(setup):
  """The fine-grained relevance in caption chunks (the CPU default, here 3 captions with a
  remainder of 2) gives the same steps: its values are bit-identical (test_aahr_losses), and
  what consumes them may only be fused differently (loss_reg moved by 1 float32 ulp here)."""
  from aahr_jax import aahr_step  # pylint: disable=import-outside-toplevel
  config, state, step = setup
  chunked_config = tiny_aahr_config()
  chunked_config.relation.caption_chunk = 3
  assert aahr_step.caption_chunk(config) is None  # auto: 8 captions fit one cache-sized pass
  assert aahr_step.caption_chunk(chunked_config) == 3
  model = aahr.build_model(chunked_config.model)
  shapes = jax.eval_shape(lambda: state.params)
  tx, schedule = optim.make_optimizer(chunked_config.optim, shapes, 10,
                                      late_groups=aahr_step.late_groups(chunked_config))
  chunked_step = jax.jit(train.make_train_step(model, tx, chunked_config, 10, schedule))
  whole, chunked = state, state
  for i in range(4):  # the graph losses start at it = 3
    batch = random_batch(config, 30 + i)
    whole, whole_metrics = step(whole, batch)
    chunked, chunked_metrics = chunked_step(chunked, batch)
    want = {k: float(v) for k, v in jax.device_get(whole_metrics).items()}
    got = {k: float(v) for k, v in jax.device_get(chunked_metrics).items()}
    assert got == pytest.approx(want, rel=1e-6, abs=1e-9), i
  assert want['loss_graph'] > 0
  for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(chunked.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def test_auto_caption_chunk_is_cache_sized_on_the_cpu():
  from aahr_jax import aahr_step  # pylint: disable=import-outside-toplevel
  from aahr_jax import config_checks  # pylint: disable=import-outside-toplevel
  config = aahr_common.aahr_config('f30k', batch_size=64, nmb_prototypes=6, mask_weight=1.0)
  config.data.max_len, config.data.num_regions = 32, 36
  assert config.relation.caption_chunk == -1
  assert aahr_step.caption_chunk(config) == 16  # 2^20 / (64 x 32 x 36) = 14.2 -> 16
  config.batch_size = 256
  assert aahr_step.caption_chunk(config) == 4   # 3.6 -> 4
  config.relation.caption_chunk = 0
  assert aahr_step.caption_chunk(config) is None
  config.relation.caption_chunk = -2
  assert any('config.relation.caption_chunk = -2' in p for p in config_checks.problems_of(config))
