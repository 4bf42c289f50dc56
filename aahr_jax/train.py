"""Training: shapes -> mesh and shardings -> state born sharded -> resume -> loop -> evaluation.

Read top to bottom: `train_and_evaluate` is the whole run. The train step is one `jax.jit`
with explicit shardings and the state donated; losses see the global batch.
"""

import json
import os
import shutil
import signal
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from aahr_jax import aahr_step
from aahr_jax import checkpoint
from aahr_jax import config_checks
from aahr_jax import evaluate
from aahr_jax import json_files
from aahr_jax import losses
from aahr_jax import multi_positive
from aahr_jax import multihost
from aahr_jax import optim
from aahr_jax import resume
from aahr_jax import sharding
from aahr_jax import train_state
# The state lives apart from the trainer (benchmarks use it without the data pipeline).
from aahr_jax.train_state import (TrainState, create_state_fn, device_fields,  # pylint: disable=unused-import
                                   sample_batch, uses_clip)
from aahr_jax.models import aahr
from input_pipeline import datasets
from input_pipeline import loader

def make_train_step(model, tx, config, steps_per_epoch: int, schedule):
  """The jittable step of the configured model: AAHR's (aahr_step.py) or VSE-infinity's."""
  if config.model.name == 'aahr':
    return aahr_step.make_train_step(model, tx, config, schedule)
  return make_vse_train_step(model, tx, config, steps_per_epoch, schedule)


def make_vse_train_step(model, tx, config, steps_per_epoch: int, schedule):
  """VSE++ max-violation hinge after `vse_mean_warmup_epochs` of all-negatives (GPO recipe)."""
  warmup_epochs = config.loss.vse_mean_warmup_epochs

  def train_step(state: TrainState, batch: dict):
    step_rng = jax.random.fold_in(state.rng, state.step)
    epoch = state.step // steps_per_epoch

    def loss_fn(params):
      (img, cap), updates = model.apply(
          {'params': params, 'batch_stats': state.batch_stats}, batch, train=True,
          rngs={'dropout': step_rng}, mutable=['batch_stats'])
      loss = losses.vse_contrastive_loss(
          img.astype(jnp.float32), cap.astype(jnp.float32), margin=config.loss.margin,
          max_violation=epoch >= warmup_epochs)
      return loss, updates['batch_stats']

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)  # otherwise skip the update
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: jnp.where(finite, p + u, p), state.params, updates)
    opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), opt_state,
                             state.opt_state)
    batch_stats = jax.tree.map(lambda new, old: jnp.where(finite, new, old), batch_stats,
                               state.batch_stats)  # never let a bad batch into BN statistics
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'lr': schedule(state.step),
               'skipped': (~finite).astype(jnp.int32)}
    return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state), metrics

  return train_step


class MetricsWriter:
  """metrics.jsonl and TensorBoard events in the workdir (process 0 only)."""

  def __init__(self, workdir: str, start_step: int = 0):
    """`start_step`: the restored step. Events an earlier process wrote for later steps are
    hidden by TensorBoard (`purge_step`); metrics.jsonl was trimmed by resume.trim_logs."""
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    self.jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
    events = os.path.join(workdir, 'tensorboard')
    earlier = os.path.isdir(events) and bool(os.listdir(events))
    self.tb = SummaryWriter(events, purge_step=start_step + 1 if earlier else None)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    self.jsonl.write(json.dumps({'step': step, **metrics}) + '\n')
    self.jsonl.flush()
    for k, v in metrics.items():
      if isinstance(v, (int, float)):
        self.tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self.enabled:
      self.jsonl.close()
      self.tb.close()


def create_state(model, tx, config, mesh, batch_size: int):
  """Shapes first (eval_shape), shardings from config.sharding_rules, then a jitted init whose
  outputs are born sharded (no device ever holds an unsharded copy)."""
  init = create_state_fn(model, tx, config, batch_size)
  rng = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(init, rng)
  shardings = sharding.state_shardings(
      abstract, config.get('sharding_rules', sharding.REPLICATE_ALL), mesh,
      fsdp_min_size=config.get('fsdp_min_size', 0))
  return jax.jit(init, out_shardings=shardings)(rng), shardings


def setup(config: ml_collections.ConfigDict, workdir: str):
  """Everything a run needs before its first step: data, model, optimizer, mesh, state."""
  # Process 0 builds missing data first; the others then find it built (shared data_dir).
  builder = multihost.main_first('build_data', lambda: datasets.build(config, workdir))
  if uses_clip(config) and config.data.name == 'synthetic' and not config.data.clip_online:
    # The demo's CLIP features come from its seeded random CLIP: build them on first use.
    # Real datasets need the explicit `--mode clip_cache` step (a clear error says so).
    from input_pipeline import clip_cache  # pylint: disable=import-outside-toplevel
    multihost.main_first('clip_cache', lambda: clip_cache.build(config, workdir))
  train_split = datasets.open_split(builder, config.data.train_split)
  steps_per_epoch = loader.steps_per_epoch(train_split, config.batch_size)
  model = aahr.build_model(config.model, config.get('dtype', 'float32'))
  mesh = sharding.create_mesh(config.mesh)
  shapes = jax.eval_shape(lambda: create_state_fn(model, optax.identity(), config, config.batch_size)(
      jax.random.PRNGKey(0)).params)
  late = aahr_step.late_groups(config) if config.model.name == 'aahr' else ()
  tx, schedule = optim.make_optimizer(config.optim, shapes, steps_per_epoch, late_groups=late)
  state, state_shardings = create_state(model, tx, config, mesh, config.batch_size)
  return {'builder': builder, 'train_split': train_split, 'steps_per_epoch': steps_per_epoch,
          'model': model, 'mesh': mesh, 'tx': tx, 'schedule': schedule, 'state': state,
          'state_shardings': state_shardings}


def variables_of(state: TrainState) -> dict:
  return {'params': state.params, 'batch_stats': state.batch_stats}


class PreemptionGuard:
  """SIGTERM/SIGINT: finish the current step, checkpoint, exit with EXIT_PREEMPTED.

  The first signal only sets a flag; the handlers are then reset to the defaults, so a second
  signal terminates the process at once.
  """

  def __init__(self):
    self.signal_name = None
    self._previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name
    print(f'\n{self.signal_name} received: finishing this step and writing a checkpoint '
          '(send it again to abort at once).', file=sys.stderr, flush=True)
    for sig in self._previous:
      signal.signal(sig, signal.SIG_DFL)

  @property
  def requested(self) -> bool:
    return self.signal_name is not None

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class TrainingStopped(Exception):
  """The run stopped on purpose (preemption or repeated non-finite losses); exit_code says how."""

  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code


EXIT_PREEMPTED = 75  # "temporary failure": rerun the same command to resume
EXIT_NON_FINITE = 3


def prepare_workdir(workdir: str, fresh: bool, overwrite: bool) -> None:
  """Creates the workdir and proves it writable before anything expensive runs."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_probe.{jax.process_index()}')  # one per process
    with open(probe, 'w', encoding='utf-8') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise OSError(f'workdir {workdir} is not writable: {e}') from None
  if not fresh:
    return
  multihost.sync('fresh:look')  # every process looks before process 0 deletes anything
  existing = os.path.isdir(os.path.join(workdir, checkpoint.LATEST_DIR)) and os.listdir(
      os.path.join(workdir, checkpoint.LATEST_DIR))
  if existing:
    if not overwrite:
      raise FileExistsError(
          f'--fresh: {workdir} already holds a run ({checkpoint.LATEST_DIR}/ is not empty); '
          'pass --overwrite as well to delete it, or choose another --workdir')
    if multihost.is_main():
      _delete_run(workdir)
  multihost.sync('fresh:deleted')


def _delete_run(workdir: str) -> None:
  """--fresh --overwrite: removes the previous run's outputs."""
  for name in (checkpoint.LATEST_DIR, checkpoint.BEST_DIR, 'eval', 'tensorboard',
               'metrics.jsonl', evaluate.BEST_FILE):
    path = os.path.join(workdir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
      f.write(config.to_json_best_effort(indent=2))


def config_changes(workdir: str, config: ml_collections.ConfigDict) -> list[str]:
  """'field: old -> new' for every config field that differs from the workdir's config.json."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    return []
  try:
    stored = json_files.read(path, 'it is rewritten from this command\'s config once the '
                             'checkpoint is restored')
  except json_files.DamagedFile as e:  # the checkpoint still says whether the config fits
    print(f'{e}; the config changes cannot be listed.', flush=True)
    return []
  current = json.loads(config.to_json_best_effort())

  def flat(tree, prefix=''):
    if not isinstance(tree, dict):
      return {prefix[:-1]: tree}
    return {k: v for key, sub in tree.items() for k, v in flat(sub, f'{prefix}{key}.').items()}

  before, after = flat(stored), flat(current)
  return [f'{k}: {before.get(k, "(absent)")!r} -> {after.get(k, "(absent)")!r}'
          for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]


def check_disk_space(workdir: str, state, keep: int) -> None:
  """Fails before training if the checkpoints we will keep cannot fit on the disk."""
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  needed = state_bytes * (keep + 2)  # keep-N latest + best + one being written
  free = shutil.disk_usage(workdir).free
  if free < needed:
    raise OSError(f'not enough disk space in {workdir}: {free / 2**30:.2f} GiB free, the '
                  f'checkpoints of this run need about {needed / 2**30:.2f} GiB '
                  f'({keep} kept + best + one in flight of {state_bytes / 2**20:.0f} MiB each)')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, fresh: bool = False,
                       overwrite: bool = False) -> dict:
  config_checks.validate(config)
  prepare_workdir(workdir, fresh, overwrite)
  run = setup(config, workdir)
  model, mesh, state = run['model'], run['mesh'], run['state']
  steps_per_epoch = run['steps_per_epoch']
  total_steps = steps_per_epoch * config.num_epochs
  text = datasets.text_options(config)
  datasets.check_caption_lengths(config, config.data.train_split, run['train_split'])
  eval_split = config.data.eval_split
  if eval_split in run['builder'].info.splits:  # a wrong protocol is refused now, not after training
    datasets.check_eval_protocol(config, eval_split,
                                 datasets.open_split(run['builder'], eval_split))
  check_disk_space(workdir, state, config.keep_checkpoints)

  # Resume from the latest complete checkpoint, if any.
  mngr = checkpoint.manager(workdir, config.keep_checkpoints)
  best_mngr = checkpoint.manager(workdir, 1, checkpoint.BEST_DIR)
  start_step, meta = 0, None
  if mngr.all_steps():
    # The newest checkpoint that restores; damaged newer ones are moved aside (resume.py).
    changes = config_changes(workdir, config)
    state, meta = resume.restore_newest_readable(mngr, state, workdir, changes)
    start_step = int(meta['step'])
    print(f'Resumed from {mngr.directory} at step {start_step}'
          + (f' with config changes: {"; ".join(changes)}' if changes else '') + '.', flush=True)
  resume.check_best(best_mngr)
  resume.trim_logs(workdir, start_step)  # the steps after start_step are logged again
  write_config(config, workdir)  # a resumed run's only once its checkpoint fits this config
  if start_step == 0:
    state = train_state.start_from_pretrained(config, state, run['state_shardings'])

  train_step = jax.jit(make_train_step(model, run['tx'], config, steps_per_epoch,
                                       run['schedule']),
                       in_shardings=(run['state_shardings'], sharding.batch_sharding(mesh)),
                       out_shardings=(run['state_shardings'], sharding.replicated(mesh)),
                       donate_argnums=(0,))
  # This process's rows of each global batch: the block its devices hold on the mesh.
  block, blocks = sharding.process_block(mesh, config.batch_size)
  batches = loader.train_iterator(
      run['train_split'], batch_size=config.batch_size, num_steps=total_steps,
      seed=config.seed, text=text, start_step=start_step,
      size_augment=config.data.size_augment, word_augment=config.data.word_augment,
      process_index=block, process_count=blocks,
      num_threads=config.data.num_threads, region_keep_prob=config.data.region_keep_prob)
  selection = SelectionEvaluator(config, workdir, run)

  writer = MetricsWriter(workdir, start_step)
  print(f'Training {config.model.name} for {total_steps} steps ({config.num_epochs} epochs of '
        f'{steps_per_epoch}) on {jax.device_count()} device(s), batch {config.batch_size}.',
        flush=True)
  bar = tqdm(total=total_steps, initial=start_step, desc='train', file=sys.stderr,
             mininterval=5.0, disable=jax.process_index() != 0)
  guard = PreemptionGuard()
  # Counters logged with every record: restored, so a resumed run logs what one run would.
  truncated = int((meta or {}).get('truncated_captions', 0))
  skipped_total, skipped_in_a_row = int((meta or {}).get('skipped_total', 0)), 0
  max_skips = config.max_consecutive_skips
  last_time, last_step = time.time(), start_step
  pending = None  # the previous step's metrics, read one step late to keep the device busy
  last_clean_checkpoint = mngr.latest_step()

  def save(step: int, force: bool = False) -> None:
    checkpoint.save(mngr, step, state, {'step': step, 'epoch': step // steps_per_epoch,
                                        'truncated_captions': truncated,
                                        'skipped_total': skipped_total}, force=force)

  def check_skips(step: int, metrics) -> None:
    nonlocal skipped_total, skipped_in_a_row
    if int(metrics['skipped']):
      skipped_total += 1
      skipped_in_a_row += 1
      if skipped_in_a_row > max_skips:
        terms = {k: float(v) for k, v in jax.device_get(metrics).items()
                 if k == 'loss' or k.startswith('loss_')}
        mngr.wait_until_finished()
        raise TrainingStopped(
            f'step {step}: the loss or its gradient was not finite for {skipped_in_a_row} steps '
            f'in a row (config.max_consecutive_skips = {max_skips}); loss '
            f'terms: {terms}. The last checkpoint before these steps is step '
            f'{last_clean_checkpoint} in {mngr.directory}.', EXIT_NON_FINITE)
    else:
      skipped_in_a_row = 0

  try:
    nan_steps = set(config.debug.nan_steps)

    def host_batches():
      for step in range(start_step, total_steps):
        batch = next(batches)
        if step in nan_steps:  # testing hook: a corrupt batch must be skipped, not learned from
          batch = dict(batch, regions=np.full_like(batch['regions'], np.nan))
        yield step, batch

    to_device = lambda item: sharding.global_batch(
        {k: item[1][k] for k in device_fields(config)}, mesh)
    for (step, batch), device_batch in sharding.prefetch_to_device(host_batches(), to_device):
      truncated += int(batch['truncated'].sum())
      state, metrics = train_step(state, device_batch)
      if pending is not None:
        check_skips(*pending)
      pending = (step + 1, metrics)
      done = step + 1
      if done % config.log_every_steps == 0 or done == total_steps:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.time()
        values.update(epoch=step // steps_per_epoch, truncated_captions=truncated,
                      skipped_total=skipped_total + int(values['skipped']),
                      examples_per_sec=(done - last_step) * config.batch_size / (now - last_time))
        last_time, last_step = now, done
        writer.write(done, values)
        bar.set_postfix(loss=f'{values["loss"]:.3f}', epoch=values['epoch'])
      bar.update(1)
      if done % config.checkpoint_every_steps == 0 or done == total_steps:
        check_skips(*pending)  # resolve this step's status before writing it down
        pending = None
        save(done)  # a skipped step leaves the parameters as they were: still a good state
        if not skipped_in_a_row:
          last_clean_checkpoint = done
      if done % steps_per_epoch == 0 and selection.due(done // steps_per_epoch):
        selection.run(state, done, best_mngr)
      if guard.requested:
        if pending is not None:  # else this step's periodic checkpoint is already on its way
          check_skips(*pending)
          save(done, force=True)
        mngr.wait_until_finished()
        best_mngr.wait_until_finished()
        raise TrainingStopped(f'stopped by {guard.signal_name} at step {done}; the checkpoint '
                              f'is in {mngr.directory}. Run the same command to resume.',
                              EXIT_PREEMPTED)
    if pending is not None:
      check_skips(*pending)
  finally:
    bar.close()
    guard.restore()
    mngr.wait_until_finished()
    best_mngr.wait_until_finished()
    writer.close()

  return final_evaluation(config, workdir, run, state, total_steps)


class SelectionEvaluator:
  """Validation on the selection split every `eval.every_epochs` epochs; keeps the best model
  (by rSum) in <workdir>/best and best.json (docs/method.md Q4: the split is logged)."""

  def __init__(self, config, workdir: str, run: dict):
    self.config, self.workdir, self.run_info = config, workdir, run
    self.every = config.eval.get('every_epochs', 1)
    self.split_name = evaluate.selection_split(config) if self.every else None
    self.split = (datasets.open_split(run['builder'], self.split_name)
                  if self.split_name in run['builder'].info.splits else None)
    if self.every and self.split is None:
      print(f'No {self.split_name!r} split: model selection is off; the final step is '
            'evaluated.', flush=True)

  def due(self, epoch: int) -> bool:
    return bool(self.every) and self.split is not None and epoch % self.every == 0

  def run(self, state, step: int, best_mngr) -> None:
    run = self.run_info
    results = evaluate.validate(
        run['model'], variables_of(state), self.split, split_name=self.split_name,
        mesh=run['mesh'], batch_size=self.config.eval.batch_size,
        text=datasets.text_options(self.config), step=step, workdir=self.workdir)
    if evaluate.update_best(self.workdir, step, results, self.split_name):
      checkpoint.save(best_mngr, step, state, {'step': step, 'selection_split': self.split_name,
                                               'rsum': evaluate.selection_score(results)})
    best = evaluate.read_best(self.workdir)
    print(f'Best rsum: {best["rsum"]:.1f} at step {best["step"]} (on {self.split_name})',
          flush=True)


def final_evaluation(config, workdir: str, run: dict, state: TrainState, total_steps: int):
  """Evaluates the selected model (best on the selection split), else the final step."""
  best = evaluate.read_best(workdir)
  best_mngr = checkpoint.manager(workdir, 1, checkpoint.BEST_DIR)
  selected = best is not None and best_mngr.latest_step() == best['step']
  if selected:
    try:
      state, _ = checkpoint.restore(best_mngr, best['step'], state)
    except checkpoint.UnreadableCheckpoint as e:  # damaged while training: keep the run's result
      resume.set_aside(e)
      print('Evaluating the final step instead of the selected one.', flush=True)
      selected = False
  if selected:
    name = f'step {best["step"]} (best rsum {best["rsum"]:.1f})'
    selection_name = best['selection_split']
  else:
    name, selection_name = f'step {total_steps} (final)', 'none (final step)'
  return evaluate_state(config, workdir, run, state, checkpoint_name=name,
                        selection_split=selection_name)


def evaluate_state(config, workdir: str, run: dict, state: TrainState, checkpoint_name: str,
                   selection_split: str = 'none') -> dict:
  split_name = config.data.eval_split
  split = datasets.open_split(run['builder'], split_name)
  datasets.check_eval_protocol(config, split_name, split)
  print(f'Evaluating on {split_name} ({split.num_images} images, {split.num_captions} captions).',
        flush=True)
  return evaluate.evaluate(
      run['model'], variables_of(state), split, split_name=split_name, mesh=run['mesh'],
      batch_size=config.eval.batch_size, text=datasets.text_options(config),
      protocol=config.eval.protocol, workdir=workdir,
      header_extra={'checkpoint': checkpoint_name, 'selection_split': selection_split},
      save_sims=config.eval.get('save_sims', False), dataset=config.data.name,
      ground_truth=multi_positive.for_config(config, workdir, split_name, split))


def evaluate_checkpoint(config, workdir: str, which: str | None = None) -> dict:
  """`--mode eval`: the named checkpoint step, 'latest', or by default the selected best."""
  checkpoint.require_checkpoint(workdir)
  mngr = checkpoint.manager(workdir, config.keep_checkpoints)
  best_mngr = checkpoint.manager(workdir, 1, checkpoint.BEST_DIR)
  run = setup(config, workdir)
  best = evaluate.read_best(workdir)
  wants_best = which in (None, '', 'best') or (best is not None and str(which) == str(best['step']))
  if wants_best and best is not None and best_mngr.latest_step() == best['step']:
    state = _restore_for_eval(best_mngr, best['step'], run['state'], workdir)
    return evaluate_state(config, workdir, run, state,
                          checkpoint_name=f'step {best["step"]} (best rsum {best["rsum"]:.1f})',
                          selection_split=best['selection_split'])
  step = checkpoint.resolve_step(mngr, None if which == 'best' else which)
  state = _restore_for_eval(mngr, step, run['state'], workdir)
  return evaluate_state(config, workdir, run, state, checkpoint_name=f'{mngr.directory}/{step}')


def _restore_for_eval(mngr, step: int, target, workdir: str):
  """checkpoint.restore; a damaged checkpoint is named with the readable steps to pass instead
  (evaluation moves nothing: the user chooses)."""
  try:
    return checkpoint.restore(mngr, step, target)[0]
  except checkpoint.UnreadableCheckpoint as e:
    raise checkpoint.UnreadableCheckpoint(
        e.folder, f'{e.reason}; {checkpoint.alternatives(workdir, e.folder)}') from None
