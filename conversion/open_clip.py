"""OpenCLIP ViT checkpoints (PyTorch) -> aahr_jax.models.clip.CLIP parameters.

The model size and activation come from an open_clip model config (`--model ViT-B-32`, or a path
to such a .json); the checkpoint must match it key for key and shape for shape. Accepted key
layouts: open_clip's CLIP (`visual.*`, `transformer.*`, ...), its CustomTextCLIP (`text.*`),
timm's ViT copy of the image tower (`patch_embed.*`, `blocks.*`, ...), DataParallel `module.`
prefixes and training checkpoints holding a `state_dict` entry.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import pathlib
import re

import numpy as np

from conversion import ConversionError, flax_file, key_table, torch_load
from conversion.key_table import Rule, conv_oihw_to_hwio, transpose
from conversion.torch_checkpoint import read_state_dict, short_list

DESCRIPTION = 'OpenCLIP ViT (.bin/.pt/.pth/.safetensors or HF folder) -> Flax CLIP weights'
WEIGHT_FILES = ('open_clip_model.safetensors', 'open_clip_pytorch_model.safetensors',
                'open_clip_pytorch_model.bin', 'open_clip_pytorch_model.pth', 'model.safetensors',
                'pytorch_model.bin')
# Non-weight entries of some checkpoints: rebuilt causal-mask buffers, OpenAI TorchScript scalars.
IGNORED_KEYS = (r'attn_mask', r'input_resolution', r'context_length', r'vocab_size')
TEXT_PREFIXES = ('token_embedding.', 'positional_embedding', 'transformer.', 'ln_final.',
                 'text_projection')

# timm's ViT names for the open_clip image tower (timm `_convert_openai_clip`, reversed).
TIMM_RENAMES = (
    (r'patch_embed\.proj\.weight', 'conv1.weight'),
    (r'cls_token', 'class_embedding'),
    (r'pos_embed', 'positional_embedding'),
    (r'norm_pre\.(weight|bias)', r'ln_pre.\1'),
    (r'blocks\.(\d+)\.norm1\.(weight|bias)', r'transformer.resblocks.\1.ln_1.\2'),
    (r'blocks\.(\d+)\.norm2\.(weight|bias)', r'transformer.resblocks.\1.ln_2.\2'),
    (r'blocks\.(\d+)\.attn\.qkv\.(weight|bias)', r'transformer.resblocks.\1.attn.in_proj_\2'),
    (r'blocks\.(\d+)\.attn\.proj\.(weight|bias)', r'transformer.resblocks.\1.attn.out_proj.\2'),
    (r'blocks\.(\d+)\.mlp\.fc1\.(weight|bias)', r'transformer.resblocks.\1.mlp.c_fc.\2'),
    (r'blocks\.(\d+)\.mlp\.fc2\.(weight|bias)', r'transformer.resblocks.\1.mlp.c_proj.\2'),
    (r'blocks\.(\d+)\.ls_?([12])\.gamma', r'transformer.resblocks.\1.ls_\2.gamma'),
    (r'norm\.(weight|bias)', r'ln_post.\1'),
    (r'head\.weight', 'proj'),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--model', required=True,
                      help='open_clip model config name (e.g. ViT-B-32) or path to its .json')
  parser.add_argument('--src', required=True, help='checkpoint file or folder')
  parser.add_argument('--out', required=True, help='output .safetensors file')
  parser.add_argument('--quick-gelu', action='store_true',
                      help='force QuickGELU (OpenAI / laion400m weights under a non -quickgelu name)')
  parser.add_argument('--verify', action='store_true',
                      help='run open_clip and the Flax model on the same inputs and compare (fp32)')
  parser.add_argument('--tolerance', type=float, default=1e-4,
                      help='largest max-abs difference --verify accepts (default 1e-4)')


def run(args: argparse.Namespace) -> int:
  flax_file.check_out_path(args.out)
  model_cfg = open_clip_model_config(args.model, args.quick_gelu)
  state, path = read_state_dict(args.src, WEIGHT_FILES, torch_load.trust_requested(args))
  state = normalize_keys(state, path)
  config = clip_config(model_cfg, args.model, has_vision=has_vision(state),
                       has_text=has_text(state))
  flat = convert_state_dict(state, config, what=str(path))
  flax_file.write(args.out, flat, model='open_clip', config=config.to_dict(), source=str(path))
  towers = ' + '.join(t for t, c in (('image', config.vision), ('text', config.text)) if c)
  print(f'wrote {args.out}: OpenCLIP {args.model} ({towers} tower, {config.act}), '
        f'{len(flat)} tensors')
  if args.verify:
    from conversion import verify
    return verify.report(verify.open_clip_differences(args.out, state, model_cfg), args.tolerance)
  return 0


# ----------------------------------------------------------------------------- configuration

def open_clip_model_config(model: str, force_quick_gelu: bool = False) -> dict:
  """open_clip's config dict for a model name or a .json path."""
  if model.endswith('.json'):
    try:
      cfg = json.loads(pathlib.Path(model).read_text())
    except (OSError, ValueError) as e:
      raise ConversionError(f'cannot read --model config {model}: {e}.') from e
  else:
    import open_clip
    cfg = open_clip.get_model_config(model)
    if cfg is None:
      known = [m for m in open_clip.list_models() if m.startswith('ViT')]
      close = difflib.get_close_matches(model, known, n=5, cutoff=0.4)
      raise ConversionError(f'unknown --model {model!r}: not an open_clip model config; '
                            f'closest names: {", ".join(close) or "none"} (see '
                            'open_clip.list_models()), or pass a path to a model-config .json.')
  if 'vision_cfg' not in cfg or 'embed_dim' not in cfg:
    raise ConversionError(f'--model {model} is not an open_clip CLIP config (needs embed_dim '
                          'and vision_cfg).')
  if force_quick_gelu:
    cfg['quick_gelu'] = True
  return cfg


def _pair(value) -> tuple:
  return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


def clip_config(cfg: dict, name: str, has_vision: bool = True, has_text: bool = True):
  """aahr_jax CLIPConfig for an open_clip config dict; rejects features the Flax CLIP lacks."""
  from aahr_jax.models.clip import CLIPConfig, TextConfig, VisionConfig

  def unsupported(feature: str):
    raise ConversionError(f'--model {name} uses {feature}, which the Flax CLIP does not '
                          'implement; only plain OpenCLIP ViT towers convert.')

  for key in ('multimodal_cfg',):
    if key in cfg:
      unsupported(f'{key} (CoCa)')
  v = cfg['vision_cfg'] if has_vision else None
  t = cfg.get('text_cfg') if has_text else None
  eps = set()
  for tower, tc in (('vision', v), ('text', t)):
    if tc is None:
      continue
    for flag in ('qk_norm', 'scaled_cosine_attn', 'scale_heads', 'scale_attn_inner',
                 'scale_attn', 'scale_fc', 'attentional_pool', 'timm_model_name',
                 'hf_model_name', 'embed_cls', 'act_kwargs'):
      if tc.get(flag):
        unsupported(f'{tower}_cfg.{flag}={tc[flag]!r}')
    if tc.get('block_type') not in (None, 'default'):
      unsupported(f'{tower}_cfg.block_type={tc["block_type"]!r}')
    norm_kwargs = dict(tc.get('norm_kwargs') or {})
    eps.add(norm_kwargs.pop('eps', 1e-5))
    if norm_kwargs:
      unsupported(f'{tower}_cfg.norm_kwargs={norm_kwargs}')
  if len(eps) > 1:
    unsupported('different LayerNorm eps in the two towers')

  vision = None
  if v is not None:
    if isinstance(v.get('layers', 12), (list, tuple)):
      unsupported('a ResNet image tower')
    if v.get('pool_type', 'tok') not in ('tok', 'avg'):
      unsupported(f'vision_cfg.pool_type={v["pool_type"]!r}')
    width = v.get('width', 768)
    vision = VisionConfig(
        image_size=_pair(v.get('image_size', 224)), patch_size=_pair(v.get('patch_size', 16)),
        width=width, layers=v.get('layers', 12), heads=width // v.get('head_width', 64),
        mlp_width=int(width * v.get('mlp_ratio', 4.0)),
        layer_scale=v.get('ls_init_value') is not None, ln_pre=not v.get('no_ln_pre', False),
        pool_type=v.get('pool_type', 'tok'), final_ln_after_pool=v.get('final_ln_after_pool', False))
  text = None
  if t is not None:
    if t.get('pool_type', 'argmax') not in ('argmax', 'eos', 'first', 'last'):
      unsupported(f'text_cfg.pool_type={t["pool_type"]!r}')
    width = t.get('width', 512)
    no_projection = t.get('proj_type', 'linear') == 'none' or not cfg['embed_dim']
    text = TextConfig(
        context_length=t.get('context_length', 77), vocab_size=t.get('vocab_size', 49408),
        width=width, heads=t.get('heads', 8), layers=t.get('layers', 12),
        mlp_width=int(width * t.get('mlp_ratio', 4.0)),
        layer_scale=t.get('ls_init_value') is not None,
        causal_mask=not t.get('no_causal_mask', False), pool_type=t.get('pool_type', 'argmax'),
        eos_id=t.get('eos_id', 2),
        projection='none' if no_projection else ('linear' if t.get('proj_bias') else 'matrix'))
  return CLIPConfig(embed_dim=cfg['embed_dim'], vision=vision, text=text,
                    act='quick_gelu' if cfg.get('quick_gelu') else 'gelu',
                    layer_norm_eps=eps.pop() if eps else 1e-5,
                    logit_bias=cfg.get('init_logit_bias') is not None)


# ----------------------------------------------------------------------------- key layouts

def has_vision(state) -> bool:
  return any(k.startswith('visual.') for k in state)


def has_text(state) -> bool:
  return any(k.startswith(TEXT_PREFIXES) for k in state)


def normalize_keys(state: dict[str, np.ndarray], path) -> dict[str, np.ndarray]:
  """Any accepted layout -> open_clip CLIP names (`visual.*`, text tower at the top level)."""
  if any(k.startswith('text.') for k in state):   # CustomTextCLIP keeps the text tower in .text
    state = {k[len('text.'):] if k.startswith('text.') else k: v for k, v in state.items()}
  if 'patch_embed.proj.weight' in state or 'visual.patch_embed.proj.weight' in state:
    state = _from_timm(state, path)
  if 'visual.layer1.0.conv1.weight' in state:
    raise ConversionError(f'{path} is a ResNet CLIP; only ViT image towers convert.')
  if 'visual.conv1.weight' not in state and 'token_embedding.weight' not in state:
    raise ConversionError(
        f'{path} is not an OpenCLIP ViT checkpoint: it has neither visual.conv1.weight nor '
        f'token_embedding.weight (its keys begin {short_list(sorted(state), 5)}); use the '
        'converter for its architecture.')
  for name in ('logit_scale', 'logit_bias'):
    if name in state:
      state[name] = state[name].reshape(())   # some checkpoints store shape (1,)
  return state


def _from_timm(state: dict[str, np.ndarray], path) -> dict[str, np.ndarray]:
  out = {}
  for key, value in state.items():
    prefixed = key.startswith('visual.')
    name = key[len('visual.'):] if prefixed else key
    for pattern, replacement in TIMM_RENAMES:
      if re.fullmatch(pattern, name):
        name = re.sub(pattern, replacement, name)
        if pattern == 'cls_token':
          value = value.reshape(-1)
        elif pattern == 'pos_embed':
          value = value.reshape(-1, value.shape[-1])
        elif pattern == r'head\.weight':
          value = value.T                      # timm Linear (out, in); open_clip proj (in, out)
        out['visual.' + name] = value
        break
    else:
      if name == 'head.bias':
        if np.any(value != 0):
          raise ConversionError(f'{path}: timm head.bias is non-zero, but OpenCLIP projections '
                                'have no bias; this is not a converted CLIP image tower.')
        continue
      out[key] = value                         # not a timm vision key: leave for the table
  return out


# ----------------------------------------------------------------------------- key table

def _in_proj(part: int, width: int, heads: int, a: np.ndarray) -> np.ndarray:
  """Slice q/k/v `part` out of torch's packed in_proj and shape it for Flax DenseGeneral."""
  a = a[part * width:(part + 1) * width]
  return a.T.reshape(width, heads, width // heads) if a.ndim == 2 else a.reshape(heads, -1)


def _out_proj(heads: int, a: np.ndarray) -> np.ndarray:
  return a.T.reshape(heads, -1, a.shape[0])


def _block_rules(src: str, dst: str, width: int, heads: int, layer_scale: bool) -> list[Rule]:
  rules = []
  for ln in ('ln_1', 'ln_2'):
    rules += [Rule(f'{src}.{ln}.weight', f'{dst}/{ln}/scale'), Rule(f'{src}.{ln}.bias', f'{dst}/{ln}/bias')]
  for part, proj in enumerate(('query', 'key', 'value')):
    rules += [Rule(f'{src}.attn.in_proj_weight', f'{dst}/attn/{proj}/kernel',
                   functools.partial(_in_proj, part, width, heads)),
              Rule(f'{src}.attn.in_proj_bias', f'{dst}/attn/{proj}/bias',
                   functools.partial(_in_proj, part, width, heads))]
  rules += [Rule(f'{src}.attn.out_proj.weight', f'{dst}/attn/out/kernel',
                 functools.partial(_out_proj, heads)),
            Rule(f'{src}.attn.out_proj.bias', f'{dst}/attn/out/bias')]
  for fc in ('c_fc', 'c_proj'):
    rules += [Rule(f'{src}.mlp.{fc}.weight', f'{dst}/mlp/{fc}/kernel', transpose),
              Rule(f'{src}.mlp.{fc}.bias', f'{dst}/mlp/{fc}/bias')]
  if layer_scale:
    rules += [Rule(f'{src}.ls_1.gamma', f'{dst}/ls_1/gamma'),
              Rule(f'{src}.ls_2.gamma', f'{dst}/ls_2/gamma')]
  return rules


def _layer_norm_rules(src: str, dst: str) -> list[Rule]:
  return [Rule(f'{src}.weight', f'{dst}/scale'), Rule(f'{src}.bias', f'{dst}/bias')]


def key_table_for(config) -> list[Rule]:
  """Every open_clip key of a CLIP with `config` and the Flax path it fills."""
  table = [Rule('logit_scale', 'logit_scale')]
  if config.logit_bias:
    table.append(Rule('logit_bias', 'logit_bias'))
  v = config.vision
  if v is not None:
    table += [Rule('visual.conv1.weight', 'visual/conv1/kernel', conv_oihw_to_hwio),
              Rule('visual.class_embedding', 'visual/class_embedding'),
              Rule('visual.positional_embedding', 'visual/positional_embedding'),
              Rule('visual.proj', 'visual/proj/kernel')]   # already (in, out): no transpose
    if v.ln_pre:
      table += _layer_norm_rules('visual.ln_pre', 'visual/ln_pre')
    table += _layer_norm_rules('visual.ln_post', 'visual/ln_post')
    for i in range(v.layers):
      table += _block_rules(f'visual.transformer.resblocks.{i}',
                            f'visual/transformer/resblocks.{i}', v.width, v.heads, v.layer_scale)
  t = config.text
  if t is not None:
    table += [Rule('token_embedding.weight', 'text/token_embedding/embedding'),
              Rule('positional_embedding', 'text/positional_embedding')]
    table += _layer_norm_rules('ln_final', 'text/ln_final')
    for i in range(t.layers):
      table += _block_rules(f'transformer.resblocks.{i}', f'text/transformer/resblocks.{i}',
                            t.width, t.heads, t.layer_scale)
    if t.projection == 'matrix':
      table.append(Rule('text_projection', 'text/text_projection/kernel'))   # (in, out) already
    elif t.projection == 'linear':
      table += [Rule('text_projection.weight', 'text/text_projection/kernel', transpose),
                Rule('text_projection.bias', 'text/text_projection/bias')]
  return table


def checkpoint_dimensions(state: dict[str, np.ndarray]) -> dict:
  found = {}
  if 'visual.conv1.weight' in state:
    width, _, *patch = state['visual.conv1.weight'].shape
    found.update({'vision width': width, 'patch size': tuple(patch),
                  'vision layers': key_table.count_layers(
                      state, r'visual\.transformer\.resblocks\.(\d+)\.')})
  if 'visual.positional_embedding' in state:
    found['vision positions'] = state['visual.positional_embedding'].shape[0]
  if 'visual.proj' in state:
    found['embed dim'] = state['visual.proj'].shape[-1]
  if 'token_embedding.weight' in state:
    found['vocab size'], found['text width'] = state['token_embedding.weight'].shape
    found['text layers'] = key_table.count_layers(state, r'transformer\.resblocks\.(\d+)\.')
  if 'positional_embedding' in state:
    found['context length'] = state['positional_embedding'].shape[0]
  return found


def config_dimensions(config) -> dict:
  expected = {'embed dim': config.embed_dim}
  if config.vision is not None:
    v = config.vision
    expected.update({'vision width': v.width, 'patch size': tuple(v.patch_size),
                     'vision layers': v.layers, 'vision positions': v.grid[0] * v.grid[1] + 1})
  if config.text is not None:
    t = config.text
    expected.update({'vocab size': t.vocab_size, 'text width': t.width, 'text layers': t.layers,
                     'context length': t.context_length})
  return expected


def convert_state_dict(state: dict[str, np.ndarray], config, what: str = 'checkpoint'):
  """Normalised open_clip state dict -> flat {'visual/conv1/kernel': array, ...}."""
  from flax import traverse_util
  from aahr_jax.models import clip
  ignored = IGNORED_KEYS
  if config.vision is None:
    ignored += (r'visual\..*',)
  if config.text is None:
    ignored += tuple(re.escape(p) + '.*' for p in TEXT_PREFIXES)
  if (config.vision is None or config.text is None) and 'logit_scale' not in state:
    # One-tower files (e.g. timm image towers) carry no contrastive scale: use CLIP's init.
    state = {**state, 'logit_scale': np.asarray(np.log(1 / 0.07), np.float32)}
  key_table.check_dimensions(checkpoint_dimensions(state), config_dimensions(config), what,
                             'pick the --model (name or .json) the checkpoint was trained with.')
  flat = key_table.apply_table(state, key_table_for(config), ignored, what)
  expected = {k: v.shape for k, v in
              traverse_util.flatten_dict(clip.init_shapes(clip.CLIP(config)), sep='/').items()}
  key_table.check_shapes(flat, expected, what)
  return flat
