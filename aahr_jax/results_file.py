"""`results_<dataset>.npy`: the originals' similarity file (docs/data.md 3.4).

`np.save(path, {'npts': n, 'sims': S})`: a pickled 0-d object array holding a dict, `npts` the
number of images (Python int), `sims` float64 [npts, 5 * npts] (rows images in split order,
columns captions in file order). VSE-infinity's and AAHR's `eval_ensemble` and AAHR's
`eccv_caption_test.py` read it; so does `--mode eval --results a.npy[,b.npy]` here, with an
unpickler that builds only numbers and numpy arrays (numpy_pickle.py): a shared file cannot run
code.
"""

import os

import numpy as np

from aahr_jax import numpy_pickle


def file_name(dataset: str) -> str:
  return f'results_{dataset}.npy'


def write(path: str, sims: np.ndarray) -> None:
  sims = np.asarray(sims, np.float64)
  if sims.ndim != 2 or sims.shape[1] != 5 * sims.shape[0]:
    raise ValueError(f'{path}: sims must be [npts, 5 * npts], got {sims.shape}')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.save(path, {'npts': int(sims.shape[0]), 'sims': sims})


def read(path: str) -> np.ndarray:
  """The float64 [npts, 5 * npts] matrix of one file, checked against its `npts`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'results file not found: {path} (expected a results_<dataset>.npy '
                            'written by evalrank(..., save=True) or --config.eval.save_sims=True)')
  try:
    content = numpy_pickle.load_object_npy(path)
  except numpy_pickle.ForbiddenContentError as e:
    raise numpy_pickle.ForbiddenContentError(
        f'{path} refused: it asks the unpickler for {e}, but a results file holds only numbers '
        'and numpy arrays (a pickle that calls other things can run any code); re-save the '
        "matrix as np.save(path, {'npts': n, 'sims': sims})") from None
  except (OSError, ValueError) as e:
    raise ValueError(f'{path}: not a readable .npy file ({e})') from e
  content = content.item() if content.shape == () and content.dtype.hasobject else content
  if not isinstance(content, dict) or not {'npts', 'sims'} <= set(content):
    raise ValueError(f"{path}: expected the dict {{'npts', 'sims'}} of the original evaluators, "
                     f'got {type(content).__name__}')
  npts, sims = content['npts'], content['sims']
  if not (isinstance(npts, (int, np.integer)) and isinstance(sims, np.ndarray)
          and sims.dtype.kind in 'fiu'):
    raise ValueError(f"{path}: expected 'npts' an integer and 'sims' a numeric array, got "
                     f'{type(npts).__name__} and {type(sims).__name__} '
                     f"{getattr(sims, 'dtype', '')}".rstrip())
  npts, sims = int(npts), sims.astype(np.float64)
  if sims.shape != (npts, 5 * npts):
    raise ValueError(f'{path}: sims has shape {sims.shape}, but npts = {npts} needs '
                     f'({npts}, {5 * npts})')
  return sims


def read_average(paths: list[str]) -> np.ndarray:
  """Mean of the files' matrices (the originals' `eval_ensemble`); all must have the same npts."""
  if not paths:
    raise ValueError('no results file given')
  total = read(paths[0])
  for path in paths[1:]:
    sims = read(path)
    if sims.shape != total.shape:
      raise ValueError(f'{path}: npts {sims.shape[0]} differs from {paths[0]}: '
                       f'{total.shape[0]}; an ensemble needs matrices of the same split')
    total += sims
  return total / len(paths)
