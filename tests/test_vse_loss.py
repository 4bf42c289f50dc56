"""VSE++ hinge loss against a brute-force double loop."""

import jax.numpy as jnp
import numpy as np
import pytest

from aahr_jax import losses


def brute_force(img, cap, margin, max_violation, ids=None):
  b = img.shape[0]
  s = img @ cap.T
  positive = (np.eye(b, dtype=bool) if ids is None else ids[:, None] == ids[None, :])
  total = 0.0
  for i in range(b):  # image anchors
    costs = [max(0.0, margin + s[i, j] - s[i, i]) for j in range(b) if not positive[i, j]]
    total += (max(costs, default=0.0) if max_violation else sum(costs))
  for j in range(b):  # caption anchors
    costs = [max(0.0, margin + s[i, j] - s[j, j]) for i in range(b) if not positive[i, j]]
    total += (max(costs, default=0.0) if max_violation else sum(costs))
  return total


@pytest.mark.parametrize('max_violation', [True, False])
@pytest.mark.parametrize('with_ids', [False, True])
def test_matches_brute_force(max_violation, with_ids):
  rng = np.random.default_rng(0)
  img = rng.normal(size=(12, 8))
  cap = img + 0.8 * rng.normal(size=(12, 8))
  img /= np.linalg.norm(img, axis=1, keepdims=True)
  cap /= np.linalg.norm(cap, axis=1, keepdims=True)
  ids = np.array([0, 1, 1, 2, 3, 3, 3, 4, 5, 6, 7, 8]) if with_ids else None
  got = losses.vse_contrastive_loss(jnp.asarray(img, jnp.float32), jnp.asarray(cap, jnp.float32),
                                    margin=0.2, max_violation=max_violation,
                                    ids=None if ids is None else jnp.asarray(ids))
  assert float(got) == pytest.approx(brute_force(img, cap, 0.2, max_violation, ids), rel=1e-5)


def test_traced_switch_and_mean_division():
  rng = np.random.default_rng(1)
  img = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  cap = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  summed = losses.vse_contrastive_loss(img, cap, max_violation=jnp.asarray(False))
  divided = losses.vse_contrastive_loss(img, cap, max_violation=False,
                                        sum_mode_divides_by_batch=True)
  assert float(divided) == pytest.approx(float(summed) / 6, rel=1e-6)
