"""Released VSE-infinity (GPO; woodfrog/vse_infty, BUTD regions + BERT, precomp_enc_type
'basic') checkpoint -> a converted DIR that `aahr_jax.inference.Retriever` loads.

  python -m conversion vse_infty --src runs/f30k_butd_region_bert/model_best.pth --out DIR \
      [--bert_config bert-base-uncased/config.json]

Keys: docs/method.md 4.5. The Flax GRU keeps PyTorch's tensor layout (weight_ih_l0 [96, 32], ...),
so the GRU tensors copy without transposing.
"""

from __future__ import annotations

import argparse

import numpy as np

from conversion import ConversionError, vse_checkpoint
from conversion.key_table import Rule, transpose
from conversion.vse_checkpoint import batch_norm_rules, linear_rules
from conversion.torch_checkpoint import short_list

DESCRIPTION = 'released VSE-infinity (GPO) model_best.pth -> converted DIR for aahr_jax.inference'
GRU_TENSORS = tuple(f'{kind}_{part}_l0{suffix}' for suffix in ('', '_reverse')
                    for kind in ('weight', 'bias') for part in ('ih', 'hh'))


def add_arguments(parser: argparse.ArgumentParser) -> None:
  vse_checkpoint.add_arguments(
      parser, "the original run's model_best.pth(.tar) or checkpoint.pth(.tar)")


def run(args: argparse.Namespace) -> int:
  return vse_checkpoint.run_import(args, convert, 'VSE-infinity (GPO)')


def identify(checkpoint: vse_checkpoint.OriginalCheckpoint) -> None:
  image, path = checkpoint.image, checkpoint.path
  if 'mha_pool.query.0.weight' in image or 'fc.fc.weight' in image:
    raise ConversionError(f'{path} is an AAHR checkpoint, not VSE-infinity: its image encoder '
                          'has fc.fc.* / mha_pool.* keys; convert it with '
                          '`python -m conversion aahr`.')
  if not ('fc.weight' in image and 'gpool.gru.weight_ih_l0' in image):
    raise ConversionError(f'{path} is not a VSE-infinity region (basic) checkpoint: its image '
                          'encoder state_dict lacks fc.weight / gpool.gru.weight_ih_l0 (keys '
                          f'begin {short_list(sorted(image), 6)}); grid/backbone checkpoints are '
                          'not supported.')
  if 'gpool.gru.weight_ih_l0' not in checkpoint.text or 'linear.weight' not in checkpoint.text:
    raise ConversionError(f'{path}: the text encoder state_dict (model[1]) is not VSE-infinity\'s:'
                          f' it lacks linear.weight / gpool.gru.weight_ih_l0 (keys begin '
                          f'{short_list(sorted(checkpoint.text), 6)}).')


def _gpool_rules(prefix: str) -> list[Rule]:
  rules = [Rule(f'gpool.gru.{name}', f'params/{prefix}/gpool/gru/{name}') for name in GRU_TENSORS]
  return rules + [Rule('gpool.linear.weight', f'params/{prefix}/gpool/linear/kernel', transpose)]


def convert(checkpoint: vse_checkpoint.OriginalCheckpoint, bert_config_path: str | None = None):
  """Returns (model_config dict, variables {'params', 'batch_stats'}, inputs dict)."""
  identify(checkpoint)
  opt, path = checkpoint.opt, checkpoint.path
  if opt.get('precomp_enc_type', 'basic') != 'basic':
    raise ConversionError(f'{path}: opt.precomp_enc_type = {opt["precomp_enc_type"]!r}; only '
                          "the 'basic' region encoder (fc + MLP) is supported.")
  for flag in ('no_imgnorm', 'no_txtnorm'):
    if opt.get(flag):
      raise ConversionError(f'{path}: opt.{flag} = True is not supported (the VSE-infinity '
                            'model here always L2-normalises its embeddings).')
  embed_size, region_dim = checkpoint.image['fc.weight'].shape
  text_embed = checkpoint.text['linear.weight'].shape[0]
  if text_embed != embed_size:
    raise ConversionError(f'{path}: image embed size {embed_size} (fc.weight) != text embed size '
                          f'{text_embed} (linear.weight); the two encoders are not a pair.')
  text_what = f'{path} text encoder (model[1])'
  image_what = f'{path} image encoder (model[0])'
  bert = vse_checkpoint.bert_config(checkpoint.text, bert_config_path, text_what)
  model_config = {'name': 'vse_infinity', 'embed_size': int(embed_size), 'bert': bert.to_dict(),
                  'bn_mask_padding': False,
                  'region_hidden': int(checkpoint.image['mlp.layers.0.weight'].shape[0])}

  image_rules = linear_rules('fc', 'img/fc')
  image_rules += linear_rules('mlp.layers.0', 'img/mlp/layers_0')
  image_rules += linear_rules('mlp.layers.1', 'img/mlp/layers_1')
  image_rules += batch_norm_rules('mlp.bns.0', 'img/mlp/bns_0')
  image_rules += batch_norm_rules('mlp.bns.1', 'img/mlp/bns_1')
  image_rules += _gpool_rules('img')
  text_rules = vse_checkpoint.bert_rules(bert) + linear_rules('linear', 'txt/linear')
  text_rules += _gpool_rules('txt')
  flat = vse_checkpoint.apply_rules(checkpoint.image, image_rules, image_what)
  flat.update(vse_checkpoint.apply_rules(checkpoint.text, text_rules, text_what))
  inputs = {'region_dim': int(region_dim), 'clip_dim': 0,
            'max_len': bert.max_position_embeddings}
  sample = {'regions': np.zeros((2, 4, region_dim), np.float32),
            'region_len': np.full((2,), 4, np.int32), 'bert_ids': np.ones((2, 4), np.int32),
            'bert_len': np.full((2,), 4, np.int32)}
  vse_checkpoint.check_against_model(flat, model_config, sample, str(path))
  return model_config, vse_checkpoint.nested(flat), inputs
