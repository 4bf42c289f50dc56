"""AAHR encoders against the PyTorch reference (fp32, CPU): eval mode with non-trivial BN
statistics, train mode (dropout off) with BN batch statistics over padded regions, and
independence from the static padding widths."""

import dataclasses

import jax
import ml_collections
import numpy as np
import pytest

import torch_reference_aahr as ref
from aahr_jax.models import aahr
from conversion import aahr as aahr_conversion
from conversion import vse_checkpoint

OPT = {'nhead': 16, 'embed_size': ref.SMALL['embed_size'], 'residual_weight': 0.8,
       'dropout': 0.0}
TOL = 1e-5


@pytest.fixture(scope='module')
def pair(tmp_path_factory):
  """(torch image encoder, torch text encoder, Flax model, Flax variables) with equal weights."""
  img_enc, txt_enc = ref.small_aahr(seed=0)
  config_path = tmp_path_factory.mktemp('bert') / 'config.json'
  ref.small_bert_config().to_json_file(str(config_path))
  checkpoint = vse_checkpoint.from_state_dicts(img_enc.state_dict(), txt_enc.state_dict(), OPT)
  model_config, variables, _ = aahr_conversion.convert(checkpoint, str(config_path))
  model = aahr.build_model(ml_collections.ConfigDict(model_config))
  return img_enc, txt_enc, model, variables


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def _valid_prefix(x, lengths_max):
  return np.asarray(x)[:, :lengths_max]


def test_eval_parity_with_padding_and_bn_statistics(pair):
  img_enc, txt_enc, model, variables = pair
  batch = ref.padded_batch()
  want = ref.torch_aahr_outputs(img_enc, txt_enc, batch)
  got = model.apply(variables, batch, train=False)
  n, length = int(batch['region_len'].max()), int(batch['bert_len'].max())
  for name in ('img_emb', 'cap_emb', 'img_prefusion', 'cap_prefusion'):
    assert _max_diff(got[name], want[name]) <= TOL, name
  assert _max_diff(_valid_prefix(got['regions'], n), want['regions']) <= TOL
  assert _max_diff(_valid_prefix(got['words'], length), want['words']) <= TOL
  assert int(got['batch_max_regions']) == n and int(got['batch_max_len']) == length
  # embed_* return the same fused embeddings
  img = model.apply(variables, batch['regions'], batch['region_len'], batch['clip_image'],
                    method=model.embed_images)
  cap = model.apply(variables, batch['bert_ids'], batch['bert_len'], batch['clip_text'],
                    method=model.embed_captions)
  assert _max_diff(img, want['img_emb']) <= TOL and _max_diff(cap, want['cap_emb']) <= TOL


def test_train_mode_parity_bn_batch_statistics(pair):
  img_enc, txt_enc, model, variables = pair
  batch = ref.padded_batch(seed=1)
  img_train, txt_train = img_enc.train(), txt_enc.train()
  bn = img_enc.fc.mlp.bns[0]
  saved = {k: v.clone() for k, v in bn.state_dict().items()}
  try:
    want = ref.torch_aahr_outputs(img_train, txt_train, batch)
    want_mean, want_var = bn.running_mean.numpy().copy(), bn.running_var.numpy().copy()
  finally:
    bn.load_state_dict(saved)
    img_enc.eval(), txt_enc.eval()
  got, updates = model.apply(variables, batch, train=True, mutable=['batch_stats'])
  for name in ('img_emb', 'cap_emb', 'img_prefusion', 'cap_prefusion'):
    assert _max_diff(got[name], want[name]) <= TOL, name
  stats = updates['batch_stats']['img']['fc']['mlp']['bns_0']
  assert _max_diff(stats['mean'], want_mean) <= TOL
  assert _max_diff(stats['var'], want_var) <= TOL


def _widen(batch, regions_width, tokens_width, garbage=True):
  """Pads to larger static widths; region slots beyond the batch maximum get garbage (ignored)."""
  out = dict(batch)
  b, n, f = batch['regions'].shape
  extra = np.full((b, regions_width - n, f), 7.0 if garbage else 0.0, np.float32)
  out['regions'] = np.concatenate([batch['regions'], extra], axis=1)
  out['bert_ids'] = np.pad(batch['bert_ids'], ((0, 0), (0, tokens_width - batch['bert_ids'].shape[1])))
  return out


@pytest.mark.parametrize('train', [False, True])
def test_static_width_invariance(pair, train):
  _, _, model, variables = pair
  batch = ref.padded_batch(seed=2)
  wide = _widen(batch, 36, 30)
  run = lambda b: model.apply(variables, b, train=train, mutable=['batch_stats'])
  (narrow_out, narrow_stats), (wide_out, wide_stats) = run(batch), run(wide)
  for name in ('img_emb', 'cap_emb', 'img_prefusion', 'cap_prefusion'):
    assert _max_diff(narrow_out[name], wide_out[name]) <= 1e-6, name
  assert jax.tree.all(jax.tree.map(lambda a, b: _max_diff(a, b) <= 1e-6, narrow_stats,
                                   wide_stats))


def test_invalid_rows_do_not_change_valid_ones(pair):
  """Padding rows of a global batch (valid=False) are excluded from the batch maxima and BN."""
  _, _, model, variables = pair
  batch = ref.padded_batch(seed=3)
  extended = {k: np.concatenate([v, v[:1]]) for k, v in batch.items()}
  extended['region_len'][-1] = 8   # longer than every valid row
  extended['bert_len'][-1] = 14
  extended['bert_ids'][-1] = 5
  extended['regions'][-1] = 3.0
  extended['valid'] = np.arange(6) < 5
  run = lambda b: model.apply(variables, b, train=True, mutable=['batch_stats'])
  (base, base_stats), (ext, ext_stats) = run(batch), run(extended)
  for name in ('img_emb', 'cap_emb'):
    assert _max_diff(base[name], np.asarray(ext[name])[:5]) <= 1e-6, name
  assert int(ext['batch_max_regions']) == int(batch['region_len'].max())
  assert jax.tree.all(jax.tree.map(lambda a, b: _max_diff(a, b) <= 1e-6, base_stats, ext_stats))


def test_faithful_captions_depend_on_batch_corrected_do_not(pair):
  """Q1/Q20: GGLP attends to pad tokens below the batch maximum; gglp_mask_padding stops it."""
  _, _, model, variables = pair
  batch = ref.padded_batch(seed=4)
  short = int(np.argmin(batch['bert_len']))
  args = lambda i: (batch['bert_ids'][i], batch['bert_len'][i], batch['clip_text'][i])
  for corrected in (False, True):
    settings = dataclasses.replace(model.settings, gglp_mask_padding=corrected)
    m = aahr.AAHR(model.embed_size, model.bert, settings)
    together = m.apply(variables, *args(slice(None)), method=m.embed_captions)[short]
    alone = m.apply(variables, *args(slice(short, short + 1)), method=m.embed_captions)[0]
    diff = _max_diff(together, alone)
    assert (diff <= 1e-6) if corrected else (diff > 1e-4), (corrected, diff)


def test_build_model_dispatch_and_error():
  config = ml_collections.ConfigDict({'name': 'aahr', 'embed_size': 32, 'num_heads': 4,
                                      'bert': dict(ref.SMALL_BERT)})
  model = aahr.build_model(config)
  assert isinstance(model, aahr.AAHR) and model.settings.num_heads == 4
  config.name = 'nope'
  with pytest.raises(ValueError, match="'nope'"):
    aahr.build_model(config)


def test_published_configs_build_aahr():
  from configs import coco, f30k
  f, c = f30k.get_config(), coco.get_config()
  assert (f.batch_size, f.num_epochs, f.loss.nmb_prototypes, f.relation.mask_weight) == \
      (128, 40, 384, 1.0)
  assert (c.batch_size, c.num_epochs, c.loss.nmb_prototypes, c.relation.mask_weight) == \
      (256, 40, 768, 1.5)
  assert f.optim.lr_schedules == (15, 25) and f.moco.queue_length == 2048
  model = aahr.build_model(f.model)
  assert isinstance(model, aahr.AAHR) and not model.settings.gglp_mask_padding
  corrected = aahr.build_model(f30k.get_config('quirks=corrected').model)
  assert corrected.settings.gglp_mask_padding and corrected.settings.bn_mask_padding
