"""Reads a pickled `.npy` (an object array, as `np.save(path, {...})` writes) without running
code from it.

`np.load(allow_pickle=True)` unpickles with the standard unpickler, which calls whatever function
the file names (`os.system`, ...). Here the pickle may name only numpy's own array and scalar
reconstruction and `numpy.dtype`; everything else the file asks for is refused before anything
is called, naming it. What comes back is built from plain pickle values (dict, list, tuple, str,
bytes, numbers, None) and numpy arrays and scalars. A file can still ask for a lot of memory.
"""

from __future__ import annotations

import io
import pickle

import numpy as np
from numpy.lib import format as npy_format


class ForbiddenContentError(ValueError):
  """The file asks the unpickler for something other than numpy arrays, scalars and dtypes."""


class _NdarrayClass:
  """Stands for `numpy.ndarray` in the pickle: only an argument of `_reconstruct`, never called,
  so the file cannot construct arrays (or subclasses) any other way."""


_NDARRAY = _NdarrayClass()


def _reconstruct(subtype, shape, dtype):
  """numpy's `_reconstruct`, for plain ndarrays only (the file then sets their state)."""
  if subtype is not _NDARRAY:
    raise ForbiddenContentError(f'_reconstruct of {type(subtype).__name__}, not numpy.ndarray')
  # pylint: disable-next=protected-access
  return np._core.multiarray._reconstruct(np.ndarray, shape, dtype)


# (module, name) -> object, for numpy 1.x files (numpy.core) and numpy 2.x files (numpy._core).
_ALLOWED = {('numpy', 'ndarray'): _NDARRAY, ('numpy', 'dtype'): np.dtype}
for _module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
  _ALLOWED[(_module, '_reconstruct')] = _reconstruct
  _ALLOWED[(_module, 'scalar')] = np._core.multiarray.scalar  # pylint: disable=protected-access


class _NumpyOnlyUnpickler(pickle.Unpickler):

  def find_class(self, module, name):
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise ForbiddenContentError(f'{module}.{name}') from None

  def persistent_load(self, pid):
    raise ForbiddenContentError(f'a persistent object ({str(pid)[:60]})')


def load_object_npy(path: str):
  """The object stored in a `.npy` file: numeric arrays come back as they are; an object array
  (a 0-d one for `np.save(path, a_dict)`) is unpickled with the numpy-only unpickler.

  Raises ForbiddenContentError (naming what the file asked for) or ValueError (not a .npy file).
  """
  with open(path, 'rb') as f:
    try:
      version = npy_format.read_magic(f)
      if version == (1, 0):
        shape, _, dtype = npy_format.read_array_header_1_0(f)
      elif version == (2, 0):
        shape, _, dtype = npy_format.read_array_header_2_0(f)
      else:
        raise ValueError(f'.npy format version {version} (expected 1.0 or 2.0)')
    except ValueError as e:
      raise ValueError(f'not a .npy file ({e})') from None
    if not dtype.hasobject:
      f.seek(0)
      return np.load(f, allow_pickle=False)
    data = f.read()
  try:
    array = _NumpyOnlyUnpickler(io.BytesIO(data)).load()
  except ForbiddenContentError:
    raise
  except Exception as e:  # damaged pickles raise many types
    raise ValueError(f'a damaged pickle ({type(e).__name__}: {str(e)[:120]})') from None
  if not isinstance(array, np.ndarray) or array.shape != shape:
    raise ValueError(f'the pickle holds {type(array).__name__}, not the object array of shape '
                     f'{shape} that the header announces')
  return array
