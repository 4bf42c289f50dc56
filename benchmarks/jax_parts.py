"""Per-part timing of the JAX AAHR step: each part jitted alone on the step's real inputs.

Parts (together they are the step; their sum minus the step's time is what fusion across
parts and overlap save, or what dispatch adds):
  query_encoders   forward + backward of both query towers (BERT, region MLP, Transformers,
                   GGLP, gates) w.r.t. their parameters
  key_encoders     momentum EMA + forward of both towers without gradient
  relation         instance relation module (fine-grained relevance, GCNs, GNN Transformer)
                   and its three triplet terms, forward + backward
  losses           base triplet, SwAV (Sinkhorn) and InfoNCE, forward + backward
  optimizer        clipping + AdamW groups over every parameter
"""

import time

import jax
import jax.numpy as jnp

from aahr_jax import aahr_step
from aahr_jax import losses
from aahr_jax.models import relations
from benchmarks import jax_step


def _timed(fn, args, steps: int) -> float:
  out = fn(*args)
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(steps):
    out = fn(*args)
  jax.block_until_ready(out)
  return 1e3 * (time.perf_counter() - start) / steps


def time_parts(config, model, tx, state, batch: dict, steps: int) -> dict:
  """{part: ms} for the parts above (state is not modified)."""
  inputs = {k: batch[k] for k in jax_step.model_fields(batch)}
  ids = inputs['image_index']
  rng = jax.random.PRNGKey(0)
  encoders = {k: state.params[k] for k in aahr_step.ENCODERS}
  variables = lambda p: {'params': p, 'batch_stats': state.batch_stats}
  flags = dict(cutoff=config.loss.triplet_cutoff, max_over=config.loss.triplet_max_over,
               on_empty_row=config.loss.triplet_on_empty_row)
  relation = aahr_step.relation_module(config)

  def forward(p):
    out, _ = model.apply(variables(p), inputs, train=True, rngs={'dropout': rng},
                         mutable=['batch_stats'])
    return out

  def query(p):
    loss = lambda q: sum(jnp.sum(forward(q)[k].astype(jnp.float32)) for k in
                         ('img_emb', 'cap_emb', 'img_prefusion', 'cap_prefusion'))
    return jax.grad(loss)(p)

  def key(momentum, p):
    m = config.moco.momentum
    ema = jax.tree.map(lambda a, b: m * a + (1 - m) * b, momentum, p)
    out, _ = model.apply(variables(ema), inputs, train=True, bert_train=False,
                         rngs={'dropout': rng}, mutable=['batch_stats'])
    return out['img_emb'], out['cap_emb']

  out = jax.jit(forward)(encoders)
  f32 = lambda x: x.astype(jnp.float32)

  def relation_terms(params, img1, cap1):
    rel = relation.apply({'params': params}, img1, cap1, out['regions'], out['words'],
                         out['bert_len'], out['batch_max_regions'], out['batch_max_len'],
                         out['region_len'], deterministic=False, rngs={'dropout': rng})
    return relations.relation_triplet_losses(rel, ids, key=rng, **flags)['gnn']

  def loss_terms(img, cap, img1, cap1, prototypes):
    return (losses.dws_triplet_loss(img, cap, ids, key=rng, **flags)
            + losses.swav_loss(img, cap, prototypes)
            + losses.info_nce_loss(img1, cap1, img, cap, state.extra['queue_img'],
                                   state.extra['queue_cap']))

  grads = jax.tree.map(jnp.ones_like, state.params)
  criterion = state.params['criterion']
  embeddings = tuple(f32(out[k]) for k in ('img_emb', 'cap_emb', 'img_prefusion',
                                           'cap_prefusion'))
  return {
      'query_encoders': _timed(jax.jit(query), (encoders,), steps),
      'key_encoders': _timed(jax.jit(key), (state.extra['momentum'], encoders), steps),
      'relation': _timed(jax.jit(jax.grad(relation_terms, argnums=(0, 1, 2))),
                         (criterion['relation'],) + embeddings[2:], steps),
      'losses': _timed(jax.jit(jax.grad(loss_terms, argnums=(0, 1, 2, 3, 4))),
                       embeddings + (criterion['prototypes'],), steps),
      'optimizer': _timed(jax.jit(lambda g, o, p: tx.update(g, o, p)),
                          (grads, state.opt_state, state.params), steps),
  }
