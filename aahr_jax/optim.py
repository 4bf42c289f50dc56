"""AdamW parameter groups, step-decay schedule and PyTorch-style global-norm clipping."""

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
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
    norm = optax.tree.norm(updates)
    scale = jnp.where(norm > max_norm, max_norm / (norm + 1e-6), 1.0)
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# Parameters (or parts of one) whose gradient is zero in exact arithmetic, because the next
# operation removes any constant shift they add:
#   <P>/layers_0/bias next to <P>/bns_0: a Linear followed by training-mode BatchNorm, which
#     subtracts each feature's batch mean;
#   .../attention/self/key/bias (BERT) and the key third of .../self_attn/in_proj/bias
#     (torch MultiheadAttention's [q; k; v]): q . (k_j + b) shifts a query's logits over all keys
#     by the same amount, and the softmax over keys ignores it.
# Their computed gradient is rounding noise (~1e-9) whose sign depends on the summation order;
# Adam divides it by its own running RMS and turns it into learning-rate-sized random steps that
# differ between any two device layouts (and between PyTorch and XLA). Zeroing it keeps the
# trained function identical in exact arithmetic and makes runs agree across meshes.
KEY_BIAS = re.compile(r'(.*/)?attention/self/key/bias')
IN_PROJ_BIAS = re.compile(r'(.*/)?self_attn/in_proj/bias')
LINEAR_BIAS = re.compile(r'(?P<parent>(.*/)?)layers_0/bias')


def shift_invariant_masks(params) -> dict[str, np.ndarray]:
  """{'/'-joined path: float32 mask (0 where the gradient is identically zero)} for the
  parameters described above; `params` may hold arrays or shape structs."""
  flat = traverse_util.flatten_dict(params, sep='/')
  masks = {}
  for path, leaf in flat.items():
    shape = tuple(leaf.shape)
    if KEY_BIAS.fullmatch(path):
      masks[path] = np.zeros(shape, np.float32)
    elif IN_PROJ_BIAS.fullmatch(path):
      third = shape[-1] // 3
      keep = np.ones(shape, np.float32)
      keep[..., third:2 * third] = 0.0
      masks[path] = keep
    else:
      match = LINEAR_BIAS.fullmatch(path)
      if match and any(p.startswith(match['parent'] + 'bns_0/') for p in flat):
        masks[path] = np.zeros(shape, np.float32)
  return masks


def zero_shift_invariant_gradients(params) -> optax.GradientTransformation:
  """Multiplies the gradients of `shift_invariant_masks(params)` by their masks (before
  clipping, so the global norm ignores the noise too). Weight decay still applies to them."""
  masks = shift_invariant_masks(params)

  def update(updates, state, params=None):
    del params
    flat = traverse_util.flatten_dict(updates, sep='/')
    for path, keep in masks.items():
      flat[path] = flat[path] * jnp.asarray(keep, flat[path].dtype)
    return traverse_util.unflatten_dict(flat, sep='/'), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class DelayedState(NamedTuple):
  count: jax.Array  # calls so far (= global step)
  inner: Any


def start_at(inner: optax.GradientTransformation, first_step: int) -> optax.GradientTransformation:
  """`inner` takes effect from global step `first_step` on; before that: no update, no state change.

  PyTorch's AdamW skips a parameter whose gradient is None: no moment update, no weight decay,
  and its bias-correction step count starts at its first real gradient (docs/method.md 3.1). The
  prototypes and the relation module only get gradients once their loss is switched on.
  """

  def init(params):
    return DelayedState(jnp.zeros((), jnp.int32), inner.init(params))

  def update(updates, state, params=None):
    active = state.count >= first_step
    new_updates, new_inner = inner.update(updates, state.inner, params)
    updates = jax.tree.map(lambda u: jnp.where(active, u, jnp.zeros_like(u)), new_updates)
    kept = jax.tree.map(lambda n, o: jnp.where(active, n, o), new_inner, state.inner)
    return updates, DelayedState(state.count + 1, kept)

  return optax.GradientTransformation(init, update)


def torch_adamw(schedule, mult: float, weight_decay: float, step_offset: int = 0):
  """torch.optim.AdamW: p <- p - lr * (m_hat / (sqrt(v_hat) + eps) + wd * p).

  The learning rate follows the global step: a group that starts late (step_offset) has its own
  Adam count but reads the schedule at count + step_offset.
  """
  return optax.chain(
      optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_schedule(lambda count: -mult * schedule(count + step_offset)))


def make_optimizer(optim_config, params, steps_per_epoch: int,
                   late_groups: tuple[tuple[str, int], ...] = ()):
  """AdamW with per-group learning-rate multipliers; frozen groups never change; gradients that
  are zero in exact arithmetic are zeroed (`zero_shift_invariant_grads`, default on).

  `late_groups`: (regex, first_step) pairs of parameters whose loss starts late; each gets its own
  Adam state that starts at first_step (see `start_at`). Returns (optimizer, schedule) where
  schedule(step) is the base learning rate.
  """
  schedule = step_decay_schedule(optim_config.lr, steps_per_epoch, optim_config.lr_schedules,
                                 optim_config.decay_rate)
  rules = [(pattern, 'frozen') for pattern in optim_config.frozen]
  rules += [(pattern, f'late_{first}') for pattern, first in late_groups]
  rules += [(pattern, f'mult_{mult}') for pattern, mult in optim_config.lr_mults]
  rules.append(('.*', 'mult_1.0'))
  labels = path_labels(params, rules)
  transforms = {'frozen': optax.set_to_zero()}
  late_mult = optim_config.get('graph_lr_factor', 1.0)
  for _, label in rules:
    if label in transforms:
      continue
    if label.startswith('mult_'):
      transforms[label] = torch_adamw(schedule, float(label[len('mult_'):]),
                                      optim_config.weight_decay)
    elif label.startswith('late_'):
      first = int(label[len('late_'):])
      transforms[label] = start_at(
          torch_adamw(schedule, late_mult, optim_config.weight_decay, step_offset=first), first)
  used = set(jax.tree.leaves(labels))
  transforms = {k: v for k, v in transforms.items() if k in used}
  tx = optax.chain(clip_by_global_norm_torch(optim_config.grad_clip),
                   optax.multi_transform(transforms, labels))
  if optim_config.get('zero_shift_invariant_grads', True):
    tx = optax.chain(zero_shift_invariant_gradients(params), tx)
  return tx, schedule
