"""Released AAHR checkpoint (model_best.pth of the original train.py) -> a converted DIR that
`aahr_jax.inference.Retriever.from_checkpoint(DIR)` loads.

  python -m conversion aahr --src runs/f30k_test_5/model_best.pth --out weights/aahr_f30k \
      [--bert_config bert-base-uncased/config.json]

Key tables: docs/method.md 4.2 (image encoder) and 4.3 (text encoder); every key is mapped or
deliberately ignored (num_batches_tracked, old `position_ids`), anything else is an error.
The local-Transformer head count, the residual weight and the gate-normalisation switches are
not visible in the shapes: they come from the checkpoint's `opt` (defaults if absent).
"""

from __future__ import annotations

import argparse

import numpy as np

from conversion import ConversionError, key_table, vse_checkpoint
from conversion.key_table import Rule
from conversion.vse_checkpoint import batch_norm_rules, linear_rules
from conversion.torch_checkpoint import short_list

DESCRIPTION = 'released AAHR model_best.pth -> converted DIR for aahr_jax.inference'
GGLP_PATTERN = r'mha_pool\.query\.(\d+)\.weight'


def add_arguments(parser: argparse.ArgumentParser) -> None:
  vse_checkpoint.add_arguments(parser, "the original run's model_best.pth")


def run(args: argparse.Namespace) -> int:
  return vse_checkpoint.run_import(args, convert, 'AAHR')


def identify(checkpoint: vse_checkpoint.OriginalCheckpoint) -> None:
  """Fails unless both state dicts are AAHR encoders, naming what they look like instead."""
  image, path = checkpoint.image, checkpoint.path
  if 'fc.fc.weight' in image and 'mha_pool.query.0.weight' in image:
    if 'fc_clip.fc.weight' not in checkpoint.text or 'linear.weight' not in checkpoint.text:
      raise ConversionError(f'{path}: the text encoder state_dict (model[1]) is not AAHR\'s: it '
                            f'lacks fc_clip.fc.weight / linear.weight (keys begin '
                            f'{short_list(sorted(checkpoint.text), 6)}).')
    return
  if any(k.startswith('gpool.') for k in image):
    raise ConversionError(f'{path} is a VSE-infinity (GPO) checkpoint, not AAHR: its image '
                          'encoder has gpool.* and no mha_pool.* keys; convert it with '
                          '`python -m conversion vse_infty`.')
  raise ConversionError(f'{path} is not an AAHR checkpoint: its image encoder state_dict lacks '
                        f'fc.fc.weight / mha_pool.query.0.weight (keys begin '
                        f'{short_list(sorted(image), 6)}).')


def _head_rules(prefix: str) -> list[Rule]:
  """fc_clip, aggr, gated_fusion, mha_pool of one encoder (torch keys without prefix)."""
  from aahr_jax.models import relations
  rules = linear_rules('fc_clip.fc', f'{prefix}/fc_clip/fc')
  rules += linear_rules('fc_clip.mlp.layers.0', f'{prefix}/fc_clip/mlp/layers_0')
  rules += linear_rules('gated_fusion.fc_gate', f'{prefix}/gated_fusion/fc_gate')
  for torch_key, (path, transpose) in relations.transformer_key_map(
      'aggr', (prefix, 'aggr')).items():
    rules.append(Rule(torch_key, 'params/' + '/'.join(path),
                      key_table.transpose if transpose else (lambda a: a)))
  for part in ('query', 'key', 'value'):
    # stacked by `_stack_gglp` into one [heads, out, in] tensor per part
    rules.append(Rule(f'mha_pool.{part}.weight', f'params/{prefix}/mha_pool/{part}/kernel',
                      lambda a: a.transpose(0, 2, 1)))
    rules.append(Rule(f'mha_pool.{part}.bias', f'params/{prefix}/mha_pool/{part}/bias'))
  return rules


def _stack_gglp(state: dict[str, np.ndarray], heads: int, what: str) -> dict[str, np.ndarray]:
  """mha_pool.{part}.{h}.{weight,bias}, h < heads -> mha_pool.{part}.{weight,bias} stacked."""
  state = dict(state)
  missing = []
  for part in ('query', 'key', 'value'):
    for leaf in ('weight', 'bias'):
      keys = [f'mha_pool.{part}.{h}.{leaf}' for h in range(heads)]
      missing += [k for k in keys if k not in state]
      if all(k in state for k in keys):
        shapes = {state[k].shape for k in keys}
        if len(shapes) != 1:
          raise ConversionError(f'{what}: the GGLP heads mha_pool.{part}.*.{leaf} differ in '
                                f'shape ({sorted(shapes)}).')
        state[f'mha_pool.{part}.{leaf}'] = np.stack([state.pop(k) for k in keys])
  if missing:
    raise ConversionError(f'{what} lacks {len(missing)} GGLP key(s): {short_list(missing)}; '
                          'the checkpoint is incomplete.')
  return state


def convert(checkpoint: vse_checkpoint.OriginalCheckpoint, bert_config_path: str | None = None):
  """Returns (model_config dict, variables {'params', 'batch_stats'}, inputs dict)."""
  from aahr_jax.models import aahr
  identify(checkpoint)
  opt, path = checkpoint.opt, checkpoint.path
  image_what = f'{path} image encoder (model[0])'
  text_what = f'{path} text encoder (model[1])'
  embed_size, region_dim = checkpoint.image['fc.fc.weight'].shape
  region_hidden = checkpoint.image['fc.mlp.layers.0.weight'].shape[0]
  clip_dim = checkpoint.image['fc_clip.fc.weight'].shape[1]
  heads = vse_checkpoint.count_indices(checkpoint.image, GGLP_PATTERN)
  text_embed = checkpoint.text['linear.weight'].shape[0]
  if text_embed != embed_size:
    raise ConversionError(f'{path}: image embed size {embed_size} (fc.fc.weight) != text embed '
                          f'size {text_embed} (linear.weight); the two encoders are not a pair.')
  if 'embed_size' in opt and int(opt['embed_size']) != embed_size:
    raise ConversionError(f'{path}: opt.embed_size = {opt["embed_size"]} but fc.fc.weight has '
                          f'{embed_size} rows; the file is inconsistent.')
  nhead = int(opt.get('nhead', 16))
  if embed_size % nhead:
    raise ConversionError(f'{path}: opt.nhead = {nhead} does not divide the embed size '
                          f'{embed_size}.')
  if bool(opt.get('no_imgnorm', False)) != bool(opt.get('no_txtnorm', False)):
    raise ConversionError(f'{path}: opt.no_imgnorm={opt.get("no_imgnorm")} and opt.no_txtnorm='
                          f'{opt.get("no_txtnorm")} differ; only equal settings are supported.')
  bert = vse_checkpoint.bert_config(checkpoint.text, bert_config_path, text_what)
  settings = aahr.AAHRSettings(
      embed_size=int(embed_size), region_hidden=int(region_hidden), num_heads=nhead,
      dropout=float(opt.get('dropout', 0.1)), gglp_heads=heads,
      residual_weight=float(opt.get('residual_weight', 0.8)),
      gate_l2_inputs=not bool(opt.get('no_imgnorm', False)))
  model_config = {'name': 'aahr', 'bert': bert.to_dict(), **_settings_dict(settings)}

  image_rules = linear_rules('fc.fc', 'img/fc/fc')
  image_rules += linear_rules('fc.mlp.layers.0', 'img/fc/mlp/layers_0')
  image_rules += linear_rules('fc.mlp.layers.1', 'img/fc/mlp/layers_1')
  image_rules += batch_norm_rules('fc.mlp.bns.0', 'img/fc/mlp/bns_0')
  image_rules += batch_norm_rules('fc.mlp.bns.1', 'img/fc/mlp/bns_1')
  image_rules += _head_rules('img')
  text_rules = vse_checkpoint.bert_rules(bert) + linear_rules('linear', 'txt/linear')
  text_rules += _head_rules('txt')
  flat = vse_checkpoint.apply_rules(_stack_gglp(checkpoint.image, heads, image_what),
                                    image_rules, image_what)
  flat.update(vse_checkpoint.apply_rules(_stack_gglp(checkpoint.text, heads, text_what),
                                         text_rules, text_what))
  inputs = {'region_dim': int(region_dim), 'clip_dim': int(clip_dim),
            'max_len': bert.max_position_embeddings, 'opt': _json_safe(opt)}
  vse_checkpoint.check_against_model(flat, model_config, sample_inputs(inputs), str(path))
  return model_config, vse_checkpoint.nested(flat), inputs


def sample_inputs(inputs: dict, batch: int = 2) -> dict:
  """A tiny batch with the checkpoint's input sizes (for shape inference)."""
  return {'regions': np.zeros((batch, 4, inputs['region_dim']), np.float32),
          'region_len': np.full((batch,), 4, np.int32),
          'bert_ids': np.ones((batch, 4), np.int32), 'bert_len': np.full((batch,), 4, np.int32),
          'clip_image': np.zeros((batch, inputs['clip_dim']), np.float32),
          'clip_text': np.zeros((batch, inputs['clip_dim']), np.float32)}


def _settings_dict(settings) -> dict:
  import dataclasses
  return dataclasses.asdict(settings)


def _json_safe(opt: dict) -> dict:
  """The original options that JSON can hold (kept for reference in model.json)."""
  safe = {}
  for k, v in opt.items():
    if isinstance(v, (bool, int, float, str)) or v is None:
      safe[k] = v
    elif isinstance(v, (list, tuple)) and all(isinstance(x, (bool, int, float, str)) for x in v):
      safe[k] = list(v)
  return safe
