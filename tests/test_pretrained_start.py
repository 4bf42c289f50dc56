"""A run that starts from converted pretrained weights: the key (momentum) encoders start from
them too, as the original's deep copies made after `BertModel.from_pretrained` do, and every
config field of the run acts."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from aahr_jax import checkpoint
from aahr_jax import train
from aahr_jax import train_state
from configs import coco
from configs import demo
from configs import f30k
from conversion.__main__ import main as conversion_main
from input_pipeline.scan_files import DataError

import config_reads
import test_train

STEPS_PER_EPOCH = 15  # 48 images x 5 captions / batch 16


def tiny_config():
  """test_train.py's tiny run (its steps come from the session's compilation cache), with a
  checkpoint at every step and one skipped step (the skip guard reads its limit)."""
  c = test_train.tiny_config(1)
  c.checkpoint_every_steps = 1
  c.keep_checkpoints = STEPS_PER_EPOCH  # the step-1 checkpoint is kept
  c.debug.nan_steps = (5,)
  return c


def converted_bert(tmp_path, bert: dict) -> tuple[str, dict]:
  """A BERT saved in the Hugging Face layout (config.json + model.safetensors), converted by
  `python -m conversion bert`; returns the file and its weights as Flax paths."""
  torch.manual_seed(7)
  hf = transformers.BertModel(transformers.BertConfig(**bert, initializer_range=0.5)).eval()
  folder = tmp_path / 'hf_bert'
  hf.save_pretrained(folder)
  out = str(tmp_path / 'bert.safetensors')
  assert conversion_main(['bert', '--src', str(folder), '--out', out]) == 0
  from aahr_jax.models import bert as bert_lib  # pylint: disable=import-outside-toplevel
  _, params = bert_lib.load(out)
  return out, traverse_util.flatten_dict(params, sep='/')


def bert_leaves(tree: dict) -> dict:
  return traverse_util.flatten_dict(jax.device_get(tree['txt']['bert']), sep='/')


@pytest.fixture(scope='module')
def pretrained_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('pretrained')
  config = tiny_config()
  config.model.bert_init, loaded = converted_bert(tmp, config.model.bert)
  workdir = str(tmp / 'run')
  with config_reads.recording(config) as reads:
    train.train_and_evaluate(config, workdir)
  return config, workdir, loaded, reads


def test_benchmark_state_starts_query_and_key_encoders_from_the_file(tmp_path):
  """benchmarks/jax_step.py builds its state with the trainer's train_state functions."""
  from benchmarks import jax_step  # pylint: disable=import-outside-toplevel
  config = tiny_config()
  random_init = jax_step.create_state(config, train_state.sample_batch(config, 16))[3]
  config.model.bert_init, loaded = converted_bert(tmp_path, config.model.bert)
  state = jax_step.create_state(config, train_state.sample_batch(config, 16))[3]
  assert not np.allclose(bert_leaves(random_init.params)['pooler/dense/kernel'],
                         loaded['pooler/dense/kernel'])
  query, key = bert_leaves(state.params), bert_leaves(state.extra['momentum'])
  assert query.keys() == key.keys() == loaded.keys()
  for name in query:
    np.testing.assert_array_equal(query[name], loaded[name], err_msg=name)
    np.testing.assert_array_equal(key[name], loaded[name], err_msg=name)
  # The image tower has no pretrained weights: its key copy is the query's random init.
  for q, k in zip(jax.tree.leaves(state.params['img']),
                  jax.tree.leaves(state.extra['momentum']['img'])):
    np.testing.assert_array_equal(q, k)


def test_first_checkpoint_has_the_pretrained_key_encoders(pretrained_run):
  config, workdir, loaded, _ = pretrained_run
  mngr = checkpoint.manager(workdir, config.keep_checkpoints)
  assert 1 in mngr.all_steps()
  run = train.setup(config, workdir)
  state, meta = checkpoint.restore(mngr, 1, run['state'])
  assert meta['step'] == 1
  query, key = bert_leaves(state.params), bert_leaves(state.extra['momentum'])
  moved = 0
  for name, weights in loaded.items():
    if name.startswith('pooler/'):
      continue  # never updated (config.optim.frozen); the key copy equals it exactly
    # key(1) = m * key(0) + (1 - m) * query(0) with key(0) = query(0) = the loaded weights:
    # equal up to the rounding of the EMA (a random key(0) would be ~0.5 away).
    np.testing.assert_allclose(key[name], weights, rtol=1e-6, atol=1e-6, err_msg=name)
    moved += not np.array_equal(query[name], weights)  # the query took an optimizer step
  assert moved > len(loaded) // 2


def test_every_field_of_the_aahr_configs_acts(pretrained_run):
  config, _, _, reads = pretrained_run
  config_reads.assert_every_field_read(config, reads, model='aahr')
  # The published configs have the fields of the run's config, so the same reads cover them.
  demo_fields = config_reads.leaf_paths(demo.get_config())
  for published in (f30k.get_config(), f30k.get_config('quirks=corrected'), coco.get_config()):
    assert config_reads.leaf_paths(published) == demo_fields


def test_resume_does_not_reload_the_pretrained_file(pretrained_run, tmp_path):
  """A resumed run holds its weights: the bert_init file is not read again (it may be gone).
  Captions that max_len would cut are refused first."""
  config, workdir, _, _ = pretrained_run
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  config = config.copy_and_resolve_references()
  config.model.bert_init = str(tmp_path / 'gone.safetensors')
  short = config.copy_and_resolve_references()
  short.data.max_len = 12  # cuts some training captions: refused before anything is restored
  with pytest.raises(DataError, match='would be truncated'):
    train.train_and_evaluate(short, copy)
  results = train.train_and_evaluate(config, copy)  # finished: restores and evaluates only
  with open(os.path.join(workdir, 'eval', 'test.json'), encoding='utf-8') as f:
    assert results['all'] == json.load(f)['all']
