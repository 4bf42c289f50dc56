"""AAHR's training step: query encoders, criterion and momentum contrast in one jitted function.

Order and gates follow the released code (docs/method.md 1.2 and 2.19), with `it` = the global
step before this update:
  1. query encoders forward (train mode);
  2. criterion: DWS triplet on the fused embeddings; SwAV with the prototypes renormalised in
     place (every step); the instance relation module and its three triplet terms when
     it >= relation.warmup (skipped with `lax.cond` before, so it costs nothing);
  3. momentum encoders: EMA of the query parameters *before* this update, key forward without
     gradient, InfoNCE against the queues (once they have been filled), enqueue the keys;
  4. a non-finite loss or gradient skips the update (counters, EMA and enqueue have happened,
     quirk Q25); otherwise clip + AdamW (prototypes and relation module with their own Adam
     states that start with their losses, docs/method.md 3.1).
Everything random comes from the state's key folded with the step, one stream per use.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from aahr_jax import losses
from aahr_jax.models import relations

ENCODERS = ('img', 'txt')  # parameter groups that have momentum copies


def relation_module(config) -> relations.InstanceRelationModule:
  r = config.relation
  return relations.InstanceRelationModule(
      num_heads=r.num_heads, num_layers=r.num_layers, dropout_rate=r.dropout,
      gcn_dropout_rate=r.gcn_dropout, threshold=r.threshold, topk=r.topk,
      mask_weight=r.mask_weight, sigma=r.sigma, kl_temperature=r.kl_temperature,
      fine_grained_mask_padding=r.fine_grained_mask_padding,
      caption_chunk=caption_chunk(config),
      # Mixed precision: the word-region scores from bf16 operands (fp32 accumulation).
      relevance_matmul_dtype=jnp.bfloat16 if config.dtype == 'bfloat16' else None)


def caption_chunk(config) -> int | None:
  """Captions per pass of the fine-grained relevance (None: all at once).

  config.relation.caption_chunk -1 (auto): cache-sized chunks on the CPU (16 captions at the
  demo's 64 x 32 x 36), which took a quarter of the all-at-once time there (`python -m
  benchmarks.selection_ops`); all at once elsewhere (the GPU step was measured that way). The
  values do not depend on the chunking.
  """
  chunk = config.relation.caption_chunk
  if chunk > 0:
    return chunk
  if chunk == 0 or jax.default_backend() != 'cpu':
    return None
  return relations.cache_sized_caption_chunk(config.batch_size, config.data.max_len,
                                             config.data.num_regions)


def late_groups(config) -> tuple[tuple[str, int], ...]:
  """Parameters whose first gradient comes late: (path regex, first step with a gradient)."""
  return (('criterion/prototypes', config.loss.freeze_prototypes_niters + 1),
          ('criterion/relation/.*', config.relation.warmup))


def check_config(config) -> None:
  m, b = config.moco.queue_length, config.batch_size
  if m % b:
    raise ValueError(f'config.moco.queue_length = {m} must be a multiple of config.batch_size = '
                     f'{b} (the queue is a ring buffer of whole batches)')
  for name, allowed in (('moco.query', ('prefusion', 'fused')),
                        ('moco.key_encoder_mode', ('mixed', 'train', 'eval')),
                        ('loss.reg_loss', ('constant', 'off')),
                        ('loss.base_loss', ('trip',)), ('loss.gnn_loss', ('trip',)),
                        # HREM's learned and CHAN's relevance are not implemented here.
                        ('relation.relevance_fn', ('aahr_scan_mean',))):
    section, field = name.split('.')
    if config[section][field] not in allowed:
      raise ValueError(f'config.{name} = {config[section][field]!r}; expected one of {allowed}')


def init_criterion(config, model_out_shapes: dict, rng) -> dict:
  """Prototypes [K, D] ~ N(0, 1) and the relation module's parameters."""
  proto_rng, rel_rng = jax.random.split(rng)
  b, d = model_out_shapes['img_prefusion'].shape
  zeros = lambda name: jnp.zeros(model_out_shapes[name].shape, jnp.float32)
  rel_params = relation_module(config).init(
      {'params': rel_rng, 'dropout': rel_rng}, zeros('img_prefusion'), zeros('cap_prefusion'),
      zeros('regions'), zeros('words'), jnp.full((b,), 2, jnp.int32), jnp.asarray(2),
      jnp.asarray(2), jnp.full((b,), 2, jnp.int32), deterministic=True)['params']
  return {'prototypes': jax.random.normal(proto_rng, (config.loss.nmb_prototypes, d)),
          'relation': rel_params}


def init_extra(config, params: dict, rng) -> dict:
  """Momentum copies of the encoders and the two MoCo queues (docs/method.md 2.16), plus the
  image ids of the queued keys when moco.mask_same_image needs them (-1: no key yet).

  The momentum copies are of `params` as given; weights loaded into the query encoders later
  must be copied again (train_state.start_from_pretrained does both)."""
  d = config.model.embed_size
  img_rng, cap_rng = jax.random.split(rng)
  extra = {'momentum': momentum_copy(params),
           'queue_img': losses.init_moco_queue(img_rng, d, config.moco.queue_length),
           'queue_cap': losses.init_moco_queue(cap_rng, d, config.moco.queue_length),
           'queue_ptr': jnp.zeros((), jnp.int32)}
  if config.moco.mask_same_image:
    extra['queue_ids'] = jnp.full((config.moco.queue_length,), -1, jnp.int32)
  return extra


def momentum_copy(params: dict) -> dict:
  """The key encoders' parameters as the original's deep copy makes them: the query encoders'."""
  return {k: params[k] for k in ENCODERS}


def _key_modes(mode: str) -> tuple[bool, bool]:
  """(train, bert_train) of the momentum encoders (quirk Q13)."""
  return {'mixed': (True, False), 'train': (True, True), 'eval': (False, False)}[mode]


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, config, schedule):
  """Returns train_step(state, batch) -> (state, metrics) for `train.TrainState` states."""
  check_config(config)
  relation = relation_module(config)
  loss_cfg, moco_cfg = config.loss, config.moco
  triplet_flags = dict(cutoff=loss_cfg.triplet_cutoff, max_over=loss_cfg.triplet_max_over,
                       on_empty_row=loss_cfg.triplet_on_empty_row,
                       margin=loss_cfg.triplet_margin, dim=loss_cfg.triplet_dim,
                       distance_clamp=loss_cfg.triplet_distance_clamp)
  mask_same_image = moco_cfg.mask_same_image
  key_train, key_bert_train = _key_modes(moco_cfg.key_encoder_mode)

  def train_step(state, batch: dict):
    it = state.step
    rng = jax.random.fold_in(state.rng, it)
    query_rng, key_rng, relation_rng, base_rng, graph_rng = jax.random.split(rng, 5)
    weights = losses.loss_weights(
        it, it, moco_queue_length=moco_cfg.queue_length, batch_size=config.batch_size,
        swav_weight=loss_cfg.swav_weight, swav_after=loss_cfg.freeze_prototypes_niters,
        graph_from=config.relation.warmup, reg_weight=loss_cfg.reg_loss_weight)
    weights['moco'] = weights['moco'] * (loss_cfg.moco_weight if moco_cfg.enabled else 0.0)
    ids = batch['image_index']

    # The prototypes are renormalised in place every step, outside autograd.
    params = dict(state.params)
    params['criterion'] = dict(params['criterion'],
                               prototypes=losses.normalize_prototypes(
                                   params['criterion']['prototypes']))

    # Momentum encoders: EMA of this step's query parameters, then a forward without gradient.
    m = moco_cfg.momentum
    momentum = jax.tree.map(lambda k, q: m * k + (1.0 - m) * q, state.extra['momentum'],
                            {k: params[k] for k in ENCODERS})
    keys_out, _ = model.apply({'params': momentum, 'batch_stats': state.batch_stats}, batch,
                              train=key_train, bert_train=key_bert_train,
                              rngs={'dropout': key_rng}, mutable=['batch_stats'])
    key_img = jax.lax.stop_gradient(keys_out['img_emb'])
    key_cap = jax.lax.stop_gradient(keys_out['cap_emb'])

    def relation_terms(criterion_params, out):
      rel = relation.apply({'params': criterion_params['relation']}, out['img_prefusion'],
                           out['cap_prefusion'], out['regions'], out['words'], out['bert_len'],
                           out['batch_max_regions'], out['batch_max_len'], out['region_len'],
                           deterministic=False, rngs={'dropout': relation_rng})
      graph = relations.relation_triplet_losses(rel, ids, key=graph_rng, **triplet_flags)
      reg = rel['reg_loss'] if loss_cfg.reg_loss == 'constant' else jnp.zeros(())
      return {'graph': graph['gnn'], 'gnn1': graph['gnn1'], 'gnn2': graph['gnn2'],
              'gnn3': graph['gnn3'], 'reg': jnp.asarray(reg, jnp.float32)}

    def no_relation_terms(criterion_params, out):
      del criterion_params, out
      return {k: jnp.zeros((), jnp.float32) for k in ('graph', 'gnn1', 'gnn2', 'gnn3', 'reg')}

    def loss_fn(p):
      out, updates = model.apply(
          {'params': {k: p[k] for k in ENCODERS}, 'batch_stats': state.batch_stats}, batch,
          train=True, rngs={'dropout': query_rng}, mutable=['batch_stats'])
      out = dict(out)
      for name in ('img_emb', 'cap_emb', 'img_prefusion', 'cap_prefusion'):
        out[name] = out[name].astype(jnp.float32)  # losses, softmaxes and Sinkhorn in fp32
      terms = {
          'base': losses.dws_triplet_loss(out['img_emb'], out['cap_emb'], ids, key=base_rng,
                                          **triplet_flags),
          'swav': losses.swav_loss(out['img_emb'], out['cap_emb'], p['criterion']['prototypes'],
                                   temperature=loss_cfg.swav_temperature,
                                   epsilon=loss_cfg.sinkhorn_epsilon,
                                   sinkhorn_iterations=loss_cfg.sinkhorn_iterations),
      }
      terms.update(jax.lax.cond(weights['graph'] > 0, relation_terms, no_relation_terms,
                                p['criterion'], out))
      query_img, query_cap = ((out['img_prefusion'], out['cap_prefusion'])
                              if moco_cfg.query == 'prefusion' else
                              (out['img_emb'], out['cap_emb']))
      terms['moco'] = losses.info_nce_loss(
          query_img, query_cap, key_img, key_cap, state.extra['queue_img'],
          state.extra['queue_cap'], temperature=moco_cfg.temperature,
          query_ids=ids if mask_same_image else None,
          queue_ids=state.extra['queue_ids'] if mask_same_image else None)
      total = losses.weighted_total(terms, {k: weights[k] for k in
                                            ('base', 'swav', 'graph', 'reg', 'moco')})
      return total, (terms, updates['batch_stats'])

    (total, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, params)
    # Skipped: the parameters as they were (the prototypes' renormalisation of unit rows is a
    # no-op up to rounding, so keeping them unrenormalised keeps a skipped step bit-exact).
    new_params = jax.tree.map(lambda p, u, old: jnp.where(finite, p + u, old), params, updates,
                              state.params)
    opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), opt_state,
                             state.opt_state)
    batch_stats = jax.tree.map(lambda new, old: jnp.where(finite, new, old), batch_stats,
                               state.batch_stats)  # never let a bad batch into BN statistics

    queue_img, pointer = losses.enqueue_keys(state.extra['queue_img'], state.extra['queue_ptr'],
                                             key_img)
    queue_cap, _ = losses.enqueue_keys(state.extra['queue_cap'], state.extra['queue_ptr'],
                                       key_cap)
    # Q25: a skipped step still moves the EMA and enqueues, as in the original, unless the keys
    # themselves are not finite (a corrupt batch): those would poison the queues for M / B steps.
    keys_finite = jnp.all(jnp.isfinite(key_img)) & jnp.all(jnp.isfinite(key_cap))
    keep = lambda new, old: jnp.where(keys_finite, new, old)
    extra = {'momentum': momentum, 'queue_img': keep(queue_img, state.extra['queue_img']),
             'queue_cap': keep(queue_cap, state.extra['queue_cap']),
             'queue_ptr': keep(pointer, state.extra['queue_ptr'])}
    if mask_same_image:
      queue_ids, _ = losses.enqueue_keys(state.extra['queue_ids'], state.extra['queue_ptr'], ids)
      extra['queue_ids'] = keep(queue_ids, state.extra['queue_ids'])
    metrics: dict[str, Any] = {'loss': total, 'grad_norm': grad_norm, 'lr': schedule(it),
                               'skipped': (~finite).astype(jnp.int32)}
    metrics.update({f'loss_{k}': v for k, v in terms.items()})
    metrics.update({f'weight_{k}': v for k, v in weights.items()})
    return state.replace(step=it + 1, params=new_params, batch_stats=batch_stats,
                         opt_state=opt_state, extra=extra), metrics

  return train_step
