"""The train state and its initialisation, apart from the trainer so that code without the data
pipeline (benchmarks on machines without tfds / grain) builds exactly the state training uses."""

from typing import Any

import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from aahr_jax import aahr_step
from aahr_jax.models import bert as bert_lib

# Fields of a host batch that go to the device for a training step.
TRAIN_FIELDS = ('regions', 'region_len', 'bert_ids', 'bert_len', 'caption_index',
                'image_index', 'valid')
CLIP_FIELDS = ('clip_image', 'clip_text')


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # AAHR: {'img', 'txt', 'criterion': {'prototypes', 'relation'}}
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  extra: Any  # AAHR: momentum encoders and MoCo queues; {} for VSE-infinity


def uses_clip(config) -> bool:
  return config.model.name == 'aahr'


def device_fields(config) -> tuple[str, ...]:
  return TRAIN_FIELDS + (CLIP_FIELDS if uses_clip(config) else ())


def sample_batch(config, batch_size: int) -> dict:
  """A zero batch with the training shapes (for initialisation and shape inference)."""
  n, f, length = config.data.num_regions, config.data.region_dim, config.data.max_len
  batch = {'regions': np.zeros((batch_size, n, f), np.float32),
           'region_len': np.full((batch_size,), n, np.int32),
           'bert_ids': np.zeros((batch_size, length), np.int32),
           'bert_len': np.full((batch_size,), 2, np.int32),
           'caption_index': np.zeros((batch_size,), np.int32),
           'image_index': np.zeros((batch_size,), np.int32),
           'valid': np.ones((batch_size,), bool)}
  if uses_clip(config):
    for name in CLIP_FIELDS:
      batch[name] = np.zeros((batch_size, config.model.clip_dim), np.float32)
  return batch


def create_state_fn(model, tx, config, batch_size: int):
  """rng -> a fresh TrainState (model, criterion and momentum parameters, optimizer state)."""
  spec = sample_batch(config, batch_size)

  def init(rng):
    init_rng, state_rng, criterion_rng, extra_rng = jax.random.split(rng, 4)
    # The batch is made inside the trace (every field is one repeated value), so no host array
    # becomes a constant of the compiled init.
    batch = {k: jnp.full(v.shape, v.flat[0], v.dtype) for k, v in spec.items()}
    variables = model.init({'params': init_rng, 'dropout': init_rng}, batch, train=False)
    params = dict(variables['params'])
    extra = {}
    if config.model.name == 'aahr':
      out = jax.eval_shape(lambda: model.apply(variables, batch, train=False))
      params['criterion'] = aahr_step.init_criterion(config, out, criterion_rng)
      extra = aahr_step.init_extra(config, params, extra_rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
                      rng=state_rng, extra=extra)

  return init


def pretrained_bert(config, current: dict) -> dict | None:
  """The converted BERT named by config.model.bert_init as host arrays shaped like `current`
  (the random-init `txt/bert` parameters), or None for a random init."""
  path = config.model.bert_init
  if not path:
    return None
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'config.model.bert_init = {path}: file not found. Convert a BERT checkpoint with '
        f'`python -m conversion bert --src bert-base-uncased/ --out {path}`, or set '
        '--config.model.bert_init= for a random init')
  _, loaded = bert_lib.load(path)
  if config.model.get('bert_scan', False):
    loaded = bert_lib.stack_layers(loaded, config.model.bert['num_hidden_layers'])
  current = traverse_util.flatten_dict(current, sep='/')
  new = traverse_util.flatten_dict(loaded, sep='/')
  missing = sorted(set(current) - set(new))
  bad = [k for k in current if k in new and current[k].shape != new[k].shape]
  if missing or bad:
    raise ValueError(f'{path} does not fit config.model.bert: missing {missing[:5]}, '
                     f'shape mismatches {bad[:5]}')
  # Host arrays: the caller places them with the state's shardings (one copy per process).
  return traverse_util.unflatten_dict(
      {k: np.asarray(new[k], current[k].dtype) for k in current}, sep='/')


def start_from_pretrained(config, state: TrainState, shardings: TrainState | None = None
                          ) -> TrainState:
  """The run's starting weights: pretrained weights named by the config go into the query
  encoders and, for AAHR, into the momentum (key) encoders too, which the original deep-copies
  from the query encoders after loading them. Used for a fresh start only: a resumed state
  already holds its weights. `shardings`: the state's (None: default placement)."""
  bert = pretrained_bert(config, state.params['txt']['bert'])
  if bert is None:
    return state

  def with_bert(tree: dict, target_shardings) -> dict:
    txt = dict(tree['txt'])
    txt['bert'] = jax.device_put(bert, target_shardings['txt']['bert']
                                 if target_shardings is not None else None)
    return dict(tree, txt=txt)

  params = with_bert(state.params, None if shardings is None else shardings.params)
  extra = state.extra
  if 'momentum' in extra:
    extra = dict(extra, momentum=with_bert(
        extra['momentum'], None if shardings is None else shardings.extra['momentum']))
  return state.replace(params=params, extra=extra)
