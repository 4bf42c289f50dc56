"""Region encoder (FC + residual MLP with BatchNorm), shared by VSE-infinity, HREM and AAHR, and
AAHR's CLIP-feature projection.

AAHR nests the region encoder one level deeper (torch `fc.fc.*`, `fc.mlp.*`): its image tower
names a `RegionEncoder(mlp_xavier=True)` child `fc`.
"""

import flax.linen as nn
import jax.numpy as jnp

from aahr_jax.models import layers


class MLP(nn.Module):
  """Linear -> BN -> ReLU -> Linear (the `mlp` of FC_MLP with num_layers=2).

  The original also builds a second BatchNorm (`bns_1`) that it never applies; its parameters
  exist here too (for one-to-one checkpoint conversion) and are frozen by the optimizer.
  """
  hidden: int
  out: int
  xavier: bool  # AAHR: Xavier everywhere; VSE-infinity: torch default for the MLP
  dtype: jnp.dtype = jnp.float32  # matmul dtype; BatchNorm statistics are float32

  @nn.compact
  def __call__(self, x, bn_mask, *, train: bool):
    b, n, _ = x.shape
    h = layers.TorchDense(self.hidden, xavier=self.xavier, dtype=self.dtype, name='layers_0')(x)
    h = layers.MaskedBatchNorm(name='bns_0')(h.reshape(b * n, -1), bn_mask.reshape(b * n),
                                             train=train)
    h = nn.relu(h).reshape(b, n, -1)
    if self.is_initializing():  # create the unused BN's variables
      layers.MaskedBatchNorm(name='bns_1')(jnp.zeros((1, self.out)), jnp.ones((1,), bool),
                                           train=False)
    return layers.TorchDense(self.out, xavier=self.xavier, dtype=self.dtype, name='layers_1')(h)


class RegionEncoder(nn.Module):
  """R = fc(X) + mlp(X) per region (docs/method.md 2.3 / 2.12).

  `bn_mask` selects the rows entering the BatchNorm statistics: the original includes zero-padded
  rows up to the per-batch maximum region count (quirk Q8), which the caller reproduces by
  passing `position < batch_max_regions`.
  """
  embed_size: int
  hidden: int = 512
  mlp_xavier: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, regions, bn_mask, *, train: bool):
    fc = layers.TorchDense(self.embed_size, xavier=True, dtype=self.dtype, name='fc')(regions)
    mlp = MLP(self.hidden, self.embed_size, xavier=self.mlp_xavier, dtype=self.dtype, name='mlp')
    return fc + mlp(regions, bn_mask, train=train)


class SingleLinearMLP(nn.Module):
  """FC_MLP's `mlp` with num_layers=1 and no BN: one Linear (`layers_0`), no activation."""
  out: int
  xavier: bool = True

  @nn.compact
  def __call__(self, x):
    return layers.TorchDense(self.out, xavier=self.xavier, name='layers_0')(x)


class ClipProjection(nn.Module):
  """AAHR `fc_clip` (docs/method.md 2.7): FC_MLP(512, D, D, num_layers=1, bn=False) on a CLIP
  feature = fc(c) + mlp.layers_0(c), both Xavier with zero bias. Two parallel affine maps are
  one affine map, but both are kept for checkpoint compatibility and identical optimisation."""
  embed_size: int

  @nn.compact
  def __call__(self, clip_features):  # [B, 512] un-normalised CLIP features
    fc = layers.TorchDense(self.embed_size, xavier=True, name='fc')(clip_features)
    return fc + SingleLinearMLP(self.embed_size, name='mlp')(clip_features)
