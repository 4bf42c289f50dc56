"""Evaluation: encode each image once and every caption, similarities, the original's metrics.

Protocol: data_eval_spec.md section 3. The metric functions live in `aahr_jax.metrics` and are
re-exported here (`recall_metrics`, `coco_metrics`).
"""

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from aahr_jax import sharding
from aahr_jax.metrics import METRIC_KEYS, coco_metrics, fold_metrics, mean_metrics, recall_metrics  # noqa: F401
from input_pipeline import loader


def make_embed_fns(model, mesh):
  """Jitted image and caption embedding functions (eval mode), outputs gathered replicated."""
  out = sharding.replicated(mesh)

  def embed_images(variables, batch):
    return model.apply(variables, batch['regions'], batch['region_len'], batch['valid'],
                       method=model.embed_images)

  def embed_captions(variables, batch):
    return model.apply(variables, batch['bert_ids'], batch['bert_len'],
                       method=model.embed_captions)

  return (jax.jit(embed_images, out_shardings=out), jax.jit(embed_captions, out_shardings=out))


def _keep(batch: dict, keys) -> dict:
  return {k: batch[k] for k in keys}


def encode_split(model, variables, split: loader.SplitSource, *, mesh, batch_size: int,
                 text: loader.TextOptions, progress: bool = True):
  """Returns (image embeddings [n, D], caption embeddings [5n, D]) as float32 numpy."""
  embed_images, embed_captions = make_embed_fns(model, mesh)
  images, captions = [], []
  n_batches = -(-split.num_images // batch_size) + -(-split.num_captions // batch_size)
  done = 0
  start = time.time()
  for batch in loader.eval_image_batches(split, batch_size):
    valid = batch['valid']
    emb = embed_images(variables, sharding.global_batch(
        _keep(batch, ('regions', 'region_len', 'valid')), mesh))
    images.append(np.asarray(emb)[valid])
    done += 1
    if progress and done % 10 == 0:
      print(f'  encode: {done}/{n_batches} batches ({time.time() - start:.0f}s)',
            file=sys.stderr, flush=True)
  for batch in loader.eval_caption_batches(split, batch_size, text):
    valid = batch['valid']
    emb = embed_captions(variables, sharding.global_batch(
        _keep(batch, ('bert_ids', 'bert_len')), mesh))
    captions.append(np.asarray(emb)[valid])
    done += 1
    if progress and done % 10 == 0:
      print(f'  encode: {done}/{n_batches} batches ({time.time() - start:.0f}s)',
            file=sys.stderr, flush=True)
  return np.concatenate(images), np.concatenate(captions)


def similarities(image_embs: np.ndarray, caption_embs: np.ndarray) -> np.ndarray:
  """S = V T^T (plain dot product; AAHR's fused embeddings are not unit length)."""
  return np.asarray(jnp.matmul(jnp.asarray(image_embs), jnp.asarray(caption_embs).T,
                               precision=jax.lax.Precision.HIGHEST))


def metrics_for_protocol(sims: np.ndarray, protocol: str) -> dict:
  """{'all': metrics of the full matrix, and for COCO 'folds': [5 dicts], 'fold_mean': dict}."""
  if protocol == 'single':
    return {'all': recall_metrics(sims)}
  if protocol == 'coco':
    folds = fold_metrics(sims, 5)
    return {'all': recall_metrics(sims), 'folds': folds, 'fold_mean': mean_metrics(folds)}
  raise ValueError(f"config.eval.protocol = {protocol!r}; expected 'single' or 'coco'")


def _block(m: dict) -> list[str]:
  return [f'rsum: {m["rsum"]:.1f}',
          'Image to text (R@1, R@5, R@10): '
          f'{m["i2t_r1"]:.1f} {m["i2t_r5"]:.1f} {m["i2t_r10"]:.1f}   '
          f'medr {m["i2t_medr"]:.1f} meanr {m["i2t_meanr"]:.1f}',
          'Text to image (R@1, R@5, R@10): '
          f'{m["t2i_r1"]:.1f} {m["t2i_r5"]:.1f} {m["t2i_r10"]:.1f}   '
          f'medr {m["t2i_medr"]:.1f} meanr {m["t2i_meanr"]:.1f}']


def format_results(results: dict, header: dict) -> str:
  """The table in the original's order (COCO: 5K block, folds, 1K mean)."""
  lines = [f'Split: {header["split"]}   Images: {header["images"]}, '
           f'Captions: {header["captions"]}',
           f'Checkpoint: {header.get("checkpoint", "-")}   '
           f'Selection split: {header.get("selection_split", "-")}']
  lines += _block(results['all'])
  if 'folds' in results:
    lines.append('Start evaluation on 5-fold 1K for MSCOCO.')
    for f, m in enumerate(results['folds']):
      lines.append(f'Fold {f}: Image to text: {m["i2t_r1"]:.1f}, {m["i2t_r5"]:.1f}, '
                   f'{m["i2t_r10"]:.1f}   Text to image: {m["t2i_r1"]:.1f}, {m["t2i_r5"]:.1f}, '
                   f'{m["t2i_r10"]:.1f}')
    lines.append('-' * 60)
    lines.append('Mean metrics: ')
    lines += _block(results['fold_mean'])
  return '\n'.join(lines)


def evaluate(model, variables, split: loader.SplitSource, *, split_name: str, mesh,
             batch_size: int, text: loader.TextOptions, protocol: str, workdir: str | None,
             header_extra: dict | None = None) -> dict:
  """Encodes, scores, prints the table and writes eval/<split>.json (process 0)."""
  start = time.time()
  image_embs, caption_embs = encode_split(model, variables, split, mesh=mesh,
                                          batch_size=batch_size, text=text)
  sims = similarities(image_embs, caption_embs)
  results = metrics_for_protocol(sims, protocol)
  header = {'split': split_name, 'images': int(image_embs.shape[0]),
            'captions': int(caption_embs.shape[0]), **(header_extra or {})}
  print(format_results(results, header), flush=True)
  if workdir and jax.process_index() == 0:
    os.makedirs(os.path.join(workdir, 'eval'), exist_ok=True)
    with open(os.path.join(workdir, 'eval', f'{split_name}.json'), 'w', encoding='utf-8') as f:
      json.dump({**header, 'protocol': protocol, 'seconds': time.time() - start, **results}, f,
                indent=2)
  return results
