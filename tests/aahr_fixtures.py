"""Access to the PyTorch-produced AAHR loss fixtures (tests/fixtures/aahr_losses: a copy of the
team's shared fixtures, produced by running the original PyTorch code; README.md there describes
every array)."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from aahr_jax import losses
from aahr_jax.models import relations

FIXTURE_PATH = os.environ.get(
    "AAHR_LOSS_FIXTURES",
    os.path.join(os.path.dirname(__file__), "fixtures", "aahr_losses", "aahr_losses.npz"))

TRIPLET_TERMS = ("base", "gnn1", "gnn2", "gnn3")


@functools.lru_cache(maxsize=1)
def load() -> dict[str, np.ndarray]:
  """All fixture arrays, keyed as in the npz."""
  with np.load(FIXTURE_PATH) as data:
    return {key: data[key] for key in data.files}


def criterion_state_dict(topk10: bool = False) -> dict[str, np.ndarray]:
  """The criterion's torch state_dict (`param/` keys; MLPs from `param_topk10/` if asked)."""
  f = load()
  state = {k[len("param/"):]: v for k, v in f.items() if k.startswith("param/")}
  if topk10:
    state.update({k[len("param_topk10/"):]: v for k, v in f.items()
                  if k.startswith("param_topk10/")})
  return state


def recorded_negatives(prefix: str, batch: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """([B, B] i2t, [B, B] t2i) draw matrices from the per-pair draws recorded under `prefix`."""
  f = load()
  return tuple(
      losses.negatives_from_pairs(jnp.asarray(f[f"{prefix}_{d}_anchor"]),
                                  jnp.asarray(f[f"{prefix}_{d}_pos"]),
                                  jnp.asarray(f[f"{prefix}_{d}_neg_drawn"]), (batch, batch))
      for d in ("i2t", "t2i"))


def relation_case(case: str, dtype=jnp.float64) -> dict:
  """Inputs of relation case `rel` (topk 5) or `rel10` (topk 10) as module arguments."""
  f = load()
  get = lambda name: jnp.asarray(f[f"{case}_in_{name}"], dtype)
  return {
      "img_prefusion": get("prefusion_img"),
      "cap_prefusion": get("prefusion_cap"),
      "regions": get("regions"),
      "words": get("words"),
      "word_lengths": jnp.asarray(f[f"{case}_in_word_len"]),
      "region_lengths": jnp.asarray(f[f"{case}_in_region_len"]),
      "batch_max_regions": jnp.asarray(f[f"{case}_in_regions"].shape[1]),
      "batch_max_len": jnp.asarray(f[f"{case}_in_word_len"].max()),
  }


def relation_setup(case: str, dtype=jnp.float64):
  """(module, params, normalised prototypes, inputs) for relation case `rel` or `rel10`."""
  topk = 10 if case == "rel10" else 5
  params, prototypes = relations.relation_params_from_torch(
      criterion_state_dict(topk10=(case == "rel10")), dtype=np.dtype(dtype))
  params = jax.tree.map(jnp.asarray, params)
  prototypes = losses.normalize_prototypes(jnp.asarray(prototypes, dtype))
  return relations.InstanceRelationModule(topk=topk), params, prototypes, relation_case(case, dtype)


def recorded_relation_negatives(case: str, batch: int = 8) -> dict:
  """{"base": (i2t, t2i), "gnn1": ..., ...} recorded draws of one relation case."""
  return {term: recorded_negatives(f"{case}_{term}", batch) for term in TRIPLET_TERMS}
