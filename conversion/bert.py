"""HF BERT (PyTorch) -> aahr_jax.models.bert.BertModel parameters.

Accepts HF model folders (config.json + model.safetensors / pytorch_model.bin, sharded or not)
and lone weight files; `BertFor*` checkpoints ('bert.' prefix, task heads dropped) and old files
with LayerNorm `gamma`/`beta`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re

import numpy as np

from conversion import ConversionError, flax_file, key_table, torch_load
from conversion.key_table import Rule, transpose
from conversion.torch_checkpoint import read_state_dict, short_list

DESCRIPTION = 'HF BERT (folder or .bin/.pt/.pth/.safetensors) -> Flax BertModel weights'
WEIGHT_FILES = ('model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin',
                'pytorch_model.bin.index.json')
SIGNATURE_KEY = 'embeddings.word_embeddings.weight'
# Keys deliberately dropped: buffers rebuilt by the model, and pretraining/task heads.
IGNORED_KEYS = (r'embeddings\.position_ids', r'embeddings\.token_type_ids',
                r'cls\..*', r'classifier\..*', r'qa_outputs\..*')
SUPPORTED_MODEL_TYPES = ('bert',)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--src', required=True, help='HF model folder or weights file')
  parser.add_argument('--out', required=True, help='output .safetensors file')
  parser.add_argument('--config', help='HF config.json (default: the one in/next to --src)')
  parser.add_argument('--verify', action='store_true',
                      help='run transformers.BertModel and the Flax model and compare (fp32)')
  parser.add_argument('--tolerance', type=float, default=1e-4,
                      help='largest max-abs difference --verify accepts (default 1e-4)')


def run(args: argparse.Namespace) -> int:
  flax_file.check_out_path(args.out)
  state, path = read_state_dict(args.src, WEIGHT_FILES, torch_load.trust_requested(args))
  state = normalize_keys(state, path)
  config = resolve_config(args.src, args.config, state)
  flat = convert_state_dict(state, config, what=str(path))
  flax_file.write(args.out, flat, model='bert', config=config.to_dict(), source=str(path))
  print(f'wrote {args.out}: BERT {config.num_hidden_layers} layers, hidden {config.hidden_size}, '
        f'{config.num_attention_heads} heads, {len(flat)} tensors')
  if args.verify:
    from conversion import verify
    return verify.report(verify.bert_differences(args.out, state), args.tolerance)
  return 0


def normalize_keys(state: dict[str, np.ndarray], path) -> dict[str, np.ndarray]:
  """Brings keys to transformers' BertModel names: no 'bert.' prefix, LayerNorm weight/bias."""
  if any(k.startswith('bert.') for k in state):
    state = {k[len('bert.'):] if k.startswith('bert.') else k: v for k, v in state.items()}
  if SIGNATURE_KEY not in state:
    raise ConversionError(
        f'{path} is not a BERT checkpoint: it has no {SIGNATURE_KEY} (its keys begin '
        f'{short_list(sorted(state), 5)}); use the converter for its architecture.')
  renamed = {}
  for k, v in state.items():
    k = re.sub(r'LayerNorm\.gamma$', 'LayerNorm.weight', k)
    renamed[re.sub(r'LayerNorm\.beta$', 'LayerNorm.bias', k)] = v
  return renamed


def resolve_config(src: str, config_path: str | None, state: dict[str, np.ndarray]):
  """The HF config.json given, else the one in/next to --src, else one inferred from shapes."""
  from aahr_jax.models.bert import BertConfig
  if config_path is None:
    src_path = pathlib.Path(src)
    folder = src_path if src_path.is_dir() else src_path.parent
    if (folder / 'config.json').is_file():
      config_path = folder / 'config.json'
  if config_path is None:
    return infer_config(state)
  try:
    hf = json.loads(pathlib.Path(config_path).read_text())
  except (OSError, ValueError) as e:
    raise ConversionError(f'cannot read config {config_path}: {e}; pass a valid HF config.json '
                          'with --config.') from e
  model_type = hf.get('model_type', 'bert')
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ConversionError(f'{config_path} describes a {model_type!r} model, not BERT; this '
                          'converter handles model_type "bert" only.')
  if hf.get('position_embedding_type', 'absolute') != 'absolute':
    raise ConversionError(f'{config_path}: position_embedding_type '
                          f'{hf["position_embedding_type"]!r} is not supported (absolute only).')
  try:
    return BertConfig.from_dict(hf)
  except ValueError as e:
    raise ConversionError(f'{config_path}: {e}') from e


def infer_config(state: dict[str, np.ndarray]):
  """Sizes from tensor shapes; heads assume BERT's usual 64-wide heads (printed as a warning)."""
  from aahr_jax.models.bert import BertConfig
  vocab, hidden = state['embeddings.word_embeddings.weight'].shape
  layers = {int(m.group(1)) for k in state if (m := re.match(r'encoder\.layer\.(\d+)\.', k))}
  intermediate = state['encoder.layer.0.intermediate.dense.weight'].shape[0] if layers else 4 * hidden
  heads = max(hidden // 64, 1)
  print(f'warning: no config.json found; assuming {heads} attention heads of width '
        f'{hidden // heads}, GELU and LayerNorm eps 1e-12. Pass --config if that is wrong.')
  return BertConfig(
      vocab_size=vocab, hidden_size=hidden, num_hidden_layers=len(layers),
      num_attention_heads=heads, intermediate_size=intermediate,
      max_position_embeddings=state['embeddings.position_embeddings.weight'].shape[0],
      type_vocab_size=state['embeddings.token_type_embeddings.weight'].shape[0])


def key_table_for(config, with_pooler: bool) -> list[Rule]:
  """Every HF key of a BertModel with `config` and the Flax path it fills."""
  table = []

  def linear(src: str, dst: str):
    table.extend([Rule(f'{src}.weight', f'{dst}/kernel', transpose),
                  Rule(f'{src}.bias', f'{dst}/bias')])

  def layer_norm(src: str, dst: str):
    table.extend([Rule(f'{src}.weight', f'{dst}/scale'), Rule(f'{src}.bias', f'{dst}/bias')])

  for name in ('word_embeddings', 'position_embeddings', 'token_type_embeddings'):
    table.append(Rule(f'embeddings.{name}.weight', f'embeddings/{name}/embedding'))
  layer_norm('embeddings.LayerNorm', 'embeddings/LayerNorm')
  for i in range(config.num_hidden_layers):
    src, dst = f'encoder.layer.{i}', f'encoder/layer/{i}'
    for proj in ('query', 'key', 'value'):
      linear(f'{src}.attention.self.{proj}', f'{dst}/attention/self/{proj}')
    linear(f'{src}.attention.output.dense', f'{dst}/attention/output/dense')
    layer_norm(f'{src}.attention.output.LayerNorm', f'{dst}/attention/output/LayerNorm')
    linear(f'{src}.intermediate.dense', f'{dst}/intermediate/dense')
    linear(f'{src}.output.dense', f'{dst}/output/dense')
    layer_norm(f'{src}.output.LayerNorm', f'{dst}/output/LayerNorm')
  if with_pooler:
    linear('pooler.dense', 'pooler/dense')
  return table


def convert_state_dict(state: dict[str, np.ndarray], config, what: str = 'checkpoint'):
  """Normalised HF state dict -> flat {'a/b/kernel': array} for BertModel(config)."""
  from flax import traverse_util
  from aahr_jax.models import bert
  with_pooler = 'pooler.dense.weight' in state
  vocab, hidden = state[SIGNATURE_KEY].shape
  found = {'vocab_size': vocab, 'hidden_size': hidden,
           'num_hidden_layers': key_table.count_layers(state, r'encoder\.layer\.(\d+)\.')}
  key_table.check_dimensions(found, {k: getattr(config, k) for k in found}, what,
                             'pass the config.json the checkpoint was trained with (--config).')
  flat = key_table.apply_table(state, key_table_for(config, with_pooler), IGNORED_KEYS, what)
  module = bert.BertModel(config, add_pooling_layer=with_pooler)
  expected = {k: v.shape for k, v in
              traverse_util.flatten_dict(bert.init_shapes(module), sep='/').items()}
  key_table.check_shapes(flat, expected, what)
  return flat
