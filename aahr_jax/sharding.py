"""The device mesh and the shardings of the train state and of batches.

Mesh: `config.mesh`, e.g. (('data', -1),) or (('data', 4), ('fsdp', 2)) or
(('data', -1), ('model', 2)); -1 takes the remaining devices. Batches are split over every axis
that is not `model` (data and fsdp both hold different examples), so the losses always see the
whole global batch, whatever the mesh.

State: `config.sharding_rules`, a list of (regex, op) whose regex fully matches a leaf's
'/'-joined path in the train state ('params/txt/bert/encoder/layer/0/attention/self/query/kernel',
'opt_state/.../mu/img/fc/fc/kernel', 'extra/momentum/txt/...'); the first match wins. Ops:
  replicate     every device holds the whole array;
  fsdp          the largest dimension divisible by the `fsdp` axis is split over it (arrays
                smaller than `config.fsdp_min_size` elements stay replicated);
  model:D       dimension D (negative counts from the end) is split over the `model` axis
                (tensor parallelism; see BERT_TENSOR_PARALLEL);
  'model:1|fsdp' applies both, left to right, each on a dimension not yet split.
An op naming an axis the mesh lacks (or of size 1) is a no-op, so one rule set works on any
mesh. `step` and `rng` are always replicated.
"""

import collections
import re

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

AXES = ('data', 'fsdp', 'model')
MODEL_AXIS = 'model'
FSDP_AXIS = 'fsdp'
ALWAYS_REPLICATED = ('step', 'rng')  # tiny scalars and keys of the train state

REPLICATE_ALL = (('.*', 'replicate'),)
FSDP_ALL = (('.*', 'fsdp'),)
# Megatron-style BERT: q/k/v and the MLP's first kernel split by output column, the attention
# output and the MLP's second kernel by input row; everything else FSDP (a no-op without the
# fsdp axis). GSPMD inserts the collectives.
BERT_TENSOR_PARALLEL = (
    ('.*bert/encoder/layer/[^/]+/attention/self/(query|key|value)/kernel', 'model:-1|fsdp'),
    ('.*bert/encoder/layer/[^/]+/attention/self/(query|key|value)/bias', 'model:-1'),
    ('.*bert/encoder/layer/[^/]+/intermediate/dense/kernel', 'model:-1|fsdp'),
    ('.*bert/encoder/layer/[^/]+/intermediate/dense/bias', 'model:-1'),
    ('.*bert/encoder/layer/[^/]+/(attention/)?output/dense/kernel', 'model:-2|fsdp'),
    ('.*', 'fsdp'),
)  # negative dimensions: the same rules fit the scanned layout ([L, ...] parameters)


def create_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  """Mesh from `config.mesh`, e.g. (('data', -1),); -1 takes the remaining devices."""
  names = tuple(name for name, _ in mesh_config)
  sizes = [int(size) for _, size in mesh_config]
  unknown = [n for n in names if n not in AXES]
  if unknown or len(set(names)) != len(names):
    raise ValueError(f'config.mesh {mesh_config}: axis names must be distinct and among {AXES} '
                     f'(got {names})')
  n_devices = len(devices) if devices is not None else jax.device_count()
  known = int(np.prod([s for s in sizes if s != -1]))
  if sizes.count(-1) > 1:
    raise ValueError(f'config.mesh {mesh_config}: at most one axis may have size -1')
  if n_devices % known:
    raise ValueError(f'config.mesh {mesh_config}: the fixed axis sizes (product {known}) do '
                     f'not divide the {n_devices} devices')
  sizes = [n_devices // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != n_devices:
    raise ValueError(f'config.mesh {mesh_config} needs {int(np.prod(sizes))} devices, '
                     f'but {n_devices} are available; use -1 for one axis to take the rest')
  return jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names),
                       devices=devices)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_axes(mesh) -> tuple[str, ...]:
  """Mesh axes the batch dimension is split over: all but the tensor-parallel `model` axis."""
  return tuple(name for name in mesh.axis_names if name != MODEL_AXIS)


def batch_shards(mesh) -> int:
  return int(np.prod([mesh.shape[name] for name in batch_axes(mesh)]))


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) dimension split over every mesh axis that is not a model axis."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def process_rows(mesh, global_batch_size: int) -> slice:
  """The rows of a global batch whose shards live on this process's devices.

  Every process must feed exactly these rows to `global_batch`. They form one contiguous block
  on the meshes `create_mesh` builds; anything else is refused rather than silently reordered.
  """
  if global_batch_size % batch_shards(mesh):
    raise ValueError(f'batch size {global_batch_size} is not divisible by the '
                     f'{batch_shards(mesh)} batch shards of the mesh {dict(mesh.shape)}')
  indices = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
  starts = sorted({idx[0].start or 0 for idx in indices.values()})
  stops = sorted({global_batch_size if idx[0].stop is None else idx[0].stop
                  for idx in indices.values()})
  start, stop = starts[0], stops[-1]
  covered = sum(b - a for a, b in zip(starts, stops))
  if covered != stop - start:
    raise ValueError(f'the devices of process {jax.process_index()} hold batch rows that are '
                     f'not one contiguous block ({list(zip(starts, stops))}); build the mesh '
                     'with sharding.create_mesh')
  return slice(start, stop)


def process_block(mesh, global_batch_size: int) -> tuple[int, int]:
  """(block index, number of blocks) of this process's rows: the loader's per-process slice."""
  rows = process_rows(mesh, global_batch_size)
  size = rows.stop - rows.start
  if rows.start % size:
    raise ValueError(f'process {jax.process_index()} holds rows {rows.start}:{rows.stop}, which '
                     'is not a whole block of the global batch')
  return rows.start // size, global_batch_size // size


def global_batch(batch: dict, mesh) -> dict:
  """Process-local numpy batch (this process's `process_rows`) -> global arrays sharded over the
  batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def prefetch_to_device(items, put, size: int = 2):
  """Yields (item, put(item)) with up to `size` further items already put: their host-to-device
  copies are dispatched (asynchronously) while the current step runs, so a step never waits for
  its batch's transfer. The order is unchanged; nothing is read past what the caller takes plus
  `size` (the training data is a function of the step, so resuming is unaffected)."""
  queue = collections.deque()
  for item in items:
    queue.append((item, put(item)))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


# ----------------------------------------------------------------------------------------------
# State shardings from regex rules
# ----------------------------------------------------------------------------------------------

def path_name(path) -> str:
  """'/'-joined names of a jax key path (dict keys, attributes, sequence indices)."""
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return '/'.join(parts)


def _axis_size(mesh, axis: str) -> int:
  return int(mesh.shape[axis]) if axis in mesh.axis_names else 1


def spec_for(name: str, shape: tuple[int, ...], op: str, mesh, fsdp_min_size: int) -> P:
  """PartitionSpec of one array from its rule op (see the module docstring)."""
  spec: list = [None] * len(shape)
  for part in op.split('|'):
    part = part.strip()
    if part == 'replicate':
      continue
    if part == FSDP_AXIS:
      size = _axis_size(mesh, FSDP_AXIS)
      if size == 1 or int(np.prod(shape, dtype=np.int64)) < fsdp_min_size:
        continue
      free = [d for d in range(len(shape)) if spec[d] is None and shape[d] % size == 0]
      if free:  # the largest divisible dimension; the earliest among equals
        spec[max(free, key=lambda d: (shape[d], -d))] = FSDP_AXIS
      continue
    match = re.fullmatch(r'model:(-?\d+)', part)
    if not match:
      raise ValueError(f"sharding rule op {op!r} (for {name}): unknown part {part!r}; expected "
                       "'replicate', 'fsdp' or 'model:DIM', joined by '|'")
    size = _axis_size(mesh, MODEL_AXIS)
    if size == 1:
      continue
    dim = int(match.group(1))
    if not -len(shape) <= dim < len(shape):
      raise ValueError(f'sharding rule {op!r}: {name} has shape {shape}, no dimension {dim}')
    dim %= len(shape)
    if spec[dim] is not None or shape[dim] % size:
      raise ValueError(f'sharding rule {op!r}: dimension {dim} of {name} {shape} cannot be split '
                       f'over the model axis of size {size}; change the rule or the mesh')
    spec[dim] = MODEL_AXIS
  return P(*spec)


def state_shardings(abstract_state, rules, mesh, fsdp_min_size: int = 0):
  """NamedSharding tree for a (shape-only) train state from the regex rules."""
  rules = tuple((str(pattern), str(op)) for pattern, op in rules)

  def one(path, leaf):
    name = path_name(path)
    shape = tuple(getattr(leaf, 'shape', ()))
    if name.split('/')[0] in ALWAYS_REPLICATED or not shape:
      return replicated(mesh)
    for pattern, op in rules:
      if re.fullmatch(pattern, name):
        return NamedSharding(mesh, spec_for(name, shape, op, mesh, fsdp_min_size))
    raise ValueError(f'{name} matches no rule of config.sharding_rules {rules}; end the rules '
                     "with a catch-all ('.*', 'replicate')")

  return jax.tree_util.tree_map_with_path(one, abstract_state)
