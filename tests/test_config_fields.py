"""Config fields that change what the code computes: the corrected quirks Q14 (queue entries of
the query's own image are not negatives) and Q19 (augmentation never draws special tokens), the
loss and augmentation settings, and the guards that refuse an evaluation protocol no paper
reports or a max_len that would cut training captions."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aahr_jax import losses
from aahr_jax import optim
from aahr_jax import sharding
from aahr_jax import train
from aahr_jax.models import aahr
from configs import demo
from input_pipeline import bert_tokenizer
from input_pipeline import caption_tokens
from input_pipeline import datasets
from input_pipeline import loader
from input_pipeline.scan_files import DataError

from test_aahr_step import B, random_batch, tiny_aahr_config


# ---------------------------------------------------------------------------------------------
# Q14: masking queue entries of the same image
# ---------------------------------------------------------------------------------------------

def test_masked_queue_entries_are_left_out_of_the_softmax():
  rng = np.random.default_rng(0)
  q_img, q_cap, k_img, k_cap = (jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
                                for _ in range(4))
  queue_img, queue_cap = (jnp.asarray(rng.normal(size=(8, 6)), jnp.float32) for _ in range(2))
  query_ids = jnp.asarray([4, 7, 9])
  queue_ids = jnp.asarray([7, -1, 4, 4, 5, 9])
  masked = losses.info_nce_loss(q_img, q_cap, k_img, k_cap, queue_img, queue_cap,
                                query_ids=query_ids, queue_ids=queue_ids)
  # The same loss, one query at a time, with the query's own image's columns deleted.
  expected = 0.0
  for b in range(3):
    keep = np.flatnonzero(np.asarray(queue_ids) != int(query_ids[b]))
    expected += losses.info_nce_loss(q_img[b:b + 1], q_cap[b:b + 1], k_img[b:b + 1],
                                     k_cap[b:b + 1], queue_img[:, keep], queue_cap[:, keep]) / 3
  np.testing.assert_allclose(masked, expected, rtol=1e-6)
  faithful = losses.info_nce_loss(q_img, q_cap, k_img, k_cap, queue_img, queue_cap)
  assert abs(float(faithful) - float(masked)) > 1e-3


def _steps(config, batches):
  model = aahr.build_model(config.model)
  shapes = jax.eval_shape(lambda: train.create_state_fn(model, optax.identity(), config, B)(
      jax.random.PRNGKey(0)).params)
  tx, schedule = optim.make_optimizer(config.optim, shapes, 10)
  state, _ = train.create_state(model, tx, config, sharding.create_mesh(config.mesh), B)
  step = jax.jit(train.make_train_step(model, tx, config, 10, schedule))
  history = []
  for batch in batches:
    state, metrics = step(state, batch)
    history.append((jax.device_get(state.extra), jax.device_get(metrics)))
  return history


@pytest.fixture(scope='module')
def faithful_and_corrected_steps():
  """Three steps of the faithful config and of one with Q14 corrected and another InfoNCE
  weight, on the same batches (every image id of the third batch is in the queue). The weight
  is 0 until the queue is full (step 3), so the two runs are identical before step 3."""
  batches = [random_batch(tiny_aahr_config(), seed) for seed in (0, 1, 0)]
  faithful = _steps(tiny_aahr_config(), batches)
  config = tiny_aahr_config()
  config.moco.mask_same_image = True
  config.loss.moco_weight = 0.25
  return batches, faithful, _steps(config, batches)


def test_corrected_q14_tracks_queued_image_ids_and_masks_them(faithful_and_corrected_steps):
  batches, faithful, corrected = faithful_and_corrected_steps
  assert 'queue_ids' not in faithful[0][0]  # the faithful state is the original's
  extra = corrected[1][0]
  np.testing.assert_array_equal(extra['queue_ids'],
                                np.concatenate([batches[0]['image_index'],
                                                batches[1]['image_index']]))
  assert int(extra['queue_ptr']) == 0
  # Step 3: same parameters and queued keys, so the InfoNCE differs only by the entries of the
  # queries' own images, which leave the softmax's denominator: a smaller loss.
  np.testing.assert_array_equal(faithful[1][0]['queue_img'], corrected[1][0]['queue_img'])
  assert float(corrected[2][1]['loss_moco']) < float(faithful[2][1]['loss_moco']) - 1e-3


def test_moco_weight_and_triplet_settings_act(faithful_and_corrected_steps):
  _, faithful, corrected = faithful_and_corrected_steps
  weights = [(float(f[1]['weight_moco']), float(c[1]['weight_moco']))
             for f, c in zip(faithful, corrected)]
  assert weights == [(0.0, 0.0), (0.0, 0.0), (1.0, 0.25)]  # on once the queue is full
  # Other DWS sampling weights give other draws (hence another loss) from the same embeddings.
  config = tiny_aahr_config()
  config.loss.triplet_dim = 64
  config.loss.triplet_distance_clamp = 0.8
  triplet = _steps(config, [random_batch(config, 0)])
  assert float(faithful[0][1]['loss_base']) != float(triplet[0][1]['loss_base'])
  assert float(faithful[0][1]['loss_swav']) == float(triplet[0][1]['loss_swav'])


def test_dws_weights_follow_dim_and_clamp():
  scores = jnp.asarray([[0.9, 0.2, -0.3, 0.6]], jnp.float32)
  positives = jnp.asarray([[True, False, False, False]])
  got = losses.dws_sampling_weights(scores, positives, cutoff=1.9, max_over='eligible', dim=16,
                                    distance_clamp=1.0)
  dist = np.maximum(np.sqrt(2 - 2 * np.asarray(scores[0, 1:], np.float64)), 1.0)
  log_w = (2 - 16) * np.log(dist) - (16 - 3) / 2 * np.log(1 - dist ** 2 / 4)
  w = np.exp(log_w - log_w.max())
  np.testing.assert_allclose(got[0, 1:], w / w.sum(), rtol=1e-5)
  assert float(got[0, 0]) == 0.0


# ---------------------------------------------------------------------------------------------
# Q19 and the augmentation settings
# ---------------------------------------------------------------------------------------------

def _tokens(vocab_size: int, captions: int, words: int) -> caption_tokens.CaptionTokens:
  """Captions of one-piece words 200, 201, ... over a small vocabulary (so that a uniform draw
  hits the special ids often)."""
  pieces = np.tile(np.arange(200, 200 + words, dtype=np.int32), captions)
  return caption_tokens.CaptionTokens(
      pieces=pieces, piece_word=np.tile(np.arange(words, dtype=np.int32), captions),
      piece_start=np.arange(captions + 1, dtype=np.int64) * words,
      num_words=np.full(captions, words, np.int32), vocab_size=vocab_size)


def _augmented_ids(augment, seed=0):
  tokens = _tokens(vocab_size=240, captions=200, words=10)
  ids, lengths, _ = caption_tokens.encode_batch(tokens, np.arange(200), 12,
                                                np.random.default_rng(seed), augment)
  inner = [ids[i, 1:lengths[i] - 1] for i in range(len(ids))]
  return np.concatenate(inner), lengths


def test_corrected_q19_never_draws_special_tokens():
  every_word_random = dict(select=1.0, mask=0.0, random=1.0, delete=0.0)
  faithful, _ = _augmented_ids(caption_tokens.WordAugment(**every_word_random))
  corrected, _ = _augmented_ids(caption_tokens.WordAugment(**every_word_random,
                                                           exclude_special=True))
  special = list(caption_tokens.SPECIAL_IDS)
  assert np.isin(faithful, special).sum() > 20  # 2,000 draws over 240 ids, 5 of them special
  assert not np.isin(corrected, special).any()
  # Still uniform over the other ids: every one of the 235 is drawn.
  assert len(np.unique(corrected)) == 240 - len(special)


def test_token_augmentation_shares_act():
  words = _tokens(240, 200, 10).pieces[:10]
  untouched, lengths = _augmented_ids(caption_tokens.WordAugment(select=0.0))
  np.testing.assert_array_equal(untouched, np.tile(words, 200))
  masked, _ = _augmented_ids(caption_tokens.WordAugment(select=1.0, mask=1.0, random=0.0,
                                                        delete=0.0))
  assert (masked == bert_tokenizer.MASK_ID).all()
  _, lengths = _augmented_ids(caption_tokens.WordAugment(select=1.0, mask=0.0, random=0.0,
                                                         delete=1.0))
  assert (lengths == 2).all()  # every word deleted: [CLS] [SEP]
  with pytest.raises(ValueError, match='token_aug_probs'):
    caption_tokens.WordAugment(mask=0.5, random=0.5, delete=0.5)


def test_text_options_take_the_config_augmentation():
  config = demo.get_config()
  config.data.token_aug_probs.select = 0.3
  config.data.token_aug_exclude_special = True
  augment = datasets.text_options(config).augment
  assert augment == caption_tokens.WordAugment(select=0.3, exclude_special=True)


def test_region_keep_probability():
  u = np.random.default_rng(0).random((400, 36))
  _, counts = loader._drop_regions(u, 0.5)  # pylint: disable=protected-access
  assert abs(counts.mean() - 18) < 0.5
  _, counts = loader._drop_regions(u, 1.0)  # pylint: disable=protected-access
  assert (counts == 36).all()


# ---------------------------------------------------------------------------------------------
# Guards: evaluation protocol, caption truncation
# ---------------------------------------------------------------------------------------------

def _split(num_images, lengths=()):
  tokens = types.SimpleNamespace(lengths=np.asarray(lengths, np.int32))
  return types.SimpleNamespace(num_images=num_images, tokens=lambda vocab=None: tokens)


@pytest.mark.parametrize('dataset,protocol,split_name,images,message', [
    ('coco', 'coco', 'test', 1000, '5,000-image testall'),
    ('coco', 'single', 'test', 1000, 'eval_split=testall --config.eval.protocol=coco'),
    ('f30k', 'coco', 'test', 1000, 'Flickr30K is evaluated with --config.eval.protocol=single'),
    ('coco', '5k', 'testall', 5000, "expected 'single' or 'coco'"),
])
def test_protocols_no_paper_reports_are_refused(dataset, protocol, split_name, images, message):
  config = demo.get_config()
  config.data.name, config.eval.protocol = dataset, protocol
  with pytest.raises(DataError, match=message.replace('.', r'\.')):
    datasets.check_eval_protocol(config, split_name, _split(images))


@pytest.mark.parametrize('dataset,protocol,split_name,images', [
    ('coco', 'coco', 'testall', 5000), ('coco', 'single', 'testall', 5000),
    ('coco', 'single', 'dev', 1000), ('f30k', 'single', 'test', 1000),
    ('synthetic', 'coco', 'test', 10)])
def test_reported_protocols_pass(dataset, protocol, split_name, images):
  config = demo.get_config()
  config.data.name, config.eval.protocol = dataset, protocol
  datasets.check_eval_protocol(config, split_name, _split(images))


def test_training_refuses_captions_that_max_len_would_cut():
  config = demo.get_config()
  config.data.max_len = 32
  split = _split(3, lengths=[12, 33, 41])
  with pytest.raises(DataError, match=r'2 of the 3 train captions are longer than '
                     r'config\.data\.max_len = 32 BERT tokens \(the longest has 41 .*'
                     r'--config\.data\.max_len=48'):
    datasets.check_caption_lengths(config, 'train', split)
  config.data.allow_truncation = True
  datasets.check_caption_lengths(config, 'train', split)
  config.data.allow_truncation, config.data.max_len = False, 41
  datasets.check_caption_lengths(config, 'train', split)
