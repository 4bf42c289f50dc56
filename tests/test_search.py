"""Search over a tiny trained demo workdir: the index, free-text queries, the CLI, and checkpoint
ensembles through --mode eval."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from aahr_jax import checkpoint
from aahr_jax import eval_modes
from aahr_jax import inference
from aahr_jax import metrics
from aahr_jax import results_file
from aahr_jax import search_index
from aahr_jax import train
from configs import demo
from configs import gpo_coco
from configs import gpo_f30k
from input_pipeline import datasets

import config_reads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_IMAGES = 20
# Measured on this configuration (seeded, 2-core CPU, ~50 s of training): the evaluation's t2i
# R@5 is 85.0, so the ground-truth image is in the top 5 for 0.85 of the 100 test captions
# (chance: 5/20 = 0.25). Eight epochs selected a checkpoint of the first four and printed the
# same table; two epochs give 75.0.
MIN_TOP5_HIT_RATE = 0.70


def search_config():
  c = demo.get_config('model=gpo,epochs=4,train_images=800,batch_size=32,embed_size=64,'
                      'bert_width=64')
  c.data.synthetic.dev = 20
  c.data.synthetic.test = TEST_IMAGES
  c.data.region_dim = 32
  c.checkpoint_every_steps = 150
  c.log_every_steps = 50
  c.eval.batch_size = 64
  return c


@pytest.fixture(scope='module')
def recorded_training(tmp_path_factory):
  """The trained workdir, its results, and the config fields the run read."""
  workdir = str(tmp_path_factory.mktemp('search') / 'run')
  config = search_config()
  with config_reads.recording(config) as reads:
    results = train.train_and_evaluate(config, workdir)
  return workdir, results, config, reads


@pytest.fixture(scope='module')
def trained(recorded_training):
  return recorded_training[:2]


def test_every_field_of_the_vse_infinity_configs_acts(recorded_training):
  _, _, config, reads = recorded_training
  config_reads.assert_every_field_read(config, reads, model='vse_infinity')
  # The published GPO configs have the run's fields, so the same reads cover them.
  fields = config_reads.leaf_paths(config)
  for published in (gpo_f30k.get_config(), gpo_coco.get_config()):
    assert config_reads.leaf_paths(published) == fields


def test_search_finds_the_ground_truth_image(trained):
  workdir, results = trained
  retriever = inference.Retriever.from_checkpoint(workdir)
  config = inference.load_workdir_config(workdir)
  images, meta = search_index.open_index(retriever, config, workdir, 'test')
  assert images.shape == (TEST_IMAGES, 64) and images.dtype == np.float32
  assert meta['num_images'] == TEST_IMAGES and len(meta['image_ids']) == TEST_IMAGES
  assert meta['normalized'] is True  # VSE-infinity embeddings are unit length
  assert meta['image_files'][0].endswith('.jpg')
  split = datasets.open_split(datasets.build(config, workdir), 'test')
  captions = [split.image(c // 5)['captions'][c % 5] for c in range(split.num_captions)]
  captions = [c.decode('utf-8') if isinstance(c, bytes) else c for c in captions]
  top, _ = search_index.top_k(images, retriever.embed_texts(captions), 5)
  hit_rate = float(np.mean([c // 5 in top[c] for c in range(len(captions))]))
  print(f'top-5 hit rate {hit_rate:.3f}')
  assert hit_rate >= MIN_TOP5_HIT_RATE
  # The search ranks images as the evaluation does: the same fraction as t2i R@5.
  assert hit_rate * 100 == pytest.approx(results['all']['t2i_r5'], abs=1.0)


def test_search_cli_and_index_reuse(trained):
  workdir, _ = trained
  env = dict(os.environ, HF_HUB_OFFLINE='1', JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, 'main.py', '--mode', 'search', '--workdir', workdir,
                        '--query', 'a red circle left of a blue square', '--top_k', '3'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                       check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  hits = [line for line in out.stdout.splitlines() if line.strip()[:2] in ('1.', '2.', '3.')]
  assert len(hits) == 3 and 'score' in hits[0]
  assert 'Building the search index' not in out.stdout  # built once, by the test above
  missing = subprocess.run([sys.executable, 'main.py', '--mode', 'search', '--workdir', workdir],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                           check=False)
  assert missing.returncode == 2 and 'error: --mode search needs --query' in missing.stderr


def test_ensemble_of_a_checkpoint_with_itself_reproduces_it(trained):
  workdir, results = trained
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())
  last = str(steps[-1])
  del results  # those are of the model selected on dev, which need not be the last step
  exported = search_config()
  exported.eval.save_sims = True
  single = eval_modes.run_eval(exported, workdir, [last], [])
  sims_last = results_file.read(os.path.join(workdir, 'results_synthetic.npy'))
  ensemble = eval_modes.run_eval(search_config(), workdir, [last, last], [])
  assert ensemble['all'] == single['all']  # every metric, exactly
  saved = json.loads(open(os.path.join(workdir, 'eval', 'test_ensemble.json'),
                          encoding='utf-8').read())
  assert saved['ensemble'] == [f'{workdir} step {last}'] * 2
  own = json.loads(open(os.path.join(workdir, 'eval', 'test.json'), encoding='utf-8').read())
  assert own['checkpoint'].endswith(last) and 'ensemble' not in own  # not overwritten
  # A workdir as a member means its selected (best) checkpoint, as `--mode eval` does.
  best = json.loads(open(os.path.join(workdir, 'best.json'), encoding='utf-8').read())
  by_workdir = eval_modes.run_eval(search_config(), workdir, [workdir, str(best['step'])], [])
  alone = eval_modes.run_eval(search_config(), workdir, [str(best['step'])], [])
  assert by_workdir['all'] == alone['all']
  # Two different members: the metrics of the mean of their exported similarity matrices, as
  # the originals' eval_ensemble computes them.
  eval_modes.run_eval(exported, workdir, [str(steps[0])], [])
  sims_first = results_file.read(os.path.join(workdir, 'results_synthetic.npy'))
  assert not np.array_equal(sims_first, sims_last)
  two = eval_modes.run_eval(search_config(), workdir, [str(steps[0]), last], [])
  assert two['all'] == metrics.recall_metrics((sims_first + sims_last) / 2)


def test_encode_texts_exports_caption_embeddings(trained, tmp_path):
  workdir, _ = trained
  texts = ['a red circle left of a blue square', 'Zwei große Kreise – grün', 'a small triangle']
  texts_path = tmp_path / 'texts.txt'
  texts_path.write_text('\n'.join(texts) + '\n', encoding='utf-8')
  out = tmp_path / 'out' / 'texts.npy'
  got = eval_modes.run_encode_texts(workdir, str(texts_path), str(out), batch_size=2)
  stored = np.load(out)
  np.testing.assert_array_equal(stored, got)
  retriever = inference.Retriever.from_checkpoint(workdir)
  np.testing.assert_allclose(stored, retriever.embed_texts(texts), rtol=1e-6, atol=1e-6)
  meta = json.loads((tmp_path / 'out' / 'texts.json').read_text())
  assert meta['num_texts'] == 3 and meta['shape'] == [3, 64] and meta['normalized'] is True
  assert meta['checkpoint'] == retriever.source and meta['texts_file'] == str(texts_path)


def test_normalisation_state_reports_the_norm_range():
  state = search_index.normalisation_state(np.array([[0.3, 0.4], [0.0, 2.0]]))
  assert state['normalized'] is False
  assert state['norm_min'] == pytest.approx(0.5) and state['norm_max'] == pytest.approx(2.0)
  unit = search_index.normalisation_state(np.array([[0.6, 0.8], [1.0, 0.0]]))
  assert unit['normalized'] is True and unit['norm_min'] == pytest.approx(1.0)
  assert search_index.normalisation_state(np.zeros((0, 4)))['norm_min'] is None


@pytest.mark.parametrize('content, message', [
    (b'a red circle\n\na blue square\n', 'line 2 is blank'),
    (b'a red circle\n\xff\xfe square\n', 'line 2 is not UTF-8 text'),
    (b'', 'holds no text'),
])
def test_encode_texts_refuses_bad_text_files(tmp_path, content, message):
  path = tmp_path / 'texts.txt'
  path.write_bytes(content)
  with pytest.raises(ValueError, match=message):
    eval_modes.read_texts(str(path))


def test_bad_checkpoint_names_and_top_k(trained):
  workdir, _ = trained
  mngr = checkpoint.manager(workdir)
  with pytest.raises(ValueError, match='--checkpoint .abc.: expected a step number'):
    checkpoint.resolve_step(mngr, 'abc')
  with pytest.raises(FileNotFoundError, match='no checkpoint for step 7 in .*; available steps'):
    checkpoint.resolve_step(mngr, '7')
  with pytest.raises(ValueError, match='--top_k 0: expected at least 1'):
    eval_modes.run_search(workdir, 'a red circle', 0)


def test_encode_texts_needs_its_flags(tmp_path):
  with pytest.raises(ValueError, match='needs --texts FILE'):
    eval_modes.run_encode_texts(str(tmp_path), None, str(tmp_path / 'e.npy'))
  with pytest.raises(FileNotFoundError, match='--texts .*: no such file'):
    eval_modes.run_encode_texts(str(tmp_path), str(tmp_path / 'none.txt'), str(tmp_path / 'e.npy'))
  with pytest.raises(ValueError, match='expected a path ending in .npy'):
    eval_modes.run_encode_texts(str(tmp_path), str(tmp_path / 't.txt'), str(tmp_path / 'e.csv'))


def test_encode_texts_cli_errors(tmp_path):
  env = dict(os.environ, HF_HUB_OFFLINE='1', JAX_PLATFORMS='cpu')
  path = tmp_path / 'texts.txt'
  path.write_bytes(b'one\n   \nthree\n')
  out = subprocess.run([sys.executable, 'main.py', '--mode', 'encode_texts', '--workdir',
                        str(tmp_path), '--texts', str(path), '--out', str(tmp_path / 'e.npy')],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                       check=False)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip() == f'error: {path}: line 2 is blank; write one text per line'
  assert not (tmp_path / 'e.npy').exists()
