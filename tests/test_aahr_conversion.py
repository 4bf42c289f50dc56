"""Released-checkpoint import: PyTorch-reference checkpoints saved in the original layout
({'model': [img_sd, txt_sd], 'opt': Namespace, ...}), converted with `python -m conversion
aahr|vse_infty`, give the reference's embeddings through `Retriever`; bad files fail clearly."""

import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import torch_reference_aahr as ref
from aahr_jax import inference
from conversion import ConversionError
from conversion import aahr as aahr_conversion
from conversion import vse_infty as vse_conversion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPT = {'nhead': 16, 'embed_size': ref.SMALL['embed_size'], 'residual_weight': 0.8,
       'dropout': 0.1, 'dataset': 'f30k', 'lr_schedules': [15, 25], 'no_imgnorm': False,
       'no_txtnorm': False}
TOL = 1e-5


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """Reference encoders and their checkpoints in the original layout, plus a BERT config."""
  tmp = tmp_path_factory.mktemp('ckpt')
  bert_config = tmp / 'bert_config.json'
  ref.small_bert_config().to_json_file(str(bert_config))
  aahr_img, aahr_txt = ref.small_aahr(seed=5, dropout=0.1)
  ref.save_original_checkpoint(tmp / 'aahr.pth', aahr_img, aahr_txt, OPT)
  ref.save_original_checkpoint(tmp / 'aahr_dp.pth', aahr_img, aahr_txt, OPT, prefix='module.',
                               position_ids=True)
  gpo_img, gpo_txt = ref.small_gpo(seed=6)
  ref.save_original_checkpoint(tmp / 'gpo.pth', gpo_img, gpo_txt,
                               {'precomp_enc_type': 'basic', 'embed_size': 64}, prefix='module.')
  return {'tmp': tmp, 'bert_config': str(bert_config), 'aahr': (aahr_img, aahr_txt),
          'gpo': (gpo_img, gpo_txt)}


def _convert(subcommand, src, out, bert_config):
  module = {'aahr': aahr_conversion, 'vse_infty': vse_conversion}[subcommand]
  return module.run(argparse.Namespace(src=str(src), out=str(out), bert_config=bert_config))


def _check_aahr_retriever(retriever, img_enc, txt_enc):
  batch = ref.padded_batch(seed=11)
  want = ref.torch_aahr_outputs(img_enc, txt_enc, batch)
  img = retriever.embed_images(batch['regions'], batch['region_len'], batch['clip_image'])
  cap = retriever.embed_captions(batch['bert_ids'], batch['bert_len'], batch['clip_text'])
  assert img.shape == cap.shape == (5, ref.SMALL['embed_size'])
  assert np.abs(img - want['img_emb']).max() <= TOL
  assert np.abs(cap - want['cap_emb']).max() <= TOL


def test_cli_aahr_round_trip(files):
  out = files['tmp'] / 'aahr_cli'
  result = subprocess.run(
      [sys.executable, '-m', 'conversion', 'aahr', '--src', str(files['tmp'] / 'aahr.pth'),
       '--out', str(out), '--bert_config', files['bert_config']],
      cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'),
      check=False)
  assert result.returncode == 0, result.stderr
  _check_aahr_retriever(inference.Retriever.from_checkpoint(out), *files['aahr'])


def test_api_aahr_round_trip_with_dataparallel_prefix_and_position_ids(files):
  out = files['tmp'] / 'aahr_dp_out'
  assert _convert('aahr', files['tmp'] / 'aahr_dp.pth', out, files['bert_config']) == 0
  retriever = inference.Retriever.from_checkpoint(out)
  assert retriever.config.num_heads == 16 and retriever.config.dropout == 0.1
  _check_aahr_retriever(retriever, *files['aahr'])


def test_vse_infty_round_trip(files):
  out = files['tmp'] / 'gpo_out'
  assert _convert('vse_infty', files['tmp'] / 'gpo.pth', out, files['bert_config']) == 0
  retriever = inference.Retriever.from_checkpoint(out)
  img_enc, txt_enc = files['gpo']
  batch = ref.padded_batch(seed=12)
  n, length = int(batch['region_len'].max()), int(batch['bert_len'].max())
  t = lambda a: torch.from_numpy(np.asarray(a))
  with torch.no_grad():
    want_img = img_enc(t(batch['regions'][:, :n]), t(batch['region_len']).long()).numpy()
    want_cap = txt_enc(t(batch['bert_ids'][:, :length]).long(),
                       t(batch['bert_len']).long()).numpy()
  img = retriever.embed_images(batch['regions'], batch['region_len'])
  cap = retriever.embed_captions(batch['bert_ids'], batch['bert_len'])
  assert np.abs(img - want_img).max() <= TOL
  assert np.abs(cap - want_cap).max() <= TOL


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------

def _edited_checkpoint(files, name, edit, source='aahr.pth'):
  """A copy of a saved checkpoint with edit(image_sd, text_sd) applied."""
  checkpoint = torch.load(files['tmp'] / source, weights_only=False)
  edit(*checkpoint['model'])
  path = files['tmp'] / name
  torch.save(checkpoint, path)
  return path


def test_other_method_is_named(files):
  with pytest.raises(ConversionError, match='VSE-infinity.*conversion vse_infty'):
    _convert('aahr', files['tmp'] / 'gpo.pth', files['tmp'] / 'x', files['bert_config'])
  with pytest.raises(ConversionError, match='AAHR.*conversion aahr'):
    _convert('vse_infty', files['tmp'] / 'aahr.pth', files['tmp'] / 'x', files['bert_config'])


def test_non_base_bert_without_config_names_keys(files):
  with pytest.raises(ConversionError,
                     match=r'bert\.embeddings\.word_embeddings\.weight \[60, 32\].*--bert_config'):
    _convert('aahr', files['tmp'] / 'aahr.pth', files['tmp'] / 'x', None)


def test_missing_unexpected_and_misshaped_keys_are_listed(files):
  def drop(img, txt):
    del img['gated_fusion.fc_gate.bias']
  with pytest.raises(ConversionError, match=r'gated_fusion\.fc_gate\.bias'):
    _convert('aahr', _edited_checkpoint(files, 'drop.pth', drop), files['tmp'] / 'x',
             files['bert_config'])

  def add(img, txt):
    txt['extra_head.weight'] = torch.zeros(3)
  with pytest.raises(ConversionError, match=r'extra_head\.weight'):
    _convert('aahr', _edited_checkpoint(files, 'add.pth', add), files['tmp'] / 'x',
             files['bert_config'])

  def reshape(img, txt):
    txt['fc_clip.mlp.layers.0.weight'] = torch.zeros(64, 20)
  with pytest.raises(ConversionError, match=r'txt/fc_clip/mlp/layers_0/kernel'):
    _convert('aahr', _edited_checkpoint(files, 'shape.pth', reshape), files['tmp'] / 'x',
             files['bert_config'])


def test_not_a_training_checkpoint(files):
  path = files['tmp'] / 'plain.pth'
  torch.save(files['aahr'][0].state_dict(), path)
  with pytest.raises(ConversionError, match='not an original training checkpoint'):
    _convert('aahr', path, files['tmp'] / 'x', files['bert_config'])


def test_retriever_input_errors(files):
  out = files['tmp'] / 'aahr_cli'
  if not (out / inference.MODEL_JSON).exists():
    _convert('aahr', files['tmp'] / 'aahr.pth', out, files['bert_config'])
  retriever = inference.Retriever.from_checkpoint(out)
  batch = ref.padded_batch()
  with pytest.raises(ValueError, match='needs clip_image'):
    retriever.embed_images(batch['regions'], batch['region_len'])
  with pytest.raises(ValueError, match='regions must be'):
    retriever.embed_images(batch['regions'][:, :, :5], batch['region_len'], batch['clip_image'])
  with pytest.raises(ValueError, match='lengths must lie in'):
    retriever.embed_captions(batch['bert_ids'], batch['bert_len'] + 10, batch['clip_text'])
  with pytest.raises(ValueError, match='neither a converted checkpoint'):
    inference.Retriever.from_checkpoint(files['tmp'])
