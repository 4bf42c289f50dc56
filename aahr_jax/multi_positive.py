"""Retrieval scored against every true match: ECCV Caption, CxC and PMRP on COCO 5K, and the
synthetic world's exact positive sets (docs/evaluation.md).

The protocol's R@K counts one positive per caption. Here each query has a set of positives and
the metrics come from the `eccv-caption` library (Chun et al., ECCV 2022), called on ranked
lists built from the same similarity matrix:

  mAP@R, R-Precision, R@1   ECCV Caption positives (COCO), or the exact positive sets of the
                            synthetic world fed to the library as its ECCV ground truth
  CxC R@1/5/10              CrissCrossed Captions positives (COCO)
  PMRP                      plausible-match R-Precision (COCO, when eval.pmrp_dir holds its files)

Ranked lists hold only the top `depth` items of each query, depth = the largest positive set of
the direction (the library reads positions up to R - 1). Their order is the recall protocol's:
by score, and where exact ties touch the list, the original evaluators' `np.argsort(row)[::-1]`
order of the full row (those rows only; counted like the recall protocol's ties).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import io
import json
import os
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from aahr_jax import blockwise_ranks

LIBRARY = 'eccv-caption 0.1.0'
CXC_KS = (1, 5, 10)
PM_FILES = ('pm_image_to_caption.json', 'pm_caption_to_image.json')
_ROWS = 256  # host matrix rows ranked at once: bounds the float64 copy and argpartition's indices
DIRECTIONS = ('i2t', 't2i')
# (result key, ECCV library key, printed label)
ECCV_METRICS = (('map_at_r', 'eccv_map_at_r', 'mAP@R'), ('r_precision', 'eccv_rprecision', 'R-P'),
                ('r1', 'eccv_r1', 'R@1'))


class MultiPositiveError(ValueError):
  """A multi-positive evaluation that cannot be done as configured (one line for the user)."""


def library():
  """The eccv_caption package (imported on use: only the multi-positive metrics need it)."""
  try:
    with warnings.catch_warnings():  # it warns when the optional ujson is missing
      warnings.simplefilter('ignore')
      import eccv_caption  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise MultiPositiveError(
        f'the multi-positive metrics need {LIBRARY}: pip install eccv-caption==0.1.0 (it is in '
        'requirements.txt), or set --config.eval.eccv=False') from None
  return eccv_caption


# ----------------------------------------------------------------------------------------------
# Ranked lists, top `depth` per query
# ----------------------------------------------------------------------------------------------

def _settle_ties(top: np.ndarray, values: np.ndarray, full_row, depth: int
                 ) -> tuple[np.ndarray, int]:
  """Lists from the k = depth + 1 best (indices and scores, sorted best first): a row with an
  exact tie among them (one across the list's end included) takes the first k of the
  original's `np.argsort(row)[::-1]` over its whole float64 row, `full_row(r)`."""
  tied = np.flatnonzero(np.any(values[:, 1:] == values[:, :-1], axis=1))
  for r in tied:
    top[r] = np.argsort(full_row(r))[::-1][:top.shape[1]]
  return top[:, :depth], len(tied)


def _matrix_lists(matrix: np.ndarray, depth: int) -> tuple[np.ndarray, int]:
  """Lists of every row of a host matrix (float64 throughout, as the reference recalls)."""
  k = min(depth + 1, matrix.shape[1])
  lists, tied = [], 0
  for start in range(0, matrix.shape[0], _ROWS):
    block = np.asarray(matrix[start:start + _ROWS], np.float64)
    top = np.argpartition(-block, k - 1, axis=1)[:, :k]
    values = np.take_along_axis(block, top, axis=1)
    order = np.argsort(-values, axis=1, kind='stable')
    idx, t = _settle_ties(np.take_along_axis(top, order, axis=1),
                          np.take_along_axis(values, order, axis=1), lambda r: block[r], depth)
    lists.append(idx)
    tied += t
  return np.concatenate(lists), tied


@jax.jit
def _stripe(tiles: tuple):
  """One image tile's row of tiles: [tile images, all padded captions]."""
  return jnp.concatenate(tiles, axis=1)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _stripe_tops(tiles: tuple, caption_bias, image_bias, k_i2t: int, k_t2i: int):
  """From one image stripe: each image's k_i2t best captions, and each caption's k_t2i best
  images of this stripe (padding, bias -inf, excluded); (values, indices) pairs."""
  stripe = _stripe(tiles)
  return (jax.lax.top_k(stripe + caption_bias[None, :], k_i2t),
          jax.lax.top_k(stripe.T + image_bias[None, :], k_t2i))


def _real_index(valid: np.ndarray, positions: np.ndarray) -> np.ndarray:
  real = np.full(len(valid), -1, np.int64)  # padded position -> real index
  real[positions] = np.arange(len(positions))
  return real


def _tiled_lists(scores: blockwise_ranks.TiledScores, depth: dict) -> tuple[dict, dict]:
  """Both directions' lists from the evaluator's tiles (the exported matrix's values) in one
  pass over the image stripes (each tile computed once): an image's list from its stripe, a
  caption's from the best of each stripe, merged. Tied queries take their full row: an image's
  from its stripe, a caption's from its column of tiles (computed again for those only)."""
  tile, cap = scores.tile, blockwise_ranks.CAPTIONS
  k = {'i2t': min(depth['i2t'] + 1, len(scores.caption_cols)),
       't2i': min(depth['t2i'] + 1, len(scores.image_rows))}
  per_stripe = min(k['t2i'], tile)
  real_caption = _real_index(scores.caption_valid, scores.caption_cols)
  real_image = _real_index(scores.image_valid, scores.image_rows)
  caption_bias = jnp.asarray(np.where(scores.caption_valid, 0.0, -np.inf), jnp.float32)
  image_lists, image_tied = [], 0
  caption_values, caption_top = [], []
  for a in range(scores.num_tiles):
    tiles = tuple(scores.tile_scores(a, b) for b in range(scores.num_tiles))
    image_valid = scores.image_valid[a * tile:(a + 1) * tile]
    image_bias = jnp.asarray(np.where(image_valid, 0.0, -np.inf), jnp.float32)
    (values, top), (c_values, c_top) = jax.device_get(
        _stripe_tops(tiles, caption_bias, image_bias, k['i2t'], per_stripe))
    caption_values.append(c_values)
    caption_top.append(c_top + a * tile)
    rows = np.flatnonzero(image_valid)
    stripe = []  # computed again only for a stripe with a tied image (100 MB at COCO 5K)

    def full_row(r, tiles=tiles, rows=rows, stripe=stripe):
      if not stripe:
        stripe.append(np.asarray(_stripe(tiles)))
      return stripe[0][rows[r]][scores.caption_valid].astype(np.float64)

    idx, t = _settle_ties(real_caption[top[image_valid]], values[image_valid], full_row,
                          depth['i2t'])
    image_lists.append(idx)
    image_tied += t
  # Captions: the best k of the stripes' best, in caption order (padded columns dropped).
  values = np.concatenate(caption_values, axis=1)[scores.caption_cols]
  top = np.concatenate(caption_top, axis=1)[scores.caption_cols]
  order = np.argsort(-values, axis=1, kind='stable')[:, :k['t2i']]
  values, top = np.take_along_axis(values, order, 1), np.take_along_axis(top, order, 1)
  columns = {}

  def full_column(c):
    b = scores.caption_cols[c] // (cap * tile)
    if b not in columns:  # every caption of tile b at once; captions of other tiles dropped
      columns.clear()
      columns[b] = np.concatenate([np.asarray(scores.tile_scores(a, b))[
          scores.image_valid[a * tile:(a + 1) * tile]] for a in range(scores.num_tiles)], 0)
    return columns[b][:, scores.caption_cols[c] - b * cap * tile].astype(np.float64)

  caption_lists, caption_tied = _settle_ties(real_image[top], values, full_column, depth['t2i'])
  return ({'i2t': np.concatenate(image_lists), 't2i': caption_lists},
          {'i2t_tied': image_tied, 't2i_tied': caption_tied})


def ranked_lists(scores, depth: dict) -> tuple[dict, dict]:
  """Ranked lists of every query, {'i2t': [images, depth['i2t']] caption indices, 't2i':
  [captions, depth['t2i']] image indices}, best first, from a host matrix [n, 5n] or a
  `blockwise_ranks.TiledScores`; and the number of queries per direction whose list needed the
  tie rule ({'i2t_tied', 't2i_tied'})."""
  if isinstance(scores, blockwise_ranks.TiledScores):
    return _tiled_lists(scores, depth)
  matrix = np.asarray(scores)
  i2t, i2t_tied = _matrix_lists(matrix, depth['i2t'])
  t2i, t2i_tied = _matrix_lists(matrix.T, depth['t2i'])
  return {'i2t': i2t, 't2i': t2i}, {'i2t_tied': i2t_tied, 't2i_tied': t2i_tied}


# ----------------------------------------------------------------------------------------------
# Ground truth and the library's metrics
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class GroundTruth:
  """The positives of one split, as ids the library knows, and which metric families apply.

  image_ids[i] names image row i, caption_ids[c] caption row c (c // 5 is its image row);
  `metrics` is an eccv_caption.Metrics whose ECCV (and for COCO CxC, PM) ground truth is set.
  """
  name: str
  image_ids: np.ndarray
  caption_ids: np.ndarray
  metrics: object
  families: tuple[str, ...]  # 'eccv' always; 'cxc', 'pmrp' on COCO
  checked: str               # what was verified about the ids (written with the results)

  def _gts(self):
    gts = [self.metrics.eccv_gts]
    if 'cxc' in self.families:
      gts.append(self.metrics.cxc_gts)
    if 'pmrp' in self.families:
      gts.append(self.metrics.pm_gts)
    return gts

  def depth(self, direction: str) -> int:
    """List length: the largest positive set of the direction (at least the largest CxC K)."""
    largest = max(len(set(v)) for g in self._gts() for v in g[direction].values())
    floor = max(CXC_KS) if 'cxc' in self.families else 1
    return max(largest, floor)

  def evaluate(self, scores) -> dict:
    """The metrics (percent) of a host matrix or TiledScores over this split."""
    start = time.time()
    n = len(self.image_ids)
    scored = (scores.num_images if isinstance(scores, blockwise_ranks.TiledScores)
              else np.shape(scores)[0])
    if scored != n:
      raise MultiPositiveError(f'the similarities cover {scored:,} images; the multi-positive '
                               f'ground truth ({self.name}) has {n:,}')
    candidates = {'i2t': len(self.caption_ids), 't2i': n}
    depth = {d: min(self.depth(d), candidates[d]) for d in DIRECTIONS}
    lists, ties = ranked_lists(scores, depth)
    retrieved = {
        'i2t': dict(zip(self.image_ids.tolist(), self.caption_ids[lists['i2t']].tolist())),
        't2i': dict(zip(self.caption_ids.tolist(), self.image_ids[lists['t2i']].tolist()))}
    listed = time.time()
    out = {}
    with contextlib.redirect_stderr(io.StringIO()):  # its ECCV loop draws an unconditional tqdm bar
      eccv = self.metrics.eccv_metrics(retrieved, 'all')
      for key, library_key, _ in ECCV_METRICS:
        for d in DIRECTIONS:
          out[f'{d}_{key}'] = 100.0 * float(eccv[library_key][d])
      if 'cxc' in self.families:
        for k in CXC_KS:
          recalls = self.metrics.cxc_recalls(retrieved, 'all', K=k)
          for d in DIRECTIONS:
            out[f'{d}_cxc_r{k}'] = 100.0 * float(recalls[d])
      if 'pmrp' in self.families:
        pmrp = self.metrics.pmrp(retrieved, 'all')
        for d in DIRECTIONS:
          out[f'{d}_pmrp'] = 100.0 * float(pmrp[d])
    return {'ground_truth': self.name, 'library': LIBRARY, 'metrics': out,
            'queries': {d: len(self.metrics.eccv_gts[d]) for d in DIRECTIONS},
            'depth': depth, 'ties': ties, 'checked': self.checked,
            'list_seconds': listed - start, 'library_seconds': time.time() - listed}


def coco_ground_truth(image_ids, *, pmrp_dir: str = '', source: str = 'testall_ids.txt'
                      ) -> GroundTruth:
  """ECCV Caption, CxC (and PMRP with `pmrp_dir`) for the COCO 5K test split, after checking
  that the precomp image order (`image_ids`, one per image row) is the library's."""
  eccv_caption = library()
  if pmrp_dir:
    for name in PM_FILES:
      if not os.path.isfile(os.path.join(pmrp_dir, name)):
        raise MultiPositiveError(f'config.eval.pmrp_dir={pmrp_dir}: {name} not found; download '
                                 'the two PM files named in docs/evaluation.md, or set '
                                 "--config.eval.pmrp_dir=''")
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    metrics = eccv_caption.Metrics(extra_file_dir=pmrp_dir or None)
  image_ids = np.asarray(image_ids, np.int64)
  caption_ids = np.asarray(metrics.coco_ids, np.int64)
  if 5 * len(image_ids) != len(caption_ids):
    raise MultiPositiveError(
        f'ECCV Caption scores the COCO 5K test split ({len(caption_ids) // 5:,} images); this '
        f'split has {len(image_ids):,}: evaluate --config.data.eval_split=testall, or set '
        '--config.eval.eccv=False')
  check_coco_alignment(image_ids, caption_ids, metrics.coco_gts['t2i'], source)
  families = ('eccv', 'cxc') + (('pmrp',) if pmrp_dir else ())
  return GroundTruth(
      name='ECCV Caption' + (', CxC and PMRP' if pmrp_dir else ' and CxC'),
      image_ids=image_ids, caption_ids=caption_ids, metrics=metrics, families=families,
      checked=(f'the image id of each of the {len(caption_ids):,} captions (library COCO ground '
               f'truth) equals {source}; the order of the 5 captions inside an image is assumed'))


def check_coco_alignment(image_ids: np.ndarray, caption_ids: np.ndarray, caption_to_image: dict,
                         source: str) -> None:
  """Refuses a precomp order whose image ids differ from the library's: caption row c holds
  library caption caption_ids[c], which must belong to image image_ids[c // 5]."""
  library_image = np.array([caption_to_image[int(c)][0] for c in caption_ids], np.int64)
  precomp_image = np.repeat(image_ids, 5)
  bad = np.flatnonzero(library_image != precomp_image)
  if bad.size:
    c = int(bad[0])
    raise MultiPositiveError(
        f'{source}: image row {c // 5} (caption row {c}) is image {precomp_image[c]}, but the '
        f'ECCV Caption COCO test order has image {library_image[c]} there (caption '
        f'{caption_ids[c]}); {bad.size:,} of {len(caption_ids):,} caption rows differ. The '
        'ECCV metrics need the Karpathy 5K test order; set --config.eval.eccv=False to skip them')


@functools.cache
def _packaged_metrics():
  """The package's Metrics with its own ground truth (read once per process: 0.3 s of JSON)."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    return library().Metrics()


def synthetic_ground_truth(truth: np.ndarray) -> GroundTruth:
  """The synthetic world's exact positives (`synthetic_oracle.truth_matrix`, [n, 5n]) as the
  library's ECCV ground truth (ids = row indices), through its own JSON reader."""
  truth = np.asarray(truth, bool)
  n = truth.shape[0]
  if truth.shape != (n, 5 * n) or not truth[np.arange(5 * n) // 5, np.arange(5 * n)].all():
    raise MultiPositiveError(f'truth matrix {truth.shape}: expected [n, 5n] with every caption '
                             'true of its own image')
  metrics = copy.copy(_packaged_metrics())  # the package's object; only its ECCV sets replaced
  with tempfile.TemporaryDirectory() as tmp:
    paths = [os.path.join(tmp, name) for name in ('i2t.json', 't2i.json')]
    for path, matrix in zip(paths, (truth, truth.T)):
      with open(path, 'w', encoding='utf-8') as f:
        json.dump({str(q): np.flatnonzero(row).tolist() for q, row in enumerate(matrix)}, f)
    metrics.set_eccv_gts(*paths)
  return GroundTruth(name='every true match of the synthetic world', image_ids=np.arange(n),
                     caption_ids=np.arange(5 * n), metrics=metrics, families=('eccv',),
                     checked='exact: the captions were replayed from the generator and match the split')


# ----------------------------------------------------------------------------------------------
# Which ground truth a run's evaluation split has
# ----------------------------------------------------------------------------------------------

def precomp_image_ids(split) -> np.ndarray:
  """The image id of every image row of a `loader.SplitSource` (from `<split>_ids.txt`)."""
  examples = getattr(split.source, 'source', split.source)  # skip the regions join
  return np.array([int(examples[i]['image_id']) for i in range(split.num_images)], np.int64)


def for_config(config, workdir: str, split_name: str, split=None) -> GroundTruth | None:
  """The multi-positive ground truth of the config's evaluation split, or None (with a note
  printed when the config asked for it): the synthetic world always, COCO `testall` when
  config.eval.eccv is set. `split` is the opened split (opened here when not given)."""
  name = config.data.name
  wants_coco = name == 'coco' and config.eval.get('eccv', False)
  if name != 'synthetic' and not wants_coco:
    return None
  if wants_coco and split_name != 'testall':
    print(f'ECCV Caption metrics skipped: they score COCO testall, not {split_name!r}.',
          flush=True)
    return None
  if split is None:
    from input_pipeline import datasets  # pylint: disable=import-outside-toplevel
    split = datasets.open_split(datasets.build(config, workdir), split_name)
  if wants_coco:
    return coco_ground_truth(precomp_image_ids(split), pmrp_dir=config.eval.get('pmrp_dir', ''),
                             source=f'{split_name}_ids.txt')
  return _synthetic_for_split(config, split_name, split)


def _synthetic_for_split(config, split_name: str, split) -> GroundTruth | None:
  from input_pipeline import synthetic  # pylint: disable=import-outside-toplevel
  from input_pipeline import synthetic_oracle  # pylint: disable=import-outside-toplevel
  syn = config.data.synthetic
  scenes, captions = synthetic.scenes(
      split_name, seed=syn.seed, region_dim=config.data.region_dim,
      splits={'train': syn.train, 'dev': syn.dev, 'test': syn.test})
  n = split.num_images
  if captions[:5 * n] != split.captions:
    print(f'Multi-positive metrics skipped: the {split_name} captions are not those of the '
          f'synthetic world config.data.synthetic describes (seed {syn.seed}).', flush=True)
    return None
  return synthetic_ground_truth(synthetic_oracle.truth_matrix(scenes[:n], captions[:5 * n]))
