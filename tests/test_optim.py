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
    updates, state = tx.update(g, state, params)
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
