"""Text-to-image search over an evaluation split: an index of image embeddings built once per
workdir, and queries embedded with `Retriever.embed_texts`.

  python main.py --mode search --workdir runs/demo --query "two dogs on a beach" [--top_k 10]

The index lives in `<workdir>/index/`:
  <split>_images.npy  float32 [n_images, D]: the model's image embeddings (the .npy export)
  <split>_images.json image ids and file names (row i = image i of the split), the checkpoint,
                      and the normalisation state (`normalized`: every row unit length, with the
                      norm range; AAHR's fused embeddings are not, and are never re-normalised:
                      scores are the evaluator's plain dot products).
"""

import json
import os

import numpy as np

from aahr_jax import json_files
from input_pipeline import datasets
from input_pipeline import loader

INDEX_DIR = 'index'
UNIT_NORM_TOLERANCE = 1e-3


def index_paths(workdir: str, split: str) -> tuple[str, str]:
  folder = os.path.join(workdir, INDEX_DIR)
  return os.path.join(folder, f'{split}_images.npy'), os.path.join(folder, f'{split}_images.json')


def _text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def normalisation_state(embeddings: np.ndarray) -> dict:
  norms = np.linalg.norm(np.asarray(embeddings, np.float64), axis=1)
  if not norms.size:
    return {'normalized': False, 'norm_min': None, 'norm_max': None,
            'similarity': 'dot product (not re-normalised)'}
  return {'normalized': bool(np.all(np.abs(norms - 1) < UNIT_NORM_TOLERANCE)),
          'norm_min': float(norms.min()), 'norm_max': float(norms.max()),
          'similarity': 'dot product (not re-normalised)'}


def export_embeddings(path: str, embeddings: np.ndarray, metadata: dict) -> None:
  """`path` (.npy, float32) and `path` with .json: the metadata plus the normalisation state."""
  embeddings = np.asarray(embeddings, np.float32)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.save(path, embeddings)
  meta = {**metadata, 'shape': list(embeddings.shape), 'dtype': 'float32',
          **normalisation_state(embeddings)}
  with open(os.path.splitext(path)[0] + '.json', 'w', encoding='utf-8') as f:
    json.dump(meta, f, indent=2)


def build_index(retriever, config, workdir: str, split_name: str, batch_size: int = 64) -> dict:
  """Embeds every image of the split once and writes the index; returns its metadata."""
  builder = datasets.build(config, workdir)
  split = datasets.open_split(builder, split_name)
  embeddings, ids, files = [], [], []
  for batch in loader.eval_image_batches(split, batch_size):
    valid = batch['valid']
    clip = batch['clip_image'][valid] if 'clip_image' in batch else None
    embeddings.append(retriever.embed_images(batch['regions'][valid],
                                             batch['region_len'][valid], clip))
  for i in range(split.num_images):
    example = split.image(i)
    ids.append(int(example['image_id']))
    files.append(_text(example.get('image_file', example.get('image_path', b''))))
  images_path, meta_path = index_paths(workdir, split_name)
  export_embeddings(images_path, np.concatenate(embeddings),
                    {'split': split_name, 'num_images': split.num_images,
                     'checkpoint': retriever.source, 'image_ids': ids, 'image_files': files})
  with open(meta_path, encoding='utf-8') as f:
    return json.load(f)


def load_index(workdir: str, split_name: str) -> tuple[np.ndarray, dict] | None:
  images_path, meta_path = index_paths(workdir, split_name)
  if not (os.path.isfile(images_path) and os.path.isfile(meta_path)):
    return None
  try:
    meta = json_files.read(meta_path, 'building the index again')
  except json_files.DamagedFile as e:  # rebuilt from the checkpoint by open_index
    print(f'{str(e).split("; ")[0]}: building the index again.', flush=True)
    return None
  try:
    return np.load(images_path, allow_pickle=False), meta   # a pickled file would run code
  except ValueError as e:
    raise ValueError(f'{images_path}: not a float array of image embeddings ({e}); delete it '
                     'and the search rebuilds the index') from None


def open_index(retriever, config, workdir: str, split_name: str) -> tuple[np.ndarray, dict]:
  """The stored index if it was built from the same checkpoint, else a fresh one."""
  found = load_index(workdir, split_name)
  if found is not None and found[1].get('checkpoint') == retriever.source:
    return found
  print(f'Building the search index of {split_name} ({retriever.source}) ...', flush=True)
  build_index(retriever, config, workdir, split_name)
  return load_index(workdir, split_name)


def top_k(image_embeddings: np.ndarray, query_embeddings: np.ndarray, k: int) -> tuple[
    np.ndarray, np.ndarray]:
  """(indices [Q, k], scores [Q, k]) of the best images per query, highest score first."""
  scores = np.asarray(query_embeddings, np.float32) @ np.asarray(image_embeddings, np.float32).T
  k = min(k, scores.shape[1])
  best = np.argsort(-scores, axis=1, kind='stable')[:, :k]
  return best, np.take_along_axis(scores, best, axis=1)


def format_hits(query: str, meta: dict, indices: np.ndarray, scores: np.ndarray) -> str:
  lines = [f'Query: {query!r} over {meta["num_images"]} images of {meta["split"]} '
           f'({meta["checkpoint"]})']
  for rank, (i, score) in enumerate(zip(indices, scores), start=1):
    name = meta['image_files'][i] or '-'
    lines.append(f'{rank:3d}. score {score:.4f}  image {i}  id {meta["image_ids"][i]}  {name}')
  return '\n'.join(lines)
