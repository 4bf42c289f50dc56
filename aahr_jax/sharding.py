"""The device mesh and the shardings of parameters and batches."""

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P


def create_mesh(mesh_config) -> jax.sharding.Mesh:
  """Mesh from `config.mesh`, e.g. (('data', -1),); -1 takes the remaining devices."""
  names = tuple(name for name, _ in mesh_config)
  sizes = [int(size) for _, size in mesh_config]
  n_devices = jax.device_count()
  known = int(np.prod([s for s in sizes if s != -1]))
  if sizes.count(-1) > 1:
    raise ValueError(f'config.mesh {mesh_config}: at most one axis may have size -1')
  sizes = [n_devices // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != n_devices:
    raise ValueError(f'config.mesh {mesh_config} needs {int(np.prod(sizes))} devices, '
                     f'but {n_devices} are available')
  return jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) dimension split over every mesh axis that is not a model axis."""
  data_axes = tuple(name for name in mesh.axis_names if name != 'model')
  return NamedSharding(mesh, P(data_axes))


def global_batch(batch: dict, mesh) -> dict:
  """Process-local numpy batch -> global jax arrays sharded over the data axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
