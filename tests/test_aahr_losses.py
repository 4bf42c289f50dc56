"""Parity of the AAHR losses and the instance relation module with the PyTorch fixtures.

Float64 runs (inside `jax.enable_x64`) compare with the float64 fixture arrays; the float32 runs
cover the float32-only behaviour of the triplet sampler (`tripuf_f32_*`) and the float32 relation
module.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import aahr_fixtures as fx
from aahr_jax import losses as L
from aahr_jax.models import relations as R


# The fixture's floating arrays were computed in float64 by the original modules (README.md
# there; the float32-only `tripuf_f32_*` cases are compared apart), so float64 parity is limited
# by float64 round-off of two summation orders only: measured at most 1.0e-15 of the largest
# gradient entry and 1.5e-16 relative on loss values (2026-12-08). 1e-12 relative leaves three
# orders of magnitude for other XLA versions and CPUs; a wrong term moves them by far more.
VALUE_RTOL = 1e-12
GRAD_RTOL = 1e-12
F30K = L.triplet_cutoff("f30k")


@pytest.fixture(autouse=True)
def float64():
  """Every test runs in float64 unless it casts its inputs to float32 itself."""
  with jax.enable_x64(True):
    yield


def f64(name: str) -> jax.Array:
  return jnp.asarray(fx.load()[name], jnp.float64)


def assert_value(mine, ref, rtol=VALUE_RTOL):
  """Within rtol of the reference's magnitude (or absolute, below 1)."""
  tol = rtol * max(abs(float(ref)), 1.0)
  assert abs(float(mine) - float(ref)) <= tol, (float(mine), float(ref))


def assert_grad(mine, ref, rtol=GRAD_RTOL):
  """Max abs difference within rtol of the reference's max abs entry (or absolute, if tiny)."""
  mine, ref = np.asarray(mine, np.float64), np.asarray(ref, np.float64)
  assert mine.shape == ref.shape
  err = np.abs(mine - ref).max()
  assert err <= rtol * max(np.abs(ref).max(), 1.0), err


def direction_losses(img, cap, ids, cutoff, negatives, **flags):
  """(i2t, t2i) direction values of the triplet loss with given draws."""
  scores = img @ cap.T
  positives = L.positive_mask(ids, ids, scores.shape[0])
  values = []
  for drawn, s, p in zip(negatives, (scores, scores.T), (positives, positives.T)):
    weights = L.dws_sampling_weights(s, p, cutoff=cutoff, max_over=flags.get("max_over", "all"))
    values.append(L.triplet_direction(s, p, drawn, weights,
                                      on_empty_row=flags.get("on_empty_row", "zero_direction")))
  return values


def weight_rows(img, cap, ids, cutoff, anchors, **flags):
  """The fixture `_prob` layout: one weight row per positive pair, (i2t, t2i)."""
  scores = img @ cap.T
  positives = L.positive_mask(ids, ids, scores.shape[0])
  return [L.dws_sampling_weights(s, p, cutoff=cutoff, **flags)[a]
          for s, p, a in zip((scores, scores.T), (positives, positives.T), anchors)]


# ---------------------------------------------------------------------------------------------
# 1. VSE++ hinge (the lead's function, checked against the fixture)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["hard", "sum"])
@pytest.mark.parametrize("masking", ["idmask", "eyemask"])
def test_vse_contrastive_parity(reduction, masking):
  prefix = f"vse_{reduction}_{masking}_"
  ids = jnp.asarray(fx.load()["ids"]) if masking == "idmask" else None
  loss = lambda img, cap: L.vse_contrastive_loss(
      img, cap, max_violation=reduction == "hard", ids=ids, sum_mode_divides_by_batch=True)
  value, (grad_img, grad_cap) = jax.value_and_grad(loss, (0, 1))(f64("emb_img"), f64("emb_cap"))
  assert_value(value, fx.load()[prefix + "loss"])
  assert_grad(grad_img, fx.load()[prefix + "grad_img"])
  assert_grad(grad_cap, fx.load()[prefix + "grad_cap"])


# ---------------------------------------------------------------------------------------------
# 2. Triplet loss with distance-weighted sampling
# ---------------------------------------------------------------------------------------------

TRIPLET_CASES = {  # case -> (image key, caption key, ids key)
    "trip": ("emb_img", "emb_cap", "ids"),
    "tripdeg": ("tripdeg_emb_img", "tripdeg_emb_cap", "tripdeg_ids"),
    "tripuf_f64": ("emb_img", "tripuf_emb_cap", "ids"),
}


@pytest.mark.parametrize("case", sorted(TRIPLET_CASES))
@pytest.mark.parametrize("dataset", ["f30k", "coco"])
def test_triplet_parity_float64(case, dataset):
  f = fx.load()
  prefix = f"{case}_{dataset}"
  img_key, cap_key, ids_key = TRIPLET_CASES[case]
  img, cap, ids = f64(img_key), f64(cap_key), jnp.asarray(f[ids_key])
  cutoff = L.triplet_cutoff(dataset)
  negatives = fx.recorded_negatives(prefix, len(ids))

  loss = lambda a, b: L.dws_triplet_loss(a, b, ids, cutoff=cutoff, negatives=negatives)
  value, (grad_img, grad_cap) = jax.value_and_grad(loss, (0, 1))(img, cap)
  assert_value(value, f[f"{prefix}_loss"])
  assert_grad(grad_img, f[f"{prefix}_grad_img"])
  assert_grad(grad_cap, f[f"{prefix}_grad_cap"])

  anchors = (f[f"{prefix}_i2t_anchor"], f[f"{prefix}_t2i_anchor"])
  for direction, mine_value, mine_rows in zip(
      ("i2t", "t2i"), direction_losses(img, cap, ids, cutoff, negatives),
      weight_rows(img, cap, ids, cutoff, anchors)):
    assert_value(mine_value, f[f"{prefix}_{direction}_loss"])
    np.testing.assert_allclose(mine_rows, f[f"{prefix}_{direction}_prob"], atol=1e-10)
    empty = bool((np.asarray(mine_rows).sum(axis=1) == 0).any())
    assert empty == bool(f[f"{prefix}_{direction}_raised"])


@pytest.mark.parametrize("dataset", ["f30k", "coco"])
def test_triplet_float32_underflow_switches_directions_off(dataset):
  """tripuf: in float32 one cut-off negative underflows a whole row -> both directions are 0."""
  f = fx.load()
  prefix = f"tripuf_f32_{dataset}"
  img = jnp.asarray(f["emb_img"], jnp.float32)
  cap = jnp.asarray(f["tripuf_emb_cap"], jnp.float32)
  ids = jnp.asarray(f["ids"])
  cutoff = L.triplet_cutoff(dataset)
  anchors = (f[f"{prefix}_i2t_anchor"], f[f"{prefix}_t2i_anchor"])
  for direction, rows in zip(("i2t", "t2i"), weight_rows(img, cap, ids, cutoff, anchors)):
    assert rows.dtype == jnp.float32
    reference = f[f"{prefix}_{direction}_prob"]
    np.testing.assert_allclose(rows, reference, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(rows).sum(axis=1) == 0, reference.sum(axis=1) == 0)
    assert bool(f[f"{prefix}_{direction}_raised"])

  loss = lambda a, b: L.dws_triplet_loss(a, b, ids, cutoff=cutoff, key=jax.random.key(3))
  value, (grad_img, grad_cap) = jax.value_and_grad(loss, (0, 1))(img, cap)
  assert float(value) == float(f[f"{prefix}_loss"]) == 0.0
  assert not np.any(np.asarray(grad_img)) and not np.any(np.asarray(grad_cap))
  assert_grad(grad_img, f[f"{prefix}_grad_img"])

  # the corrected flags keep the eligible negatives alive
  corrected = L.dws_triplet_loss(img, cap, ids, cutoff=cutoff, key=jax.random.key(3),
                                 max_over="eligible", on_empty_row="skip_row")
  assert float(corrected) > 0


def test_triplet_all_zero_row_zeroes_the_direction():
  """tripdeg f30k: anchor 0 has no admissible negative -> i2t is 0 (no gradient); skip_row
  keeps the other anchors."""
  f = fx.load()
  img, cap, ids = f64("tripdeg_emb_img"), f64("tripdeg_emb_cap"), jnp.asarray(f["tripdeg_ids"])
  scores = img @ cap.T
  positives = L.positive_mask(ids, ids, 4)
  weights = L.dws_sampling_weights(scores, positives, cutoff=F30K)
  assert float(weights[0].sum()) == 0.0 and bool((weights[1:].sum(axis=1) > 0).all())
  drawn = L.draw_negatives(jax.random.key(0), weights)

  faithful = lambda s: L.triplet_direction(s, positives, drawn, weights)
  value, grad = jax.value_and_grad(faithful)(scores)
  assert float(value) == 0.0 and not np.any(np.asarray(grad))

  skip = L.triplet_direction(scores, positives, drawn, weights, on_empty_row="skip_row")
  rows = np.arange(1, 4)  # ids are unique: the only positive of anchor a is column a
  expected = np.maximum(0.2 + np.asarray(scores)[rows, np.asarray(drawn)[rows, rows]]
                        - np.asarray(scores)[rows, rows], 0.0).sum()
  assert_value(skip, expected, 1e-12)


def test_draw_negatives_follows_the_weights():
  weights = jnp.array([[0.0, 0.5, 0.3, 0.2], [0.0, 0.0, 1e-30, 0.0],
                       [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 0.0],
                       [0.6, 0.0, 0.4, 0.0]])
  keys = jax.random.split(jax.random.key(7), 4000)
  draws = np.asarray(jax.vmap(L.draw_negatives, (0, None))(keys, weights))  # [K, 5, 4]
  frequencies = np.stack([np.bincount(draws[:, row].ravel(), minlength=4) / draws[:, row].size
                          for row in range(5)])
  np.testing.assert_allclose(frequencies[0], [0.0, 0.5, 0.3, 0.2], atol=0.02)
  np.testing.assert_array_equal(frequencies[1], [0, 0, 1, 0])  # tiny but non-zero is drawable
  np.testing.assert_allclose(frequencies[2], 0.25, atol=0.02)
  np.testing.assert_allclose(frequencies[4], [0.6, 0.0, 0.4, 0.0], atol=0.02)
  assert frequencies[4][[1, 3]].sum() == 0  # zero weight: never drawn, also not the last column
  # Cells of one row are independent draws, not one draw repeated.
  assert len(np.unique(draws[0, 0])) > 1


def test_triplet_with_key_jits_and_has_finite_gradients():
  """Training-like batch with duplicate images, float32, sampled draws, jitted."""
  keys = jax.random.split(jax.random.key(11), 3)
  img = L.normalize_rows(jax.random.normal(keys[0], (32, 16), jnp.float32))
  cap = L.normalize_rows(img + 0.5 * jax.random.normal(keys[1], (32, 16), jnp.float32))
  ids = jnp.arange(32) // 2
  loss = jax.jit(jax.value_and_grad(
      lambda a, b, k: L.dws_triplet_loss(a, b, ids, cutoff=F30K, key=k), (0, 1)))
  value, grads = loss(img, cap, keys[2])
  assert np.isfinite(float(value)) and all(np.isfinite(np.asarray(g)).all() for g in grads)
  with pytest.raises(ValueError):
    L.dws_triplet_loss(img, cap, ids, cutoff=F30K)


# ---------------------------------------------------------------------------------------------
# 3. SwAV, 4. InfoNCE and the queue
# ---------------------------------------------------------------------------------------------

def test_swav_parity():
  f = fx.load()
  prototypes = L.normalize_prototypes(f64("param/swav_loss.prototypes"))
  np.testing.assert_allclose(prototypes, f["swav_prototypes_normalized"], atol=1e-12)
  img, cap = f64("batch_fused_img"), f64("batch_fused_cap")
  np.testing.assert_allclose(L.sinkhorn(img @ prototypes.T), f["swav_q_img"], atol=1e-10)
  np.testing.assert_allclose(L.sinkhorn(cap @ prototypes.T), f["swav_q_cap"], atol=1e-10)
  value, grads = jax.value_and_grad(L.swav_loss, (0, 1, 2))(img, cap, prototypes)
  assert_value(value, f["swav_loss"])
  for grad, name in zip(grads, ("img", "cap", "prototypes")):
    assert_grad(grad, f[f"swav_grad_{name}"])


def test_swav_assignments_carry_no_gradient():
  scores = f64("swav_scores_img")
  grad = jax.grad(lambda s: L.sinkhorn(s).sum() + 0.0 * s.sum())(scores)
  assert not np.any(np.asarray(grad))


def test_info_nce_parity():
  f = fx.load()
  names = ("rel_in_prefusion_img", "rel_in_prefusion_cap", "moco_key_img", "moco_key_cap",
           "moco_queue_img", "moco_queue_cap")
  args = [f64(n) for n in names]
  np.testing.assert_allclose(L.info_nce_logits(args[0], args[3], args[5]), f["moco_logits_i2t"],
                             atol=1e-10)
  np.testing.assert_allclose(L.info_nce_logits(args[1], args[2], args[4]), f["moco_logits_t2i"],
                             atol=1e-10)
  value, grads = jax.value_and_grad(L.info_nce_loss, (0, 1, 2, 3, 4, 5))(*args)
  assert_value(value, f["moco_loss"])
  for grad, name in zip(grads, ("query_img", "query_cap", "key_img", "key_cap")):
    assert_grad(grad, f[f"moco_grad_{name}"])
  assert not np.any(np.asarray(grads[4])) and not np.any(np.asarray(grads[5]))  # queues detached


def test_enqueue_is_a_ring_buffer():
  queue = L.init_moco_queue(jax.random.key(0), 4, 6)
  np.testing.assert_allclose(jnp.linalg.norm(queue, axis=0), 1.0, atol=1e-12)
  assert float(queue.min()) >= 0.0
  pointer = jnp.asarray(0)
  enqueue = jax.jit(L.enqueue_keys)
  for step in range(4):  # key b of batch s is (10 s + b) in every dimension: order is visible
    keys = jnp.full((2, 4), 10.0 * (step + 1)) + jnp.arange(2.0)[:, None]
    queue, pointer = enqueue(queue, pointer, keys)
  assert int(pointer) == 2  # 4 batches of 2 into 6 slots: wrapped once
  np.testing.assert_array_equal(queue, np.tile([40.0, 41.0, 20.0, 21.0, 30.0, 31.0], (4, 1)))
  with pytest.raises(ValueError):
    L.enqueue_keys(queue, pointer, jnp.zeros((4, 4)))


# ---------------------------------------------------------------------------------------------
# 5. Instance relation module
# ---------------------------------------------------------------------------------------------

RELATION_OUTPUTS = {  # fixture suffix -> key of the module's output dict
    "img_emb_l2": "img_l2", "cap_emb_l2": "cap_l2", "kl_global_sim": "global_sim",
    **{name: name for name in (
        "connect_i2i", "connect_t2t", "connect_i2t", "connect_t2i", "relevance_i2i",
        "relevance_t2t", "relevance_i2t", "relevance_t2i", "reg_loss", "gcn_img_out",
        "gcn_txt_out", "gcn_joint_adj", "gcn_joint_out", "attn_mask", "transformer_in",
        "transformer_out", "enh_img", "enh_cap")},
}


def run_relation(module, params, inputs, **kwargs):
  return module.apply({"params": params}, **inputs, deterministic=True, **kwargs)


def assert_relation_outputs(case, out, atol):
  f = fx.load()
  for suffix, name in RELATION_OUTPUTS.items():
    mine, ref = np.asarray(out[name]), f[f"{case}_{suffix}"]
    if ref.dtype == bool:
      np.testing.assert_array_equal(mine, ref, err_msg=suffix)
    else:  # the attention mask holds -inf where not connected
      np.testing.assert_array_equal(np.isfinite(mine), np.isfinite(ref), err_msg=suffix)
      finite = np.isfinite(ref)
      np.testing.assert_allclose(mine[finite], ref[finite], atol=atol, err_msg=suffix)


@pytest.mark.parametrize("case", ["rel", "rel10"])
def test_relation_intermediates_float64(case):
  module, params, _, inputs = fx.relation_setup(case)
  assert_relation_outputs(case, run_relation(module, params, inputs), atol=1e-10)


def test_relation_intermediates_float32():
  """The float32 module makes the same discrete decisions (connectivity) as the fixtures."""
  with jax.enable_x64(False):
    module, params, _, inputs = fx.relation_setup("rel", jnp.float32)
    out = run_relation(module, params, inputs)
    assert out["enh_img"].dtype == jnp.float32
    assert_relation_outputs("rel", out, atol=2e-5)


def criterion_terms(module, params, prototypes, inputs, fused_img, fused_cap, negatives):
  """Every criterion term of one relation case, with the recorded triplet draws."""
  ids = jnp.asarray(fx.load()["ids"])
  out = run_relation(module, params, inputs)
  terms = R.relation_triplet_losses(out, ids, cutoff=F30K, negatives=negatives)
  terms["base"] = L.dws_triplet_loss(fused_img, fused_cap, ids, cutoff=F30K,
                                     negatives=negatives["base"])
  terms["swav"] = L.swav_loss(fused_img, fused_cap, prototypes)
  terms["reg"] = out["reg_loss"]
  terms["graph"] = terms["gnn"]
  return terms


@pytest.mark.parametrize("case", ["rel", "rel10"])
def test_relation_losses_and_gradients_float64(case):
  f = fx.load()
  module, params, prototypes, inputs = fx.relation_setup(case)
  negatives = fx.recorded_relation_negatives(case)

  def total(params, img_prefusion, cap_prefusion):
    case_inputs = dict(inputs, img_prefusion=img_prefusion, cap_prefusion=cap_prefusion)
    terms = criterion_terms(module, params, prototypes, case_inputs, f64("batch_fused_img"),
                            f64("batch_fused_cap"), negatives)
    return terms["base"] + terms["gnn"] + 0.2 * terms["swav"] + 10 * terms["reg"], terms

  (value, terms), grads = jax.value_and_grad(total, (0, 1, 2), has_aux=True)(
      params, inputs["img_prefusion"], inputs["cap_prefusion"])
  assert_value(value, f[f"{case}_criterion_total"])
  assert_value(terms["gnn"] + 10 * terms["reg"], f[f"{case}_relation_loss"])
  for name in ("base", "gnn1", "gnn2", "gnn3", "gnn", "swav"):
    assert_value(terms[name], f[f"{case}_{name}_loss"])
  assert_grad(grads[1], f[f"{case}_grad_prefusion_img"])
  assert_grad(grads[2], f[f"{case}_grad_prefusion_cap"])
  torch_grads = R.relation_params_to_torch(grads[0])
  assert len(torch_grads) == 18  # 12 Transformer + 3 x 2 GCN tensors
  for key, grad in torch_grads.items():
    assert_grad(grad, f[f"{case}_grad/{key}"])
  # the relevance MLPs are exactly the parameters torch leaves without gradient
  assert all(name.startswith("adj_model.adj_learning.mlp_")
             for name in f[f"{case}_params_without_grad"])


@pytest.mark.parametrize("case", ["rel", "rel10"])
def test_relation_direction_losses(case):
  """Each of the 8 triplet directions of the criterion call."""
  f = fx.load()
  module, params, _, inputs = fx.relation_setup(case)
  out = run_relation(module, params, inputs)
  ids = jnp.asarray(f["ids"])
  pairs = {"base": (f64("batch_fused_img"), f64("batch_fused_cap")),
           "gnn1": (out["img_l2"], out["enh_cap"]), "gnn2": (out["enh_img"], out["cap_l2"]),
           "gnn3": (out["enh_img"], out["enh_cap"])}
  for term, (img, cap) in pairs.items():
    prefix = f"{case}_{term}"
    values = direction_losses(img, cap, ids, F30K, fx.recorded_negatives(prefix, 8))
    for direction, value in zip(("i2t", "t2i"), values):
      assert_value(value, f[f"{prefix}_{direction}_loss"])


def pad_relation_inputs(inputs, extra_regions, extra_words, key):
  """Pad regions/words wider with garbage (the batch maxima and lengths stay the same)."""
  region_key, word_key = jax.random.split(key)
  regions, words = inputs["regions"], inputs["words"]
  garbage = lambda k, x, n: 100 * jax.random.normal(k, (x.shape[0], n, x.shape[2]), x.dtype)
  return dict(inputs,
              regions=jnp.concatenate([regions, garbage(region_key, regions, extra_regions)], 1),
              words=jnp.concatenate([words, garbage(word_key, words, extra_words)], 1))


@pytest.mark.parametrize("case", ["rel", "rel10"])
@pytest.mark.parametrize("mask_padding", [False, True])
def test_relation_independent_of_static_padding(case, mask_padding):
  module, params, _, inputs = fx.relation_setup(case)
  module = module.clone(fine_grained_mask_padding=mask_padding)
  reference = run_relation(module, params, inputs)
  padded = run_relation(module, params,
                        pad_relation_inputs(inputs, 7, 9, jax.random.key(1)))
  for name, value in reference.items():
    np.testing.assert_allclose(padded[name], value, rtol=1e-12, atol=1e-12, err_msg=name)
  if not mask_padding:
    assert_relation_outputs(case, padded, atol=1e-10)


def test_fine_grained_masked_mode_ignores_padding_slots():
  """Corrected Q17: with every slot masked by length, the padded region/word slots do not
  matter even below the batch maxima."""
  inputs = fx.relation_case("rel10")
  args = lambda x: (x["regions"], x["words"], x["word_lengths"], x["batch_max_regions"],
                    x["batch_max_len"])
  rng = np.random.default_rng(0)
  scrambled = {k: v for k, v in inputs.items()}
  region_pad = ~fx.load()["rel10_in_region_valid"][..., None]
  word_pad = ~fx.load()["rel10_in_word_valid"][..., None]
  scrambled["regions"] = jnp.where(region_pad, rng.normal(size=inputs["regions"].shape),
                                   inputs["regions"])
  scrambled["words"] = jnp.where(word_pad, rng.normal(size=inputs["words"].shape),
                                 inputs["words"])
  masked = lambda x: R.fine_grained_relevance(*args(x), topk=10, mask_padding=True,
                                              region_lengths=x["region_lengths"])
  for a, b in zip(masked(inputs), masked(scrambled)):
    np.testing.assert_allclose(a, b, atol=1e-12)
  faithful = R.fine_grained_relevance(*args(scrambled), topk=10)
  assert not np.allclose(faithful[0], masked(inputs)[0])


def test_fine_grained_caption_chunks_match():
  inputs = fx.relation_case("rel10")
  args = (inputs["regions"], inputs["words"], inputs["word_lengths"],
          inputs["batch_max_regions"], inputs["batch_max_len"])
  whole = R.fine_grained_relevance(*args, topk=10)
  chunked = R.fine_grained_relevance(*args, topk=10, caption_chunk=3)
  for a, b in zip(whole, chunked):
    np.testing.assert_allclose(a, b, atol=1e-13)


def test_fine_grained_bf16_operands_stay_close_to_fp32():
  """Mixed-precision runs compute the word-region scores from bf16 operands (fp32 accumulation):
  the relevance moves by bf16 rounding only, not by a different computation."""
  inputs = fx.relation_case("rel10")
  args = [jnp.asarray(inputs[k], jnp.float32) if k in ("regions", "words") else inputs[k]
          for k in ("regions", "words", "word_lengths", "batch_max_regions", "batch_max_len")]
  full = R.fine_grained_relevance(*args, topk=10)
  mixed = R.fine_grained_relevance(*args, topk=10, matmul_dtype=jnp.bfloat16)
  for a, b in zip(full, mixed):
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(a, b, atol=2e-2)
    assert float(jnp.max(jnp.abs(a - b))) > 0  # the bf16 path was taken


def test_fine_grained_all_captions_shorter_than_topk():
  """Q29 guard: every caption shorter than 10 and a batch width < 10 does not fail; the
  word normalisation then covers all batch_max_len slots."""
  inputs = fx.relation_case("rel")  # word lengths <= 7, 7 slots
  args = (inputs["regions"], inputs["words"], inputs["word_lengths"],
          inputs["batch_max_regions"], inputs["batch_max_len"])
  with_ten = R.fine_grained_relevance(*args, topk=10)
  with_width = R.fine_grained_relevance(*args, topk=int(inputs["batch_max_len"]))
  for a, b in zip(with_ten, with_width):
    np.testing.assert_allclose(a, b, atol=1e-14)


def test_pairwise_distance_has_zero_gradient_at_zero():
  x = f64("rel_img_emb_l2")
  relevance = lambda x: jnp.exp(-R.pairwise_distance(x, x, zero_diagonal=True)).sum()
  grad = jax.grad(relevance)(x)
  assert np.isfinite(np.asarray(grad)).all()
  duplicated = jnp.concatenate([x, x[:1]])  # an off-diagonal zero distance too
  grad = jax.grad(lambda x: jnp.exp(-R.pairwise_distance(x, x)).sum())(duplicated)
  assert np.isfinite(np.asarray(grad)).all()


def test_relation_training_mode_dropout():
  with jax.enable_x64(False):
    module, params, _, inputs = fx.relation_setup("rel", jnp.float32)
    ids = jnp.asarray(fx.load()["ids"])

    def loss(params, key):
      dropout_key, draw_key = jax.random.split(key)
      out = module.apply({"params": params}, **inputs, deterministic=False,
                         rngs={"dropout": dropout_key})
      return R.relation_triplet_losses(out, ids, cutoff=F30K, key=draw_key)["gnn"], out

    (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        params, jax.random.key(5))
    assert np.isfinite(float(value))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    eval_out = run_relation(module, params, inputs)
    assert not np.allclose(out["enh_img"], eval_out["enh_img"])


def test_relation_init_matches_param_layout_and_inits():
  module, params, _, inputs = fx.relation_setup("rel")
  with jax.enable_x64(False):
    inputs32 = jax.tree.map(
        lambda x: x.astype(jnp.float32 if x.dtype == jnp.float64 else jnp.int32), inputs)
    init = module.init(jax.random.key(0), **inputs32, deterministic=True)["params"]
  assert jax.tree.structure(init) == jax.tree.structure(params)
  assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, params)
  layer = init["gnn"]["layers_0"]
  d = 32
  assert float(jnp.abs(init["gcn"]["gc1"]["weight"]).max()) <= np.sqrt(6 / (2 * d))
  assert not np.any(np.asarray(init["gcn"]["gc1"]["bias"]))
  assert float(jnp.abs(layer["self_attn"]["in_proj"]["kernel"]).max()) <= np.sqrt(6 / (4 * d))
  assert not np.any(np.asarray(layer["self_attn"]["out_proj"]["bias"]))
  assert float(jnp.abs(layer["linear1"]["bias"]).max()) <= 1 / np.sqrt(d)
  assert np.all(np.asarray(layer["norm1"]["scale"]) == 1)


def test_param_mapping_round_trip_and_errors():
  state = fx.criterion_state_dict()
  params, prototypes = R.relation_params_from_torch(state)
  np.testing.assert_array_equal(prototypes, state["swav_loss.prototypes"])
  back = R.relation_params_to_torch(params)
  for key, value in back.items():
    np.testing.assert_array_equal(value, state[key])
  assert set(state) - set(back) == {"swav_loss.prototypes", "swav_loss.queue"} | {
      k for k in state if k.startswith("adj_model.adj_learning.mlp_")}
  # an optional DataParallel prefix is accepted
  R.relation_params_from_torch({"module." + k: v for k, v in state.items()})

  broken = dict(state)
  del broken["gcn.gc1.bias"]
  broken["gnn.layers.1.linear1.weight"] = state["gnn.layers.0.linear1.weight"]
  with pytest.raises(ValueError, match=r"gcn\.gc1\.bias.*gnn\.layers\.1\.linear1\.weight"):
    R.relation_params_from_torch(broken)
  wrong_shape = dict(state, **{"gcn_img.gc1.weight": np.zeros((32, 31))})
  with pytest.raises(ValueError, match=r"gcn_img\.gc1\.weight"):
    R.relation_params_from_torch(wrong_shape, expected=params)


# ---------------------------------------------------------------------------------------------
# 6. Gates and step gradients
# ---------------------------------------------------------------------------------------------

MOCO_M, BATCH = 16, 8  # fixture sizes


def test_loss_weights_match_the_gate_table():
  f = fx.load()
  weights = jax.jit(lambda it, count: L.loss_weights(
      it, count, moco_queue_length=MOCO_M, batch_size=BATCH))
  for row, it in enumerate(f["gate_iter_count"]):
    for col, count in enumerate(f["gate_moco_count_before"]):
      w = weights(jnp.asarray(it), jnp.asarray(count))
      assert float(w["swav"]) == pytest.approx(f["gate_swav_weight"][row, col])
      assert bool(w["graph"]) == bool(f["gate_relation_active"][row, col])
      assert float(w["reg"]) == (10.0 if f["gate_relation_active"][row, col] else 0.0)
      assert bool(w["moco"]) == bool(f["gate_moco_active"][row, col])
  assert weights._cache_size() == 1  # traced counters: one compilation for every step

  # the real flags: MoCo from the 17th step (F30K, B=128) / 9th step (COCO, B=256)
  assert float(L.loss_weights(15, 15, moco_queue_length=2048, batch_size=128)["moco"]) == 0
  assert float(L.loss_weights(16, 16, moco_queue_length=2048, batch_size=128)["moco"]) == 1
  assert float(L.loss_weights(8, 8, moco_queue_length=2048, batch_size=256)["moco"]) == 1
  assert float(L.loss_weights(2201, 0, moco_queue_length=2048, batch_size=128)["swav"]) == 0.2
  assert float(L.loss_weights(2200, 0, moco_queue_length=2048, batch_size=128)["swav"]) == 0


def step_terms():
  """All terms of the gate steps (relation case `rel`, same draws) as a function of the four
  embedding inputs."""
  module, params, prototypes, inputs = fx.relation_setup("rel")
  negatives = fx.recorded_relation_negatives("rel")

  def terms(fused_img, fused_cap, prefusion_img, prefusion_cap):
    case_inputs = dict(inputs, img_prefusion=prefusion_img, cap_prefusion=prefusion_cap)
    result = criterion_terms(module, params, prototypes, case_inputs, fused_img, fused_cap,
                             negatives)
    result["moco"] = L.info_nce_loss(prefusion_img, prefusion_cap, f64("moco_key_img"),
                                     f64("moco_key_cap"), f64("moco_queue_img"),
                                     f64("moco_queue_cap"))
    return result

  embeddings = (f64("batch_fused_img"), f64("batch_fused_cap"), f64("rel_in_prefusion_img"),
                f64("rel_in_prefusion_cap"))
  return terms, embeddings


def test_weighted_total_matches_the_gate_table():
  f = fx.load()
  terms_fn, embeddings = step_terms()
  terms = terms_fn(*embeddings)
  for row, it in enumerate(f["gate_iter_count"]):
    for col, count in enumerate(f["gate_moco_count_before"]):
      weights = L.loss_weights(jnp.asarray(it), jnp.asarray(count), moco_queue_length=MOCO_M,
                               batch_size=BATCH)
      assert_value(L.weighted_total(terms, weights), f["gate_total"][row, col])
      criterion = L.weighted_total(terms, {k: v for k, v in weights.items() if k != "moco"})
      assert_value(criterion, f["gate_criterion"][row, col])


@pytest.mark.parametrize("it", [0, 2300, 8100])
@pytest.mark.parametrize("queue", ["qnotfull", "qfull"])
def test_step_gradients(it, queue):
  f = fx.load()
  terms_fn, embeddings = step_terms()
  weights = L.loss_weights(jnp.asarray(it), jnp.asarray(0 if queue == "qnotfull" else 2),
                           moco_queue_length=MOCO_M, batch_size=BATCH)
  total = lambda *e: L.weighted_total(terms_fn(*e), weights)
  grads = jax.grad(total, (0, 1, 2, 3))(*embeddings)
  for grad, name in zip(grads, ("fused_img", "fused_cap", "prefusion_img", "prefusion_cap")):
    assert_grad(grad, f[f"step_it{it}_{queue}_grad_{name}"])


def test_weighted_total_drops_gated_off_nan():
  terms = {"base": jnp.asarray(1.0), "graph": jnp.asarray(jnp.nan)}
  weights = {"base": jnp.float32(1.0), "graph": jnp.float32(0.0)}
  assert float(L.weighted_total(terms, weights)) == 1.0


# ---------------------------------------------------------------------------------------------
# Reuse checks: jit with traced batch maxima, and the Transformer layer against torch
# ---------------------------------------------------------------------------------------------

def test_relation_jit_with_traced_batch_maxima():
  """One compilation serves every batch_max_regions / batch_max_len (runtime scalars)."""
  module, params, _, inputs = fx.relation_setup("rel")
  apply = jax.jit(lambda p, x: module.apply({"params": p}, **x, deterministic=True))
  padded = pad_relation_inputs(inputs, 3, 5, jax.random.key(2))
  out = apply(params, padded)
  assert_relation_outputs("rel", out, atol=1e-10)
  shorter = dict(padded, batch_max_len=padded["batch_max_len"] - 1,
                 word_lengths=jnp.minimum(padded["word_lengths"], padded["batch_max_len"] - 1))
  apply(params, shorter)
  assert apply._cache_size() == 1


def test_transformer_layer_matches_torch_with_key_padding():
  """TransformerEncoderLayer + key_padding_additive_mask == torch nn.TransformerEncoderLayer
  (eval, sequence-first, src_key_padding_mask), loaded through transformer_key_map."""
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  d_model, heads, batch, length = 32, 4, 3, 6
  layer = torch.nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=d_model, dropout=0.1)
  with torch.no_grad():  # non-trivial LayerNorm / biases
    for name, value in layer.named_parameters():
      if "norm" in name or "bias" in name:
        value.add_(0.1 * torch.randn_like(value))
  layer = layer.double().eval()
  lengths = np.array([6, 4, 2])
  x = np.random.default_rng(0).normal(size=(batch, length, d_model))
  with torch.no_grad():
    expected = layer(torch.from_numpy(x).transpose(0, 1),
                     src_key_padding_mask=torch.from_numpy(
                         np.arange(length)[None] >= lengths[:, None])).transpose(0, 1).numpy()

  state = {f"aggr.layers.0.{k}": v.detach().numpy() for k, v in layer.state_dict().items()}
  params = {}
  for key, (path, transpose) in R.transformer_key_map("aggr", ("aggr",)).items():
    R._set_path(params, path, jnp.asarray(state[key].T if transpose else state[key]))
  module = R.TransformerEncoder(num_layers=1, num_heads=heads)
  mask = R.key_padding_additive_mask(jnp.asarray(lengths), length, jnp.float64)
  out = module.apply({"params": params["aggr"]}, jnp.asarray(x), mask, deterministic=True)
  np.testing.assert_allclose(out, expected, atol=1e-12)
