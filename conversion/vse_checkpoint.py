"""The training-checkpoint layout shared by AAHR and VSE-infinity (docs/method.md 4.1, 4.5):

  {'model': [image_encoder_state_dict, text_encoder_state_dict], 'opt': argparse.Namespace,
   'epoch': int, 'best_rsum': float, 'Eiters': int}

plus what both importers need on top of the key tables: the BERT configuration (BERT-base unless
a config.json is given, checked against the tensor shapes) and the shape check against the Flax
model.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import re

import numpy as np

from conversion import ConversionError, key_table, torch_load
from conversion.key_table import Rule
from conversion.torch_checkpoint import short_list

# Buffers of the torch modules that the Flax models rebuild or do not have.
IGNORED_BUFFERS = (r'.*num_batches_tracked', r'bert\.embeddings\.position_ids',
                   r'bert\.embeddings\.token_type_ids')


@dataclasses.dataclass
class OriginalCheckpoint:
  image: dict[str, np.ndarray]   # model[0], 'module.' stripped
  text: dict[str, np.ndarray]    # model[1], 'module.' stripped
  opt: dict                      # vars(opt); {} when absent
  info: dict                     # epoch, best_rsum, Eiters when present
  path: pathlib.Path


def read(src: str | pathlib.Path, trust_pickle: bool = False) -> OriginalCheckpoint:
  """Reads model_best.pth / checkpoint.pth(.tar) written by the original train.py; the pickle's
  only class beyond tensors and numbers is the options' argparse.Namespace, so nothing in the
  file runs unless trust_pickle (conversion/torch_load.py)."""
  path = pathlib.Path(src)
  if not path.is_file():
    raise ConversionError(f'--src {path} is not a file; pass the model_best.pth written by the '
                          'original train.py.')
  checkpoint = _torch_load(path, trust_pickle)
  if not isinstance(checkpoint, dict) or 'model' not in checkpoint:
    found = (f'a dict with keys {short_list(map(str, checkpoint))}'
             if isinstance(checkpoint, dict) else f'a {type(checkpoint).__name__}')
    raise ConversionError(
        f'{path} holds {found}, not an original training checkpoint ({{"model": [image_sd, '
        'text_sd], "opt": ..., ...}}); pass the model_best.pth of the original run (a bare '
        'BERT or CLIP file goes to `python -m conversion bert|open_clip`).')
  model = checkpoint['model']
  if not (isinstance(model, (list, tuple)) and len(model) == 2
          and all(isinstance(sd, dict) for sd in model)):
    raise ConversionError(f'{path}: checkpoint["model"] is a {type(model).__name__}, expected '
                          'the list [image_encoder_state_dict, text_encoder_state_dict].')
  opt = checkpoint.get('opt')
  opt = vars(opt) if isinstance(opt, argparse.Namespace) else dict(opt or {})
  info = {k: _plain(checkpoint[k]) for k in ('epoch', 'best_rsum', 'Eiters') if k in checkpoint}
  return OriginalCheckpoint(_tensors(model[0]), _tensors(model[1]), opt, info, path)


def from_state_dicts(image_sd: dict, text_sd: dict, opt: dict | None = None,
                     name: str = '<state dicts>') -> OriginalCheckpoint:
  """The same, from in-memory torch state dicts (tests, notebooks)."""
  return OriginalCheckpoint(_tensors(image_sd), _tensors(text_sd), dict(opt or {}), {},
                            pathlib.Path(name))


def add_arguments(parser: argparse.ArgumentParser, src_help: str) -> None:
  """The command line shared by the `aahr` and `vse_infty` importers."""
  parser.add_argument('--src', required=True, help=src_help)
  parser.add_argument('--out', required=True, help='output directory (model.json + weights)')
  parser.add_argument('--bert_config',
                      help='HF config.json of the BERT inside (default: bert-base-uncased)')


def run_import(args: argparse.Namespace, convert, method: str) -> int:
  """Reads args.src, converts it with `convert(checkpoint, bert_config)`, writes args.out."""
  from aahr_jax import inference  # pylint: disable=import-outside-toplevel
  checkpoint = read(args.src, torch_load.trust_requested(args))
  model_config, variables, inputs = convert(checkpoint, args.bert_config)
  inference.write_converted_dir(args.out, model_config, variables, inputs,
                                source=str(checkpoint.path), original=checkpoint.info)
  print(f'wrote {args.out}: {method}, embed {model_config["embed_size"]}, BERT '
        f'{model_config["bert"]["num_hidden_layers"]} layers / hidden '
        f'{model_config["bert"]["hidden_size"]}, {checkpoint.info}')
  return 0


def _torch_load(path: pathlib.Path, trust_pickle: bool):
  try:
    return torch_load.load(path, trust_pickle)
  except ConversionError:
    raise
  except Exception as e:  # damaged or foreign files raise many types
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConversionError(f'cannot read {path} ({type(e).__name__}: {reason}); the file is '
                          'truncated, damaged or not a PyTorch checkpoint.') from e


def _plain(value):
  return value.item() if hasattr(value, 'item') else value


def _tensors(state: dict) -> dict[str, np.ndarray]:
  """Tensor entries as numpy (floats as float32), DataParallel's 'module.' prefix stripped."""
  import torch
  out = {}
  for key, value in state.items():
    if not isinstance(value, torch.Tensor):
      continue
    key = key[len('module.'):] if key.startswith('module.') else key
    value = value.detach().cpu()
    out[key] = (value.to(torch.float32) if value.is_floating_point() else value).numpy().copy()
  return out


# ----------------------------------------------------------------------------------------------
# BERT configuration
# ----------------------------------------------------------------------------------------------

def _bert_headline_shapes(config) -> dict[str, tuple]:
  """Torch keys whose shapes pin a BERT configuration down (except the head count)."""
  h, i = config.hidden_size, config.intermediate_size
  shapes = {
      'bert.embeddings.word_embeddings.weight': (config.vocab_size, h),
      'bert.embeddings.position_embeddings.weight': (config.max_position_embeddings, h),
      'bert.embeddings.token_type_embeddings.weight': (config.type_vocab_size, h),
      'bert.encoder.layer.0.intermediate.dense.weight': (i, h),
  }
  return shapes


def bert_config(text: dict[str, np.ndarray], config_path: str | None, what: str):
  """BERT-base, or the HF config.json given; either must fit the checkpoint's shapes."""
  from aahr_jax.models.bert import BertConfig
  from configs import common
  from conversion import bert as bert_conversion
  if config_path:
    config = bert_conversion.resolve_config(config_path, config_path, {})
    source = f'--bert_config {config_path}'
  else:
    config = BertConfig.from_dict(common.BERT_BASE)
    source = 'BERT-base (no --bert_config given)'
  wrong = [f'{k} {list(text[k].shape)} (expected {list(v)})'
           for k, v in _bert_headline_shapes(config).items()
           if k in text and tuple(text[k].shape) != tuple(v)]
  layers = key_table.count_layers(text, r'bert\.encoder\.layer\.(\d+)\.')
  if layers != config.num_hidden_layers:
    wrong.append(f'bert.encoder.layer.* has {layers} layers (expected '
                 f'{config.num_hidden_layers})')
  if wrong:
    hint = ('pass --bert_config CONFIG_JSON, the HF config.json of the BERT the model was '
            'trained with' if not config_path else 'pass the config.json the model was trained '
            'with')
    raise ConversionError(f'{what}: the BERT weights do not fit {source}: '
                          f'{"; ".join(wrong)}; {hint}.')
  return config


def bert_rules(config) -> list[Rule]:
  """`bert.*` keys -> params/txt/bert/... (the BERT converter's table, prefixed)."""
  from conversion import bert as bert_conversion
  return [Rule(f'bert.{r.source}', f'params/txt/bert/{r.target}', r.transform)
          for r in bert_conversion.key_table_for(config, with_pooler=True)]


# ----------------------------------------------------------------------------------------------
# Rules shared by both models, and the final check
# ----------------------------------------------------------------------------------------------

def linear_rules(src: str, dst: str) -> list[Rule]:
  return [Rule(f'{src}.weight', f'params/{dst}/kernel', key_table.transpose),
          Rule(f'{src}.bias', f'params/{dst}/bias')]


def batch_norm_rules(src: str, dst: str) -> list[Rule]:
  return [Rule(f'{src}.weight', f'params/{dst}/scale'), Rule(f'{src}.bias', f'params/{dst}/bias'),
          Rule(f'{src}.running_mean', f'batch_stats/{dst}/mean'),
          Rule(f'{src}.running_var', f'batch_stats/{dst}/var')]


def apply_rules(state: dict[str, np.ndarray], rules: list[Rule], what: str,
                extra_ignored=()) -> dict[str, np.ndarray]:
  return key_table.apply_table(state, rules, IGNORED_BUFFERS + tuple(extra_ignored), what)


def count_indices(state, pattern: str) -> int:
  return len({m.group(1) for k in state if (m := re.fullmatch(pattern, k))})


def check_against_model(flat: dict[str, np.ndarray], model_config: dict, sample_inputs: dict,
                        what: str) -> None:
  """Every variable of the Flax model filled with the right shape, nothing else."""
  import jax
  import ml_collections
  from flax import traverse_util
  from aahr_jax.models import aahr
  model = aahr.build_model(ml_collections.ConfigDict(model_config))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), sample_inputs))
  expected = {k: v.shape for k, v in traverse_util.flatten_dict(shapes, sep='/').items()}
  key_table.check_shapes(flat, expected, what)


def nested(flat: dict[str, np.ndarray]) -> dict:
  from flax import traverse_util
  return traverse_util.unflatten_dict(flat, sep='/')
