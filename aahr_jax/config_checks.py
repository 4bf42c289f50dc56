"""Validation of a config before anything runs: every problem named by its field, all at once."""

import jax


def _is_positive_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_int(config, path: str, problems: list[str]) -> None:
  value = _get(config, path)
  if not _is_positive_int(value):
    problems.append(f'config.{path} = {value!r}: expected a positive integer')


def _positive_number(config, path: str, problems: list[str]) -> None:
  value = _get(config, path)
  if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
    problems.append(f'config.{path} = {value!r}: expected a positive number')


def _get(config, path: str):
  node = config
  for part in path.split('.'):
    node = node[part]
  return node


def problems_of(config) -> list[str]:
  problems: list[str] = []
  for path in ('batch_size', 'num_epochs', 'log_every_steps', 'checkpoint_every_steps',
               'keep_checkpoints', 'max_consecutive_skips', 'data.max_len', 'data.region_dim',
               'data.num_regions', 'model.embed_size', 'eval.batch_size'):
    _positive_int(config, path, problems)
  for path in ('optim.lr', 'optim.grad_clip'):
    _positive_number(config, path, problems)
  if not 0 <= config.optim.weight_decay < 1:
    problems.append(f'config.optim.weight_decay = {config.optim.weight_decay}: expected [0, 1)')
  if not 0 < config.optim.decay_rate <= 1:
    problems.append(f'config.optim.decay_rate = {config.optim.decay_rate}: expected (0, 1]')
  if any((not isinstance(e, int)) or e < 0 for e in config.optim.lr_schedules):
    problems.append(f'config.optim.lr_schedules = {config.optim.lr_schedules}: expected epochs '
                    '(non-negative integers)')
  if config.dtype not in ('float32', 'bfloat16'):
    problems.append(f"config.dtype = {config.dtype!r}: expected 'float32' or 'bfloat16'")
  if _is_positive_int(config.batch_size) and config.batch_size % jax.device_count():
    problems.append(f'config.batch_size = {config.batch_size} is not divisible by the '
                    f'{jax.device_count()} devices (the global batch is split evenly)')
  bert = config.model.bert
  if bert['hidden_size'] % bert['num_attention_heads']:
    problems.append(f'config.model.bert: hidden_size {bert["hidden_size"]} is not divisible by '
                    f'num_attention_heads {bert["num_attention_heads"]}')
  if config.data.max_len > bert['max_position_embeddings']:
    problems.append(f'config.data.max_len = {config.data.max_len} exceeds BERT\'s '
                    f'max_position_embeddings = {bert["max_position_embeddings"]}')
  if config.model.name == 'aahr':
    if config.model.embed_size % config.model.num_heads:
      problems.append(f'config.model.embed_size = {config.model.embed_size} is not divisible by '
                      f'config.model.num_heads = {config.model.num_heads}')
    if _is_positive_int(config.batch_size) and config.moco.queue_length % config.batch_size:
      problems.append(f'config.moco.queue_length = {config.moco.queue_length} must be a '
                      f'multiple of config.batch_size = {config.batch_size}')
    if not 0 < config.moco.momentum < 1:
      problems.append(f'config.moco.momentum = {config.moco.momentum}: expected (0, 1)')
    chunk = config.relation.caption_chunk
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < -1:
      problems.append(f'config.relation.caption_chunk = {chunk!r}: expected -1 (auto), 0 (all '
                      'captions at once) or a positive number of captions')
    if config.relation.topk > config.data.max_len:
      problems.append(f'config.relation.topk = {config.relation.topk} exceeds config.data.max_len')
  return problems


def validate(config) -> None:
  problems = problems_of(config)
  if problems:
    raise ValueError('invalid config: ' + '; '.join(problems))
