"""Optimizer parity with torch.optim.AdamW param groups, clipping, and late-starting groups."""

import jax
import ml_collections
import numpy as np
import torch

from aahr_jax import optim


def optim_config(**kw):
  c = ml_collections.ConfigDict(dict(lr=1e-2, weight_decay=1e-2, lr_schedules=(2,), decay_rate=0.1,
                                     grad_clip=0.5, lr_mults=(('txt/bert/.*', 0.1),),
                                     frozen=('.*/bns_1/.*',), graph_lr_factor=1.0))
  c.update(kw)
  return c


def test_matches_torch_adamw_groups_with_late_parameters():
  rng = np.random.default_rng(0)
  init = {'img': {'w': rng.normal(size=(3, 2))}, 'txt': {'bert': {'w': rng.normal(size=(4,))}},
          'criterion': {'prototypes': rng.normal(size=(2, 2))},
          'frozen': {'bns_1': {'scale': np.ones(2)}}}
  grads_per_step = [{'img': {'w': rng.normal(size=(3, 2))}, 'txt': {'bert': {'w': rng.normal(size=(4,))}},
                     'criterion': {'prototypes': rng.normal(size=(2, 2))},
                     'frozen': {'bns_1': {'scale': np.zeros(2)}}} for _ in range(7)]
  first_proto_step = 3
  steps_per_epoch = 2

  tx, _ = optim.make_optimizer(optim_config(), init, steps_per_epoch,
                               late_groups=(('criterion/prototypes', first_proto_step),))
  params = jax.tree.map(np.float32, init)
  state = tx.init(params)
  for step, g in enumerate(grads_per_step):
    if step < first_proto_step:  # the gated-off loss gives exactly zero gradient
      g = dict(g, criterion={'prototypes': np.zeros((2, 2))})
    updates, state = tx.update(jax.tree.map(np.float32, g), state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)

  t_img = torch.tensor(init['img']['w'], requires_grad=True)
  t_bert = torch.tensor(init['txt']['bert']['w'], requires_grad=True)
  t_proto = torch.tensor(init['criterion']['prototypes'], requires_grad=True)
  opt = torch.optim.AdamW([{'params': [t_img], 'lr': 1e-2}, {'params': [t_bert], 'lr': 1e-3},
                           {'params': [t_proto], 'lr': 1e-2}], weight_decay=1e-2, eps=1e-8)
  for step, g in enumerate(grads_per_step):
    if step == 4:  # epoch 2 starts (2 steps per epoch): lr x0.1 for every group
      for group in opt.param_groups:
        group['lr'] *= 0.1
    t_img.grad = torch.tensor(g['img']['w'])
    t_bert.grad = torch.tensor(g['txt']['bert']['w'])
    t_proto.grad = torch.tensor(g['criterion']['prototypes']) if step >= first_proto_step else None
    torch.nn.utils.clip_grad_norm_([p for p in (t_img, t_bert, t_proto) if p.grad is not None], 0.5)
    opt.step()
  np.testing.assert_allclose(params['img']['w'], t_img.detach().numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(params['txt']['bert']['w'], t_bert.detach().numpy(), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(params['criterion']['prototypes'], t_proto.detach().numpy(),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(params['frozen']['bns_1']['scale'], np.ones(2))


# --- gradients that are zero in exact arithmetic (optim.shift_invariant_masks) ---

def _recording_optimizer():
  """Applies no update; its state is the last gradient it was given."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  return optax.GradientTransformation(
      lambda params: jax.tree.map(jnp.zeros_like, params),
      lambda updates, state, params=None: (jax.tree.map(jnp.zeros_like, updates), updates))


def test_shift_invariant_masks_pick_exactly_the_cancelled_biases():
  from tests.test_aahr_step import tiny_aahr_config  # pylint: disable=import-outside-toplevel
  from aahr_jax.models import aahr  # pylint: disable=import-outside-toplevel
  from aahr_jax import train  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  config = tiny_aahr_config()
  shapes = jax.eval_shape(lambda: train.create_state_fn(
      aahr.build_model(config.model), optax.identity(), config, 8)(jax.random.PRNGKey(0)).params)
  masks = optim.shift_invariant_masks(shapes)
  assert sorted(masks) == [
      'criterion/relation/gnn/layers_0/self_attn/in_proj/bias',
      'img/aggr/layers_0/self_attn/in_proj/bias',
      'img/fc/mlp/layers_0/bias',  # followed by bns_0; img/fc_clip/mlp/layers_0 has no BN
      'txt/aggr/layers_0/self_attn/in_proj/bias',
      'txt/bert/encoder/layer/0/attention/self/key/bias']
  in_proj = masks['img/aggr/layers_0/self_attn/in_proj/bias']
  d = in_proj.shape[0] // 3
  np.testing.assert_array_equal(in_proj, np.r_[np.ones(d), np.zeros(d), np.ones(d)])
  assert not masks['img/fc/mlp/layers_0/bias'].any()


def test_masked_gradients_are_rounding_noise_in_the_aahr_step():
  """The claim behind the masks, checked on real gradients with every loss term on."""
  from tests.test_aahr_step import random_batch, tiny_aahr_config  # pylint: disable=import-outside-toplevel
  from aahr_jax.models import aahr  # pylint: disable=import-outside-toplevel
  from aahr_jax import sharding, train  # pylint: disable=import-outside-toplevel
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  config = tiny_aahr_config()
  model = aahr.build_model(config.model)
  tx = _recording_optimizer()
  state, _ = train.create_state(model, tx, config, sharding.create_mesh(config.mesh), 8)
  step = jax.jit(train.make_train_step(model, tx, config, 10, lambda s: 1e-3))
  for i in range(4):  # the graph terms are on from it = 3
    state, metrics = step(state, random_batch(config, i))
  assert float(metrics['weight_graph']) == 1.0
  grads = traverse_util.flatten_dict(jax.device_get(state.opt_state), sep='/')
  masks = optim.shift_invariant_masks(grads)
  largest = max(float(np.abs(g).max()) for g in grads.values())
  for path, keep in masks.items():
    dead = np.abs(grads[path]) * (1.0 - keep)
    assert dead.max() < 1e-5 * largest, (path, dead.max(), largest)
    if keep.any():  # the query and value thirds of in_proj have real gradients
      assert (np.abs(grads[path]) * keep).max() > 1e3 * dead.max(), path


def test_masked_parameters_only_decay():
  c = optim_config(zero_shift_invariant_grads=True, grad_clip=1e9)
  params = {'img': {'mlp': {'layers_0': {'bias': np.ones(3, np.float32)},
                            'bns_0': {'scale': np.ones(3, np.float32)}}},
            'txt': {'aggr': {'self_attn': {'in_proj': {'bias': np.ones(6, np.float32)}}}}}
  tx, _ = optim.make_optimizer(c, params, 10)
  noise = jax.tree.map(lambda p: np.full_like(p, 1e-9), params)
  updates, _ = tx.update(noise, tx.init(params), params)
  decay = -1e-2 * 1e-2  # -lr * weight_decay * p
  np.testing.assert_allclose(updates['img']['mlp']['layers_0']['bias'], decay, rtol=1e-6)
  in_proj = np.asarray(updates['txt']['aggr']['self_attn']['in_proj']['bias'])
  np.testing.assert_allclose(in_proj[2:4], decay, rtol=1e-6)  # key third: decay only
  assert np.all(np.abs(in_proj[[0, 1, 4, 5]]) > 1e-3)  # Adam's lr-sized step elsewhere
