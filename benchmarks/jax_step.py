"""The JAX AAHR step for benchmarking: state, the cached-CLIP step and the online-CLIP step.

The state is the trainer's (aahr_jax/train_state.py), built without importing aahr_jax.train,
whose data pipeline needs tfds/grain (absent on the GPU machines).
Each step is compiled ahead of time (`jit(...).lower(...).compile()`) with the state donated:
the executable cannot recompile, the compiler's memory and FLOP analyses come for free, and
`check_same_avals` proves the next call would hit jax.jit's cache too.
"""


import jax
import jax.numpy as jnp
import optax

from aahr_jax import aahr_step
from aahr_jax import optim
from aahr_jax import train_state
from aahr_jax.models import aahr
from aahr_jax.models import clip as clip_lib


def create_state(config, batch: dict):
  """(model, tx, schedule, state) with every loss term on from step 0 (config gates set)."""
  model = aahr.build_model(config.model, config.dtype)
  init = lambda tx: train_state.create_state_fn(model, tx, config, batch['regions'].shape[0])
  rng = jax.random.PRNGKey(config.seed)
  param_shapes = jax.eval_shape(lambda: init(optax.identity())(rng).params)
  tx, schedule = optim.make_optimizer(config.optim, param_shapes, 1000,
                                      late_groups=aahr_step.late_groups(config))
  state = train_state.start_from_pretrained(config, jax.jit(init(tx))(rng))
  return model, tx, schedule, state


def model_fields(batch: dict) -> tuple[str, ...]:
  return tuple(k for k in ('regions', 'region_len', 'bert_ids', 'bert_len', 'image_index',
                           'valid', 'clip_image', 'clip_text') if k in batch)


def clip_module(arch: dict, dtype) -> clip_lib.CLIP:
  """The Flax OpenCLIP with the benchmark's CLIP description (same as the torch reference)."""
  return clip_lib.CLIP(clip_lib.CLIPConfig(
      embed_dim=arch['embed_dim'],
      vision=clip_lib.VisionConfig(
          image_size=(arch['image_size'],) * 2, patch_size=(arch['patch_size'],) * 2,
          width=arch['vision_width'], layers=arch['vision_layers'], heads=arch['vision_heads'],
          mlp_width=4 * arch['vision_width']),
      text=clip_lib.TextConfig(
          context_length=arch['context_length'], vocab_size=arch['vocab_size'],
          width=arch['text_width'], heads=arch['text_heads'], layers=arch['text_layers'],
          mlp_width=4 * arch['text_width']),
      act='gelu'), dtype=dtype)


def cached_step(model, tx, config, schedule):
  """(state, batch) -> (state, metrics): the trainer's step, CLIP features from the cache."""
  step = aahr_step.make_train_step(model, tx, config, schedule)
  return lambda state, batch: step(state, {k: batch[k] for k in model_fields(batch)})


def online_step(model, tx, config, schedule, clip: clip_lib.CLIP):
  """(state, clip_params, batch) -> (state, metrics): the frozen Flax CLIP runs inside the
  step on raw images and CLIP tokens (once per step: the towers are frozen and deterministic,
  so the key encoders reuse the query side's features)."""
  step = aahr_step.make_train_step(model, tx, config, schedule)

  def run(state, clip_params, batch):
    image_features, text_features = clip.apply({'params': clip_params}, batch['images'],
                                               batch['clip_tokens'])
    inputs = {k: batch[k] for k in model_fields(batch) if not k.startswith('clip_')}
    inputs['clip_image'] = jax.lax.stop_gradient(image_features).astype(jnp.float32)
    inputs['clip_text'] = jax.lax.stop_gradient(text_features).astype(jnp.float32)
    return step(state, inputs)

  return run


def compile_step(fn, *args):
  """AOT-compiles fn(*args) with the first argument (the state) donated."""
  return jax.jit(fn, donate_argnums=(0,)).lower(*args).compile()


def check_same_avals(before, after) -> None:
  """The step's output state must have the input's structure, shapes and dtypes; otherwise the
  trainer's jax.jit would recompile on the next step."""
  spec = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
  if jax.tree.structure(before) != jax.tree.structure(after) or spec(before) != spec(after):
    raise AssertionError('the step changes the state signature: it would recompile')


def memory_bytes(compiled) -> int | None:
  """Peak device memory of one call from XLA's buffer assignment (arguments + outputs +
  temporaries - donated aliases); None where the backend does not report it."""
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    return None


def xla_flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost['flops'])
  except Exception:  # pylint: disable=broad-except
    return None
