"""`python -m conversion`: accepted checkpoint layouts, --verify, and one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from aahr_jax.models import bert, clip
from conversion.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_BERT = dict(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=128, max_position_embeddings=40)   # heads of 32: not guessable
SMALL_CLIP = {'embed_dim': 24,
              'vision_cfg': {'image_size': 32, 'patch_size': 8, 'width': 64, 'layers': 2,
                             'head_width': 16},
              'text_cfg': {'context_length': 12, 'vocab_size': 99, 'width': 32, 'heads': 4,
                           'layers': 2}}


@pytest.fixture(scope='module')
def bert_folder(tmp_path_factory):
  """An HF folder (config.json + model.safetensors) of a small random BertModel."""
  torch.manual_seed(0)
  folder = tmp_path_factory.mktemp('bert')
  transformers.BertModel(transformers.BertConfig(**SMALL_BERT)).save_pretrained(folder)
  return folder


@pytest.fixture(scope='module')
def clip_files(tmp_path_factory):
  """(open_clip state dict .bin, model-config .json) of a small random CLIP."""
  import open_clip
  torch.manual_seed(0)
  folder = tmp_path_factory.mktemp('clip')
  model = open_clip.model.CLIP(**SMALL_CLIP)
  torch.save(model.state_dict(), folder / 'clip.bin')
  (folder / 'small.json').write_text(json.dumps(SMALL_CLIP))
  return folder / 'clip.bin', folder / 'small.json'


def flat_params(path, loader):
  return traverse_util.flatten_dict(loader(path)[1], sep='/')


def assert_same_params(a, b):
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def run_cli(capsys, *argv):
  capsys.readouterr()   # drop what the test itself printed before
  rc = main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return rc, out, err


def assert_one_line_error(rc, err, *fragments):
  assert rc != 0
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), err
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])


# ------------------------------------------------------------------------------- BERT

def test_bert_folder_converts_and_verifies(bert_folder, tmp_path, capsys):
  rc, out, _ = run_cli(capsys, 'bert', '--src', bert_folder, '--out', tmp_path / 'b.safetensors',
                       '--verify', '--tolerance', '1e-5')
  assert rc == 0, out
  assert 'verify OK' in out and 'pooler_output max abs diff' in out
  module, _ = bert.load(tmp_path / 'b.safetensors')
  assert module.config == bert.BertConfig(**SMALL_BERT)


def test_bert_accepts_prefixed_gamma_beta_wrapped_checkpoints(bert_folder, tmp_path, capsys):
  assert run_cli(capsys, 'bert', '--src', bert_folder, '--out', tmp_path / 'ref.safetensors')[0] == 0
  state = transformers.BertModel.from_pretrained(bert_folder).state_dict()
  old_style = {'bert.' + k.replace('LayerNorm.weight', 'LayerNorm.gamma')
               .replace('LayerNorm.bias', 'LayerNorm.beta'): v for k, v in state.items()}
  old_style['cls.predictions.bias'] = torch.zeros(SMALL_BERT['vocab_size'])   # pretraining head
  src = tmp_path / 'pytorch_model.pt'
  torch.save({'state_dict': old_style, 'epoch': 3}, src)
  (tmp_path / 'config.json').write_text((bert_folder / 'config.json').read_text())
  rc, out, err = run_cli(capsys, 'bert', '--src', src, '--out', tmp_path / 'old.safetensors')
  assert rc == 0, err
  assert_same_params(flat_params(tmp_path / 'old.safetensors', bert.load),
                     flat_params(tmp_path / 'ref.safetensors', bert.load))


def test_bert_without_config_needs_it_for_unusual_heads(bert_folder, tmp_path, capsys):
  src = tmp_path / 'weights.safetensors'
  src.write_bytes((bert_folder / 'model.safetensors').read_bytes())
  rc, out, _ = run_cli(capsys, 'bert', '--src', src, '--out', tmp_path / 'guess.safetensors')
  assert rc == 0 and 'warning: no config.json' in out   # guessed 1 head of 64: says so
  rc, out, _ = run_cli(capsys, 'bert', '--src', src, '--out', tmp_path / 'ok.safetensors',
                       '--config', bert_folder / 'config.json', '--verify')
  assert rc == 0 and 'verify OK' in out


def test_bert_missing_key_is_named(bert_folder, tmp_path, capsys):
  from safetensors.torch import load_file, save_file
  state = load_file(bert_folder / 'model.safetensors')
  del state['encoder.layer.1.output.dense.weight']
  folder = tmp_path / 'broken'
  folder.mkdir()
  save_file(state, folder / 'model.safetensors')
  (folder / 'config.json').write_text((bert_folder / 'config.json').read_text())
  rc, _, err = run_cli(capsys, 'bert', '--src', folder, '--out', tmp_path / 'x.safetensors')
  assert_one_line_error(rc, err, 'encoder.layer.1.output.dense.weight', 'lacks')


def test_bert_unused_key_is_named(bert_folder, tmp_path, capsys):
  state = transformers.BertModel.from_pretrained(bert_folder).state_dict()
  state['encoder.layer.1.adapter.weight'] = torch.zeros(64, 64)
  torch.save(state, tmp_path / 'extra.bin')
  rc, _, err = run_cli(capsys, 'bert', '--src', tmp_path / 'extra.bin', '--config',
                       bert_folder / 'config.json', '--out', tmp_path / 'x.safetensors')
  assert_one_line_error(rc, err, 'encoder.layer.1.adapter.weight', 'does not use')
  state['encoder.layer.2.output.dense.weight'] = torch.zeros(64, 128)   # a layer too many
  torch.save(state, tmp_path / 'deeper.bin')
  rc, _, err = run_cli(capsys, 'bert', '--src', tmp_path / 'deeper.bin', '--config',
                       bert_folder / 'config.json', '--out', tmp_path / 'x.safetensors')
  assert_one_line_error(rc, err, 'num_hidden_layers: checkpoint 3, config 2')


def test_bert_rejects_other_architectures(clip_files, bert_folder, tmp_path, capsys):
  rc, _, err = run_cli(capsys, 'bert', '--src', clip_files[0], '--out', tmp_path / 'x.safetensors')
  assert_one_line_error(rc, err, 'not a BERT checkpoint')
  config = json.loads((bert_folder / 'config.json').read_text())
  (tmp_path / 'config.json').write_text(json.dumps({**config, 'model_type': 'roberta'}))
  (tmp_path / 'model.safetensors').write_bytes((bert_folder / 'model.safetensors').read_bytes())
  rc, _, err = run_cli(capsys, 'bert', '--src', tmp_path, '--out', tmp_path / 'x.safetensors')
  assert_one_line_error(rc, err, "'roberta'")


@pytest.mark.parametrize('suffix', ['.bin', '.safetensors'])
def test_truncated_files_fail_clearly(bert_folder, tmp_path, capsys, suffix):
  src = bert_folder / 'model.safetensors'
  if suffix == '.bin':
    torch.save(transformers.BertModel.from_pretrained(bert_folder).state_dict(), tmp_path / 'f.bin')
    src = tmp_path / 'f.bin'
  data = src.read_bytes()
  truncated = tmp_path / f'truncated{suffix}'
  truncated.write_bytes(data[:len(data) // 2])
  rc, _, err = run_cli(capsys, 'bert', '--src', truncated, '--out', tmp_path / 'x.safetensors')
  assert_one_line_error(rc, err, 'truncated', str(truncated))


# ------------------------------------------------------------------------------- OpenCLIP

def test_open_clip_converts_and_verifies(clip_files, tmp_path, capsys):
  src, model_json = clip_files
  rc, out, _ = run_cli(capsys, 'open_clip', '--model', model_json, '--src', src,
                       '--out', tmp_path / 'c.safetensors', '--verify', '--tolerance', '1e-5')
  assert rc == 0, out
  assert 'image features max abs diff' in out and 'text features max abs diff' in out
  module, _ = clip.load(tmp_path / 'c.safetensors')
  assert module.config.vision.width == 64 and module.config.act == 'gelu'


def test_open_clip_accepts_wrapped_custom_text_and_half_checkpoints(clip_files, tmp_path, capsys):
  src, model_json = clip_files
  assert run_cli(capsys, 'open_clip', '--model', model_json, '--src', src,
                 '--out', tmp_path / 'ref.safetensors')[0] == 0
  state = torch.load(src)
  text_keys = ('token_embedding', 'positional_embedding', 'transformer', 'ln_final',
               'text_projection')
  custom = {('module.text.' if k.startswith(text_keys) else 'module.') + k: v.half()
            for k, v in state.items()}
  torch.save({'epoch': 1, 'state_dict': custom}, tmp_path / 'wrapped.pt')
  rc, _, err = run_cli(capsys, 'open_clip', '--model', model_json, '--src',
                       tmp_path / 'wrapped.pt', '--out', tmp_path / 'wrapped.safetensors')
  assert rc == 0, err
  ref = flat_params(tmp_path / 'ref.safetensors', clip.load)
  got = flat_params(tmp_path / 'wrapped.safetensors', clip.load)
  assert set(ref) == set(got)
  for k in ref:   # fp16 storage rounds the values
    np.testing.assert_allclose(got[k], ref[k], rtol=1e-2, atol=1e-3, err_msg=k)


@pytest.mark.parametrize('prefix', ['', 'visual.'])
def test_open_clip_accepts_timm_image_towers(clip_files, tmp_path, capsys, prefix):
  from timm.models.vision_transformer import _convert_openai_clip
  src, model_json = clip_files
  assert run_cli(capsys, 'open_clip', '--model', model_json, '--src', src,
                 '--out', tmp_path / 'ref.safetensors')[0] == 0
  timm_state = {prefix + k: v for k, v in _convert_openai_clip(torch.load(src), None).items()}
  torch.save(timm_state, tmp_path / 'timm.bin')
  rc, _, err = run_cli(capsys, 'open_clip', '--model', model_json, '--src', tmp_path / 'timm.bin',
                       '--out', tmp_path / 'timm.safetensors')
  assert rc == 0, err
  module, params = clip.load(tmp_path / 'timm.safetensors')
  assert module.config.text is None   # image tower only
  ref = flat_params(tmp_path / 'ref.safetensors', clip.load)
  for k, v in traverse_util.flatten_dict(params, sep='/').items():
    if k != 'logit_scale':
      np.testing.assert_array_equal(v, ref[k], err_msg=k)


def test_open_clip_errors(clip_files, bert_folder, tmp_path, capsys):
  src, model_json = clip_files
  out = tmp_path / 'x.safetensors'
  rc, _, err = run_cli(capsys, 'open_clip', '--model', 'ViT-B-33', '--src', src, '--out', out)
  assert_one_line_error(rc, err, "unknown --model 'ViT-B-33'", 'ViT-B-32')
  rc, _, err = run_cli(capsys, 'open_clip', '--model', 'ViT-B-32', '--src', src, '--out', out)
  assert_one_line_error(rc, err, 'vision width: checkpoint 64, config 768')   # another size
  rc, _, err = run_cli(capsys, 'open_clip', '--model', model_json, '--src',
                       bert_folder / 'model.safetensors', '--out', out)
  assert_one_line_error(rc, err, 'not an OpenCLIP ViT checkpoint')
  state = torch.load(src)
  del state['visual.transformer.resblocks.1.attn.in_proj_weight']
  torch.save(state, tmp_path / 'missing.bin')
  rc, _, err = run_cli(capsys, 'open_clip', '--model', model_json, '--src',
                       tmp_path / 'missing.bin', '--out', out)
  assert_one_line_error(rc, err, 'visual.transformer.resblocks.1.attn.in_proj_weight')


def test_cli_exit_status_and_single_line(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'conversion', 'open_clip', '--model', 'no-such-model',
       '--src', str(tmp_path / 'none.bin'), '--out', str(tmp_path / 'x.safetensors')],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().count('\n') == 0 and 'no-such-model' in result.stderr
