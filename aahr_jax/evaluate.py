"""Evaluation: encode each image once and every caption, similarities, the original's metrics.

Protocol: docs/data.md section 3. The metric functions live in `aahr_jax.metrics` and are
re-exported here (`recall_metrics`, `coco_metrics`). The data pipeline (Grain) is imported only
by the functions that read a split, so scoring embeddings needs JAX and numpy alone (the GPU
benchmark machine has no Grain).
"""

from __future__ import annotations

import json
import os
import sys
import time
import typing

import jax
import jax.numpy as jnp
import numpy as np

from aahr_jax import best_record
from aahr_jax import blockwise_ranks
from aahr_jax import json_files
from aahr_jax import multi_positive_report
from aahr_jax import multihost
from aahr_jax import recall_plot
from aahr_jax import results_file
from aahr_jax import sharding
# Re-exported: the public metric API (`evaluate.recall_metrics`, `evaluate.coco_metrics`).
from aahr_jax.metrics import (METRIC_KEYS, coco_metrics, fold_metrics, i2t_ranks,  # noqa: F401
                              mean_metrics, metrics_from_ranks, recall_metrics, t2i_ranks)

if typing.TYPE_CHECKING:
  from input_pipeline import loader


def make_embed_fns(model, mesh):
  """Jitted image and caption embedding functions (eval mode), outputs gathered replicated."""
  out = sharding.replicated(mesh)

  # Models with a CLIP branch (AAHR) take the frozen CLIP features as a third input; their
  # caption embeddings also depend on the batch's longest *valid* caption (quirk Q20).
  def embed_images(variables, batch):
    if 'clip_image' in batch:
      return model.apply(variables, batch['regions'], batch['region_len'], batch['clip_image'],
                         batch['valid'], method=model.embed_images)
    return model.apply(variables, batch['regions'], batch['region_len'], batch['valid'],
                       method=model.embed_images)

  def embed_captions(variables, batch):
    if 'clip_text' in batch:
      return model.apply(variables, batch['bert_ids'], batch['bert_len'], batch['clip_text'],
                         batch['valid'], method=model.embed_captions)
    return model.apply(variables, batch['bert_ids'], batch['bert_len'],
                       method=model.embed_captions)

  return (jax.jit(embed_images, out_shardings=out), jax.jit(embed_captions, out_shardings=out))


def _keep(batch: dict, keys, rows: slice = slice(None)) -> dict:
  return {k: batch[k][rows] for k in keys if k in batch}


def encode_split(model, variables, split: loader.SplitSource, *, mesh, batch_size: int,
                 text: loader.TextOptions, progress: bool = True):
  """Returns (image embeddings [n, D], caption embeddings [5n, D]) as float32 numpy.

  Every process walks the same global batches (the last one padded with valid=False rows, so all
  run the same number of steps), feeds the rows its devices hold, gets the embeddings of the
  whole batch back (replicated) and drops the padding with the global mask.
  """
  from input_pipeline import loader  # pylint: disable=import-outside-toplevel,redefined-outer-name
  embed_images, embed_captions = make_embed_fns(model, mesh)
  rows = sharding.process_rows(mesh, batch_size)
  n_batches = -(-split.num_images // batch_size) + -(-split.num_captions // batch_size)
  done = 0
  start = time.time()

  def encode(batches, embed, keys) -> np.ndarray:
    nonlocal done
    out = []
    for batch in batches:
      emb = embed(variables, sharding.global_batch(_keep(batch, keys, rows), mesh))
      out.append(np.asarray(emb)[batch['valid']])
      done += 1
      if progress and done % 10 == 0:
        print(f'  encode: {done}/{n_batches} batches ({time.time() - start:.0f}s)',
              file=sys.stderr, flush=True)
    return np.concatenate(out)

  images = encode(loader.eval_image_batches(split, batch_size), embed_images,
                  ('regions', 'region_len', 'valid', 'clip_image'))
  captions = encode(loader.eval_caption_batches(split, batch_size, text), embed_captions,
                    ('bert_ids', 'bert_len', 'valid', 'clip_text'))
  return images, captions


def similarities(image_embs: np.ndarray, caption_embs: np.ndarray) -> np.ndarray:
  """S = V T^T (plain dot product; AAHR's fused embeddings are not unit length), as a host
  float64 matrix from the evaluator's own tiles (the values written to results_*.npy)."""
  return blockwise_ranks.TiledScores(image_embs, caption_embs).matrix()


PROTOCOL_SEGMENTS = {'single': 1, 'coco': 5}
RECALL_CURVE_MAX_K = 100


def _segments(protocol: str) -> int:
  if protocol not in PROTOCOL_SEGMENTS:
    raise ValueError(f"config.eval.protocol = {protocol!r}; expected 'single' or 'coco'")
  return PROTOCOL_SEGMENTS[protocol]


def recall_curve(ranks_i2t: np.ndarray, ranks_t2i: np.ndarray) -> dict:
  """R@K for K = 1..min(100, candidates) in both directions (for the recall@K plot)."""
  top = min(RECALL_CURVE_MAX_K, len(ranks_t2i))
  ks = np.arange(1, top + 1)
  curve = lambda r: (100.0 * np.mean(np.asarray(r)[None, :] < ks[:, None], axis=1)).tolist()
  return {'k': ks.tolist(), 'i2t': curve(ranks_i2t), 't2i': curve(ranks_t2i)}


def _mean_curve(curves: list[dict]) -> dict:
  return {'k': curves[0]['k'], 'i2t': np.mean([c['i2t'] for c in curves], axis=0).tolist(),
          't2i': np.mean([c['t2i'] for c in curves], axis=0).tolist()}


def _block_results(ranks: blockwise_ranks.Ranks) -> dict:
  """Metrics of one block; tie-bound ones too when a tie touches a positive (docs/data.md 3.5)."""
  out = {'metrics': metrics_from_ranks(ranks.i2t, ranks.t2i), 'ties': ranks.ties,
         'curve': recall_curve(ranks.i2t, ranks.t2i)}
  if any(ranks.ties.values()):
    out['optimistic'] = metrics_from_ranks(ranks.i2t_optimistic, ranks.t2i_optimistic)
    out['pessimistic'] = metrics_from_ranks(ranks.i2t_pessimistic, ranks.t2i_pessimistic)
  return out


def results_from_scores(scores: blockwise_ranks.TiledScores, protocol: str) -> dict:
  """{'all': metrics of the full split, 'ties', 'curves'[, 'tie_bounds'], and for COCO 'folds':
  [5 dicts], 'fold_mean': dict} from one tiled pass (scores built with the protocol's segments)."""
  segments = _segments(protocol)
  if scores.segments != segments:
    raise ValueError(f'scores are tiled in {scores.segments} segments; protocol {protocol!r} '
                     f'needs {segments}')
  full = _block_results(scores.ranks())
  results = {'all': full['metrics'], 'ties': full['ties'], 'curves': {'all': full['curve']}}
  if 'pessimistic' in full:
    results['tie_bounds'] = {'all': {k: full[k] for k in ('optimistic', 'pessimistic')}}
  if segments > 1:
    folds = [_block_results(scores.ranks(f, f + 1)) for f in range(segments)]
    results['folds'] = [f['metrics'] for f in folds]
    results['fold_mean'] = mean_metrics(results['folds'])
    results['fold_ties'] = [f['ties'] for f in folds]
    results['curves']['fold_mean'] = _mean_curve([f['curve'] for f in folds])
  return results


def ensemble_embeddings(members: list[tuple[np.ndarray, np.ndarray]]
                        ) -> tuple[np.ndarray, np.ndarray]:
  """Embeddings whose dot products are the mean of the members' similarity matrices:
  [V_1 .. V_K] [T_1 .. T_K]^T / K = mean_k V_k T_k^T (the originals' eval_ensemble averages the
  matrices; concatenating keeps the evaluation tiled instead of holding K matrices)."""
  if not members:
    raise ValueError('an ensemble needs at least one member')
  shapes = {(m[0].shape[0], m[1].shape[0]) for m in members}
  if len(shapes) != 1:
    raise ValueError(f'ensemble members embed different splits: (images, captions) {shapes}')
  if len(members) == 1:
    return members[0]
  images = np.concatenate([np.asarray(m[0], np.float32) for m in members], axis=1)
  captions = np.concatenate([np.asarray(m[1], np.float32) for m in members], axis=1)
  return images, captions / np.float32(len(members))


def metrics_from_embeddings(image_embs, caption_embs, protocol: str,
                            tile: int = blockwise_ranks.DEFAULT_TILE) -> tuple[dict, object]:
  """Fast mode: (results, the TiledScores, for exporting the matrix) from embeddings."""
  scores = blockwise_ranks.TiledScores(image_embs, caption_embs, segments=_segments(protocol),
                                       tile=tile)
  return results_from_scores(scores, protocol), scores


def metrics_for_protocol(sims: np.ndarray, protocol: str) -> dict:
  """Reference mode on a given matrix (host, the original's argsort rule on tied rows):
  {'all': metrics, 'ties', 'curves'; COCO also 'folds': [5 dicts], 'fold_mean': dict}."""
  segments = _segments(protocol)
  sims = np.asarray(sims)

  def block(matrix):
    i2t, i2t_tied = i2t_ranks(matrix)
    t2i, t2i_tied = t2i_ranks(matrix)
    return (metrics_from_ranks(i2t, t2i), {'i2t_tied': i2t_tied, 't2i_tied': t2i_tied},
            recall_curve(i2t, t2i))

  full, ties, curve = block(sims)
  results = {'all': full, 'ties': ties, 'curves': {'all': curve}}
  if segments > 1:
    n = sims.shape[0]
    if n % segments:
      raise ValueError(f'{n} images cannot be split into {segments} equal folds')
    m = n // segments
    folds = [block(sims[f * m:(f + 1) * m, 5 * f * m:5 * (f + 1) * m]) for f in range(segments)]
    results['folds'] = [f[0] for f in folds]
    results['fold_mean'] = mean_metrics(results['folds'])
    results['fold_ties'] = [f[1] for f in folds]
    results['curves']['fold_mean'] = _mean_curve([f[2] for f in folds])
  return results


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


def _format_ties(results: dict) -> list[str]:
  ties = results.get('ties', {})
  if not any(ties.values()):
    return []
  lines = [f'Ties touching a positive: {ties["i2t_tied"]} images (i2t), {ties["t2i_tied"]} '
           "captions (t2i); ranked inside the tie by the original's argsort order."]
  bounds = results.get('tie_bounds', {}).get('all')
  if bounds:
    lines.append(f'  rsum if ties rank optimistically: {bounds["optimistic"]["rsum"]:.1f}, '
                 f'pessimistically: {bounds["pessimistic"]["rsum"]:.1f}')
  return lines


def report(results: dict, header: dict, *, workdir: str | None, split_name: str,
           sims_matrix=None, dataset: str | None = None, tag: str = '') -> None:
  """Prints the table; writes eval/<split>.json, eval/<split>_recall.png and, given a matrix
  (a callable returning it, so it is built only here), results_<dataset>.npy (process 0).
  A `tag` (ensemble, clip_zeroshot, reference) goes into every name, eval/<split>_<tag>.json,
  ..., results_<dataset>_<tag>.npy, so that such evaluations never overwrite the model's own."""
  print(format_results(results, header), flush=True)
  for line in _format_ties(results):
    print(line, flush=True)
  if 'multi_positive' in results:  # after the recall table's tie lines, which belong to it
    print('\n'.join(multi_positive_report.format_block(results['multi_positive'])), flush=True)
  if not workdir or jax.process_index() != 0:
    return
  suffix = f'_{tag}' if tag else ''
  out_dir = os.path.join(workdir, 'eval')
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f'{split_name}{suffix}.json'), 'w', encoding='utf-8') as f:
    json.dump({**header, **results}, f, indent=2)
  recall_plot.draw(results['curves'], os.path.join(out_dir, f'{split_name}{suffix}_recall.png'),
                   title=f'{header.get("checkpoint", "")} on {split_name}: recall@K')
  if 'multi_positive' in results:
    multi_positive_report.draw(
        results['multi_positive'], os.path.join(out_dir, f'{split_name}{suffix}_multi_positive.png'),
        title=f'{header.get("checkpoint", "")} on {split_name}: multi-positive metrics')
    multi_positive_report.write_tensorboard(results['multi_positive'], workdir,
                                            f'{split_name}{suffix}')
  if sims_matrix is not None:
    path = os.path.join(workdir, results_file.file_name(f'{dataset or split_name}{suffix}'))
    print(f'Save the similarity into {path}', flush=True)
    results_file.write(path, sims_matrix())


def evaluate_embeddings(image_embs, caption_embs, *, split_name: str, protocol: str,
                        workdir: str | None, header_extra: dict | None = None,
                        save_sims: bool = False, dataset: str | None = None,
                        tile: int = blockwise_ranks.DEFAULT_TILE, tag: str = '',
                        ground_truth=None) -> dict:
  """Fast mode from embeddings: tiled scores and ranks, table, JSON, plot, optional npy (their
  names carry `tag`, see `report`); with a `multi_positive.GroundTruth`, its metrics too."""
  start = time.time()
  results, scores = metrics_from_embeddings(image_embs, caption_embs, protocol, tile)
  if ground_truth is not None:
    results['multi_positive'] = ground_truth.evaluate(scores)
  header = {'split': split_name, 'images': int(scores.num_images),
            'captions': int(5 * scores.num_images), 'protocol': protocol, 'mode': 'fast',
            **(header_extra or {}), 'seconds': time.time() - start}
  report(results, header, workdir=workdir, split_name=split_name,
         sims_matrix=scores.matrix if save_sims else None, dataset=dataset, tag=tag)
  return results


def evaluate(model, variables, split: loader.SplitSource, *, split_name: str, mesh,
             batch_size: int, text: loader.TextOptions, protocol: str, workdir: str | None,
             header_extra: dict | None = None, save_sims: bool = False,
             dataset: str | None = None, ground_truth=None) -> dict:
  """Encodes, scores, prints the table and writes eval/<split>.json (process 0); with a
  `multi_positive.GroundTruth`, the multi-positive metrics too."""
  start = time.time()
  image_embs, caption_embs = encode_split(model, variables, split, mesh=mesh,
                                          batch_size=batch_size, text=text)
  extra = {**(header_extra or {}), 'encode_seconds': time.time() - start}
  return evaluate_embeddings(image_embs, caption_embs, split_name=split_name, protocol=protocol,
                             workdir=workdir, header_extra=extra, save_sims=save_sims,
                             dataset=dataset, ground_truth=ground_truth)


def evaluate_results_files(paths: list[str], *, protocol: str, workdir: str | None,
                           split_name: str, ground_truth=None) -> dict:
  """Reference mode: re-scores results_*.npy files (averaged when several: an ensemble) with
  the original procedure on the host (float64, argsort order inside ties); with a
  `multi_positive.GroundTruth`, the multi-positive metrics too."""
  start = time.time()
  sims = results_file.read_average(paths)
  results = metrics_for_protocol(sims, protocol)
  if ground_truth is not None:
    results['multi_positive'] = ground_truth.evaluate(sims)
  header = {'split': split_name, 'images': int(sims.shape[0]), 'captions': int(sims.shape[1]),
            'protocol': protocol, 'mode': 'reference', 'checkpoint': ' + '.join(paths),
            'seconds': time.time() - start}
  report(results, header, workdir=workdir, split_name=split_name, tag='reference')
  return results


# ----------------------------------------------------------------------------------------------
# Model selection during training and the best checkpoint (the trainer calls these)
# ----------------------------------------------------------------------------------------------

BEST_FILE = 'best.json'
SELECTION_LOG = os.path.join('eval', 'selection.jsonl')


def selection_split(config) -> str:
  """The split model selection uses: `config.eval.selection_split` 'dev' (default) or 'test'
  (the original's selection on the evaluation split, config.data.eval_split)."""
  choice = config.eval.get('selection_split', config.eval.get('select_split', 'dev'))
  if choice == 'dev':
    return 'dev'
  if choice == 'test':
    return config.data.eval_split
  raise ValueError(f"config.eval.selection_split = {choice!r}; expected 'dev' (selection on "
                   "the validation split) or 'test' (the original's selection on the test split)")


def selection_score(results: dict) -> float:
  """The selection criterion: rSum of the full selection split (as the originals)."""
  return float(results['all']['rsum'])


def validate(model, variables, split: loader.SplitSource, *, split_name: str, mesh,
             batch_size: int, text: loader.TextOptions, step: int,
             workdir: str | None) -> dict:
  """Training-time validation on the selection split ('single' protocol, as the originals):
  prints the original's lines plus the split, appends to eval/selection.jsonl, returns results."""
  image_embs, caption_embs = encode_split(model, variables, split, mesh=mesh,
                                          batch_size=batch_size, text=text, progress=False)
  results, _ = metrics_from_embeddings(image_embs, caption_embs, 'single')
  m = results['all']
  print(f'Image to text (R@1, R@5, R@10): {m["i2t_r1"]:.1f}, {m["i2t_r5"]:.1f}, '
        f'{m["i2t_r10"]:.1f}', flush=True)
  print(f'Text to image (R@1, R@5, R@10): {m["t2i_r1"]:.1f}, {m["t2i_r5"]:.1f}, '
        f'{m["t2i_r10"]:.1f}', flush=True)
  print(f'Current rsum is {m["rsum"]:.1f} (step {step}, selection on {split_name})', flush=True)
  if workdir and jax.process_index() == 0:
    os.makedirs(os.path.join(workdir, 'eval'), exist_ok=True)
    with open(os.path.join(workdir, SELECTION_LOG), 'a', encoding='utf-8') as f:
      f.write(json.dumps({'step': int(step), 'selection_split': split_name,
                          'rsum': selection_score(results), 'ties': results['ties'], **m}) + '\n')
  return results


def read_best(workdir: str) -> dict | None:
  """best.json of a workdir: {'step', 'rsum', 'selection_split', 'metrics'}, or None."""
  path = os.path.join(workdir, BEST_FILE)
  if not os.path.isfile(path):
    return None
  try:
    return json_files.read(path, 'rebuilding it from best/')
  except json_files.DamagedFile as e:
    return best_record.rebuild(workdir, path, e)


def update_best(workdir: str, step: int, results: dict, split_name: str) -> bool:
  """Records `step` in best.json if its selection score beats the recorded one (process 0
  writes). Returns True when it is the new best: the trainer must then keep that checkpoint."""
  best = read_best(workdir)
  # Every process must take the same decision (the best checkpoint is saved collectively):
  # all read best.json before process 0 may rewrite it.
  multihost.sync(f'best:{step}')
  score = selection_score(results)
  if best is not None and best['selection_split'] != split_name:
    raise ValueError(f'{os.path.join(workdir, BEST_FILE)} selected on '
                     f'{best["selection_split"]!r}, this run on {split_name!r}; use a new '
                     'workdir or the same config.eval.selection_split')
  if best is not None and score <= best['rsum']:
    return False
  if jax.process_index() == 0:
    path = os.path.join(workdir, BEST_FILE)
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
      json.dump({'step': int(step), 'rsum': score, 'selection_split': split_name,
                 'metrics': results['all']}, f, indent=2)
    os.replace(path + '.tmp', path)  # atomic: a crash never leaves a half-written best.json
  return True


def default_checkpoint(workdir: str, which: str | None) -> str | None:
  """What `--mode eval` evaluates: the named checkpoint, else the best (best.json), else None
  (the latest). 'best' names it explicitly."""
  if which not in (None, '', 'best'):
    return which
  best = read_best(workdir)
  if best is None:
    if which == 'best':
      raise FileNotFoundError(f'{os.path.join(workdir, BEST_FILE)} not found: no model selection '
                              'was recorded; pass --checkpoint STEP or latest')
    return None
  return str(best['step'])
