"""AdamW parameter groups, step-decay schedule and PyTorch-style global-norm clipping."""

import re

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util


def path_labels(params, rules: list[tuple[str, str]]) -> dict:
  """Labels each leaf by the first regex (over its '/'-joined path) that fully matches it."""
  flat = traverse_util.flatten_dict(params, sep='/')
  labels = {}
  for path in flat:
    for pattern, label in rules:
      if re.fullmatch(pattern, path):
        labels[path] = label
        break
    else:
      raise ValueError(f'parameter {path} matches no optimizer rule; add a catch-all ".*" rule')
  return traverse_util.unflatten_dict(labels, sep='/')


def step_decay_schedule(lr: float, steps_per_epoch: int, decay_epochs, decay_rate: float):
  """lr * decay_rate ** (number of decay epochs reached): the originals' epoch step decay."""
  boundaries = {int(e) * steps_per_epoch: decay_rate for e in decay_epochs}
  return optax.piecewise_constant_schedule(lr, boundaries)


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
  """torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when norm > max_norm."""

  def update(updates, state, params=None):
    del params
    norm = optax.global_norm(updates)
    scale = jnp.where(norm > max_norm, max_norm / (norm + 1e-6), 1.0)
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(optim_config, params, steps_per_epoch: int):
  """AdamW with per-group learning-rate multipliers; frozen groups never change.

  Returns (optimizer, schedule) where schedule(step) is the base learning rate.
  """
  schedule = step_decay_schedule(optim_config.lr, steps_per_epoch, optim_config.lr_schedules,
                                 optim_config.decay_rate)
  rules = [(pattern, 'frozen') for pattern in optim_config.frozen]
  rules += [(pattern, f'mult_{mult}') for pattern, mult in optim_config.lr_mults]
  rules.append(('.*', 'mult_1.0'))
  labels = path_labels(params, rules)
  transforms = {'frozen': optax.set_to_zero()}
  for _, label in rules:
    if label.startswith('mult_') and label not in transforms:
      mult = float(label[len('mult_'):])
      transforms[label] = optax.adamw(
          lambda step, mult=mult: schedule(step) * mult, b1=0.9, b2=0.999, eps=1e-8,
          weight_decay=optim_config.weight_decay)
  used = set(jax.tree.leaves(labels))
  transforms = {k: v for k, v in transforms.items() if k in used}
  tx = optax.chain(clip_by_global_norm_torch(optim_config.grad_clip),
                   optax.multi_transform(transforms, labels))
  return tx, schedule
