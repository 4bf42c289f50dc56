"""How well can anyone retrieve on the synthetic world? The consistency oracle.

  python -m input_pipeline.synthetic_oracle [--split test] [--seed 0] [--region_dim 64]

Many captions are true of several images ("a red circle", "a blue box and a green star"), so
no model reaches rSum 600 there. The oracle reads every caption back into what it states
(objects with colour, shape and optional size; a spatial relation; or the full list of objects)
and knows every image's scene, so it knows the n_c images each caption c is true of. Its
similarity is the posterior of the image given the caption when every image a caption is true
of is equally likely to have produced it:

  S[i, c] = 1 / n_c if c is true of image i, else 0,

and it reports the protocol's recalls in expectation over a random order of tied scores:

  text to image: the caption's own image is among its n_c tied images: R@K = min(1, K / n_c);
  image to text: captions more specific than the image's most specific own caption come first,
                 then the tie at that score, in random order.

It is a reference, not a bound: a model may also learn which of the consistent images more
likely produced a caption (a scene of two objects says "a red circle" more often than one of
four), which the oracle ignores.
"""

import argparse
import itertools
import math
import re

import numpy as np

from input_pipeline import synthetic

_SIZE = {w: size for size, words in synthetic.SIZE_WORDS.items() for w in words}
_SHAPE = {w: shape for shape, words in synthetic.SHAPE_WORDS.items() for w in words}
_RELATION = {w: rel for rel, words in synthetic.REL_WORDS.items() for w in words}
_COUNT = {w: n for n, w in synthetic.COUNT_WORDS.items()}
_PHRASE = r'(?:\w+ )?\w+ \w+'
_REL = '|'.join(sorted(map(re.escape, _RELATION), key=len, reverse=True))
_FORMS = (
    ('statement', re.compile(rf'the ({_PHRASE}) is ({_REL}) the ({_PHRASE})')),
    ('relation', re.compile(rf'a ({_PHRASE}) ({_REL}) a ({_PHRASE})')),
    ('pair', re.compile(rf'a ({_PHRASE}) and a ({_PHRASE})')),
    ('partial', re.compile(rf'a ({_PHRASE})')),
)
_LIST = re.compile(r'(\w+) shapes : (.*)')
_OPENERS = sorted((o for o in synthetic.OPENERS if o), key=len, reverse=True)
RECALL_AT = (1, 5, 10)


def _phrase(text: str) -> dict:
  words = text.split()
  out = {'colour': words[-2], 'shape': _SHAPE.get(words[-1])}
  if len(words) == 3:
    out['size'] = _SIZE.get(words[0])
  if (out['colour'] not in synthetic.COLOURS or out['shape'] is None
      or out.get('size', '') is None):
    raise ValueError(f'not an object phrase: {text!r}')
  return out


def parse_caption(caption: str) -> dict:
  """{'kind', 'objects': [phrase dicts], 'relation': 'left'|'right'|'above'|'below'|None}."""
  text = caption.strip()
  text = text[:-2] if text.endswith(' .') else text
  text = text[:-len(' , again')] if text.endswith(' , again') else text
  listed = _LIST.fullmatch(text)
  if listed and listed[1] in _COUNT:
    items = re.split(r' , | and ', listed[2])
    if len(items) != _COUNT[listed[1]] or not all(i.startswith('a ') for i in items):
      raise ValueError(f'cannot read the list caption {caption!r}')
    return {'kind': 'list', 'objects': [_phrase(i[2:]) for i in items], 'relation': None}
  for opener in [''] + _OPENERS:
    if not text.startswith(opener):
      continue
    body = text[len(opener):]
    for kind, pattern in _FORMS:
      if kind == 'statement' and opener:
        continue
      match = pattern.fullmatch(body)
      if match is None:
        continue
      try:
        if kind in ('statement', 'relation'):
          return {'kind': kind, 'objects': [_phrase(match[1]), _phrase(match[3])],
                  'relation': _RELATION[match[2]]}
        return {'kind': kind, 'objects': [_phrase(g) for g in match.groups()], 'relation': None}
      except ValueError:
        continue
  raise ValueError(f'cannot read caption {caption!r} as any synthetic caption form')


def _matches(phrase: dict, obj: dict) -> bool:
  return all(obj[k] == v for k, v in phrase.items())


def _holds(relation: str, a: dict, b: dict) -> bool:
  return {'left': a['col'] < b['col'], 'right': a['col'] > b['col'],
          'above': a['row'] < b['row'], 'below': a['row'] > b['row']}[relation]


def is_true_of(parsed: dict, scene: list[dict]) -> bool:
  """Whether the caption's statement holds in the scene (distinct objects for distinct phrases)."""
  phrases = parsed['objects']
  if parsed['kind'] == 'list':
    return len(scene) == len(phrases) and any(
        all(_matches(p, o) for p, o in zip(phrases, order))
        for order in itertools.permutations(scene))
  for chosen in itertools.permutations(scene, len(phrases)):
    if all(_matches(p, o) for p, o in zip(phrases, chosen)) and (
        parsed['relation'] is None or _holds(parsed['relation'], *chosen)):
      return True
  return False


class _SceneArrays:
  """The scenes as padded [images, max objects] attribute arrays, so that one caption is checked
  against every scene at once (`is_true_of` per pair is far too slow for a whole test split)."""

  def __init__(self, scenes: list[list[dict]]):
    width = max(len(s) for s in scenes)
    self.count = np.array([len(s) for s in scenes])
    self.present = np.arange(width)[None, :] < self.count[:, None]
    self.attrs = {}
    for key, empty in (('colour', None), ('shape', None), ('size', None), ('row', -1),
                       ('col', -1)):
      column = np.full((len(scenes), width), empty, object if empty is None else np.int64)
      for i, scene in enumerate(scenes):
        column[i, :len(scene)] = [o[key] for o in scene]
      self.attrs[key] = column
    row, col = self.attrs['row'], self.attrs['col']
    self.relation = {  # [images, a, b]: the relation holds from object a to object b
        'left': col[:, :, None] < col[:, None, :], 'right': col[:, :, None] > col[:, None, :],
        'above': row[:, :, None] < row[:, None, :], 'below': row[:, :, None] > row[:, None, :]}
    self.distinct = (~np.eye(width, dtype=bool)[None] & self.present[:, :, None]
                     & self.present[:, None, :])

  def matches(self, phrase: dict) -> np.ndarray:
    """[images, objects]: the object fits the phrase."""
    out = self.present.copy()
    for k, v in phrase.items():
      out &= self.attrs[k] == v
    return out

  def true_of(self, parsed: dict) -> np.ndarray:
    """[images]: `is_true_of(parsed, scene)` for every scene."""
    found = [self.matches(p) for p in parsed['objects']]
    if parsed['kind'] == 'list':
      hit = np.zeros(len(self.count), bool)
      for order in itertools.permutations(range(len(found))):
        if max(order) < found[0].shape[1]:
          hit |= np.all([found[p][:, o] for p, o in enumerate(order)], axis=0)
      return hit & (self.count == len(found))
    if len(found) == 1:
      return found[0].any(axis=1)
    pairs = found[0][:, :, None] & found[1][:, None, :] & self.distinct
    if parsed['relation'] is not None:
      pairs &= self.relation[parsed['relation']]
    return pairs.any(axis=(1, 2))


def truth_matrix(scenes: list[list[dict]], captions: list[str]) -> np.ndarray:
  """[images, captions] bool: caption c is true of image i (`is_true_of`, all scenes at once)."""
  arrays = _SceneArrays(scenes)
  truth = np.zeros((len(scenes), len(captions)), bool)
  for c, caption in enumerate(captions):
    truth[:, c] = arrays.true_of(parse_caption(caption))
  return truth


def _miss_probability(n_items: int, n_marked: int, k: int) -> float:
  """P(no marked item among the first k of a random order of n_items, n_marked of them marked)."""
  if k <= 0:
    return 1.0
  if n_items - n_marked < k:
    return 0.0
  return math.comb(n_items - n_marked, k) / math.comb(n_items, k)


def oracle_recalls(truth: np.ndarray) -> dict:
  """Expected recalls (percent) of the consistency oracle; truth [n, 5n], caption c of image c//5."""
  n, m = truth.shape
  if m != 5 * n:
    raise ValueError(f'truth must be [n, 5n], got {truth.shape}')
  own_image = np.arange(m) // 5
  if not truth[own_image, np.arange(m)].all():
    raise ValueError('some caption is not true of its own image: the parser is out of date')
  per_caption = truth.sum(axis=0)  # n_c: images each caption is true of (its own included)
  out = {f'{d}_r{k}': 0.0 for d in ('i2t', 't2i') for k in RECALL_AT}
  for i in range(n):
    scores = np.where(truth[i], 1.0 / per_caption, 0.0)
    own = own_image == i
    best = scores[own].max()
    above = int(np.sum(scores > best))  # all non-own: `best` is the largest own score
    tied_own = int(np.sum(own & (scores == best)))
    tied = int(np.sum(scores == best))
    for k in RECALL_AT:
      out[f'i2t_r{k}'] += 1.0 - _miss_probability(tied, tied_own, k - above)
  for k in RECALL_AT:
    out[f'i2t_r{k}'] *= 100.0 / n
    out[f't2i_r{k}'] = 100.0 * float(np.mean(np.minimum(1.0, k / per_caption)))
  out['rsum'] = sum(out[f'{d}_r{k}'] for d in ('i2t', 't2i') for k in RECALL_AT)
  out['images'] = n
  out['mean_images_per_caption'] = float(per_caption.mean())
  out['captions_true_of_one_image'] = float(np.mean(per_caption == 1))
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--split', default='test')
  parser.add_argument('--seed', type=int, default=0, help='config.data.synthetic.seed')
  parser.add_argument('--region_dim', type=int, default=64, help='config.data.region_dim')
  parser.add_argument('--train', type=int, default=8000)
  parser.add_argument('--dev', type=int, default=500)
  parser.add_argument('--test', type=int, default=1000)
  args = parser.parse_args(argv)
  scenes, captions = synthetic.scenes(
      args.split, seed=args.seed, region_dim=args.region_dim,
      splits={'train': args.train, 'dev': args.dev, 'test': args.test})
  truth = truth_matrix(scenes, captions)
  r = oracle_recalls(truth)
  print(f'Consistency oracle, synthetic {args.split}: {r["images"]} images, '
        f'{5 * r["images"]} captions; a caption is true of {r["mean_images_per_caption"]:.1f} '
        f'images on average ({100 * r["captions_true_of_one_image"]:.1f}% of captions: one)')
  print(f'rsum: {r["rsum"]:.1f}')
  print('Image to text (R@1, R@5, R@10): ' + ' '.join(f'{r[f"i2t_r{k}"]:.1f}' for k in RECALL_AT))
  print('Text to image (R@1, R@5, R@10): ' + ' '.join(f'{r[f"t2i_r{k}"]:.1f}' for k in RECALL_AT))
  # Scored against every true match instead, the oracle ranks all of a query's positives
  # first (positive scores, all others 0): the ceiling of those metrics is 100.
  from aahr_jax import multi_positive  # pylint: disable=import-outside-toplevel
  from aahr_jax import multi_positive_report  # pylint: disable=import-outside-toplevel
  scores = truth / truth.sum(axis=0, keepdims=True)
  result = multi_positive.synthetic_ground_truth(truth).evaluate(scores)
  print('\n'.join(multi_positive_report.format_block(result)))


if __name__ == '__main__':
  main()
