"""The embedded synthetic dataset: a seeded, captioned world of coloured shapes.

Each image holds 2-4 objects (colour, shape, size, grid position). Five different captions per
image mix full relational descriptions ("a red circle left of a blue square") that need attribute
binding, object lists, positional phrases and partial descriptions that mention a single object
or attribute (ambiguous positives: they also fit other images). Every image is rendered to a JPEG
and described by 36 region-feature vectors standing in for BUTD features: one strong region per
object, weaker part regions (colour-only or shape-only crops), and background/distractor regions,
all with noise, in random order.

The output is written in the SCAN precomp layout (`{split}_ims.npy`, `{split}_caps.txt`,
`{split}_ids.txt`, `id_mapping.json`, `images/`), so the demo goes through the same reader as
Flickr30K/COCO. Row granularity follows the real files: `train` and `test` one row per image,
`dev` one row per caption (five identical copies), as in the F30K/COCO dev files.
"""

import json
import os
import shutil

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {'red': (220, 40, 40), 'green': (40, 170, 60), 'blue': (40, 80, 220),
           'yellow': (235, 210, 40), 'purple': (140, 50, 170), 'orange': (245, 140, 30),
           'white': (245, 245, 245), 'black': (20, 20, 20)}
SHAPES = ('circle', 'square', 'triangle', 'star', 'hexagon', 'diamond')
SHAPE_WORDS = {'circle': ('circle', 'disc'), 'square': ('square', 'box'),
               'triangle': ('triangle',), 'star': ('star',), 'hexagon': ('hexagon',),
               'diamond': ('diamond', 'rhombus')}
SIZES = ('small', 'large')
SIZE_WORDS = {'small': ('small', 'little', 'tiny'), 'large': ('large', 'big', 'huge')}
GRID = 3  # objects sit in distinct cells of a 3 x 3 grid
ROW_NAMES = ('top', 'middle', 'bottom')
COL_NAMES = ('left', 'centre', 'right')
REGIONS = 36
IMAGE_PIXELS = 96
OPENERS = ('', 'a picture of ', 'there is ', 'an image showing ', 'we can see ', 'a photo with ')
REL_WORDS = {'left': ('left of', 'to the left of', 'on the left of'),
             'right': ('right of', 'to the right of', 'on the right of'),
             'above': ('above', 'over'), 'below': ('below', 'under', 'beneath')}
COUNT_WORDS = {2: 'two', 3: 'three', 4: 'four'}
DEFAULT_SPLITS = {'train': 8000, 'dev': 500, 'test': 1000}
FEATURE_SEED = 1234  # the attribute codebooks are the same world for every split and seed


def _sample_scene(rng: np.random.Generator) -> list[dict]:
  n_objects = int(rng.integers(2, 5))
  cells = rng.choice(GRID * GRID, size=n_objects, replace=False)
  objects = []
  for cell in cells:
    objects.append({'colour': str(rng.choice(list(COLOURS))), 'shape': str(rng.choice(SHAPES)),
                    'size': str(rng.choice(SIZES)), 'row': int(cell // GRID),
                    'col': int(cell % GRID)})
  return objects


def _phrase(obj: dict, rng: np.random.Generator, with_size: bool | None = None) -> str:
  if with_size is None:
    with_size = rng.random() < 0.4
  words = []
  if with_size:
    words.append(str(rng.choice(SIZE_WORDS[obj['size']])))
  words.append(obj['colour'])
  words.append(str(rng.choice(SHAPE_WORDS[obj['shape']])))
  return ' '.join(words)


def _relation(a: dict, b: dict, rng: np.random.Generator) -> str | None:
  options = []
  if a['col'] < b['col']:
    options.append('left')
  if a['col'] > b['col']:
    options.append('right')
  if a['row'] < b['row']:
    options.append('above')
  if a['row'] > b['row']:
    options.append('below')
  if not options:
    return None
  return str(rng.choice(REL_WORDS[str(rng.choice(options))]))


def _caption(kind: str, objects: list[dict], rng: np.random.Generator) -> str:
  opener = str(rng.choice(OPENERS))
  if kind == 'relation':
    i, j = rng.choice(len(objects), size=2, replace=False)
    rel = _relation(objects[i], objects[j], rng)
    return f'{opener}a {_phrase(objects[i], rng)} {rel} a {_phrase(objects[j], rng)}'
  if kind == 'statement':
    i, j = rng.choice(len(objects), size=2, replace=False)
    rel = _relation(objects[i], objects[j], rng)
    return f'the {_phrase(objects[i], rng)} is {rel} the {_phrase(objects[j], rng)}'
  if kind == 'list':
    order = rng.permutation(len(objects))
    parts = [f'a {_phrase(objects[k], rng)}' for k in order]
    listing = ' , '.join(parts[:-1]) + ' and ' + parts[-1]
    return f'{COUNT_WORDS[len(objects)]} shapes : {listing}'
  if kind == 'pair':  # two objects, no relation: binding without spatial reasoning
    i, j = rng.choice(len(objects), size=2, replace=False)
    return f'{opener}a {_phrase(objects[i], rng)} and a {_phrase(objects[j], rng)}'
  if kind == 'position':
    obj = objects[int(rng.integers(len(objects)))]
    place = f'{ROW_NAMES[obj["row"]]} {COL_NAMES[obj["col"]]}'
    if place == 'middle centre':
      place = 'centre'
    return f'{opener}a {_phrase(obj, rng)} in the {place}'
  if kind == 'partial':  # mentions one object only: an ambiguous positive
    obj = objects[int(rng.integers(len(objects)))]
    return f'{opener}a {_phrase(obj, rng)}'
  raise ValueError(kind)


def make_captions(objects: list[dict], rng: np.random.Generator) -> list[str]:
  """Five different captions: relation, statement, list, pair, and one more that is a partial
  description half of the time (shuffled). (`position` captions exist but are not used: a pooled
  dual encoder cannot bind an object to a grid cell, so they only add noise to the demo.)"""
  kinds = ['relation', 'statement', 'list', 'pair',
           'partial' if rng.random() < 0.5 else 'relation']
  captions: list[str] = []
  for kind in kinds:
    for _ in range(20):  # redraw until it differs from the captions so far
      text = _caption(kind, objects, rng)
      if text not in captions:
        break
    else:
      text = f'{text} , again'
    captions.append(text + ' .')
  order = rng.permutation(len(captions))
  return [captions[k] for k in order]


class FeatureWorld:
  """Fixed random codebooks mapping attributes to region-feature directions."""

  def __init__(self, dim: int):
    rng = np.random.default_rng(FEATURE_SEED)
    self.dim = dim
    scale = 1.0 / np.sqrt(dim)
    self.colour = {c: rng.normal(0, 1, dim) for c in COLOURS}
    self.shape = {s: rng.normal(0, 1, dim) for s in SHAPES}
    self.size = {s: rng.normal(0, 1, dim) for s in SIZES}
    self.cell = rng.normal(0, 1, (GRID * GRID, dim))
    # A fixed nonlinear mixing gives each (colour, shape) conjunction its own signature, so
    # binding is visible in a region but not recoverable from a bag of attributes.
    self.binding = rng.normal(0, 1, (dim, dim)) * scale
    self.background = rng.normal(0, 1, dim)

  def object_region(self, obj: dict, rng: np.random.Generator) -> np.ndarray:
    base = self.colour[obj['colour']] + self.shape[obj['shape']]
    x = (base + 0.8 * self.size[obj['size']] + 1.0 * self.cell[obj['row'] * GRID + obj['col']]
         + 0.8 * np.tanh(base @ self.binding))
    return x + rng.normal(0, 0.4, self.dim)

  def part_region(self, obj: dict, rng: np.random.Generator) -> np.ndarray:
    part = self.colour[obj['colour']] if rng.random() < 0.5 else self.shape[obj['shape']]
    return 0.6 * part + 0.3 * self.background + rng.normal(0, 0.7, self.dim)

  def background_region(self, rng: np.random.Generator) -> np.ndarray:
    return 0.5 * self.background + rng.normal(0, 1.0, self.dim)

  def regions(self, objects: list[dict], rng: np.random.Generator) -> np.ndarray:
    rows = [self.object_region(o, rng) for o in objects]
    for o in objects:
      rows.extend(self.part_region(o, rng) for _ in range(int(rng.integers(1, 4))))
    while len(rows) < REGIONS:
      rows.append(self.background_region(rng))
    feats = np.stack(rows)[rng.permutation(REGIONS)]
    # BUTD features are non-negative (post-ReLU average pooled); keep that character.
    return np.maximum(feats, 0.0).astype(np.float32)


def render(objects: list[dict], path: str) -> None:
  img = Image.new('RGB', (IMAGE_PIXELS, IMAGE_PIXELS), (128, 128, 128))
  draw = ImageDraw.Draw(img)
  cell = IMAGE_PIXELS // GRID
  for o in objects:
    cx, cy = o['col'] * cell + cell // 2, o['row'] * cell + cell // 2
    r = cell * (0.42 if o['size'] == 'large' else 0.24)
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLOURS[o['colour']]
    if o['shape'] == 'circle':
      draw.ellipse(box, fill=fill)
    elif o['shape'] == 'square':
      draw.rectangle(box, fill=fill)
    elif o['shape'] == 'triangle':
      draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif o['shape'] == 'diamond':
      draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:  # hexagon (6 corners) and star (10 alternating corners)
      corners = 6 if o['shape'] == 'hexagon' else 10
      angles = np.arange(corners) * 2 * np.pi / corners - np.pi / 2
      radii = np.full(corners, r) if corners == 6 else np.where(np.arange(10) % 2, r * 0.45, r)
      draw.polygon([(cx + q * np.cos(a), cy + q * np.sin(a)) for q, a in zip(radii, angles)],
                   fill=fill)
  img.save(path, quality=90)


def split_rng(seed: int, split_no: int) -> np.random.Generator:
  """The generator of the split at position `split_no` of the splits dict (train, dev, test)."""
  return np.random.default_rng([seed, split_no])


def draw_split(world: 'FeatureWorld', rng: np.random.Generator, n_images: int):
  """Yields (objects, regions [36, dim], five captions) per image: a split's one sequence of draws."""
  for _ in range(n_images):
    objects = _sample_scene(rng)
    regions = world.regions(objects, rng)
    yield objects, regions, make_captions(objects, rng)


def scenes(split: str, *, seed: int = 0, splits: dict[str, int] | None = None,
           region_dim: int = 128) -> tuple[list[list[dict]], list[str]]:
  """(objects per image, captions) of `split` exactly as `generate` made them (same arguments),
  replayed without writing anything: the ground truth for analyses of a generated dataset."""
  splits = dict(DEFAULT_SPLITS if splits is None else splits)
  if split not in splits:
    raise ValueError(f'split {split!r} is not one of {list(splits)}')
  rng = split_rng(seed, list(splits).index(split))
  objects, captions = [], []
  for scene, _, image_captions in draw_split(FeatureWorld(region_dim), rng, splits[split]):
    objects.append(scene)
    captions.extend(image_captions)
  return objects, captions


def generate(out_dir: str, *, seed: int = 0, splits: dict[str, int] | None = None,
             region_dim: int = 128, render_images: bool = True, progress: bool = True) -> None:
  """Writes the synthetic world in the SCAN precomp layout under `out_dir`.

  Written into a temporary folder and renamed at the end, so an interrupted run never leaves a
  half-written dataset that looks complete.
  """
  splits = dict(DEFAULT_SPLITS if splits is None else splits)
  tmp = out_dir.rstrip('/') + '.partial'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(os.path.join(tmp, 'images'))
  world = FeatureWorld(region_dim)
  id_mapping = {}
  next_id = 0
  for split_no, (split, n_images) in enumerate(splits.items()):
    rng = split_rng(seed, split_no)
    per_caption = split == 'dev'
    feats = np.zeros((n_images, REGIONS, region_dim), np.float32)
    captions, ids = [], []
    for i, (objects, regions, image_captions) in enumerate(draw_split(world, rng, n_images)):
      feats[i] = regions
      captions.extend(image_captions)
      image_id = next_id
      next_id += 1
      ids.append(image_id)
      file_name = f'{image_id:06d}.jpg'
      id_mapping[str(image_id)] = file_name
      if render_images:
        render(objects, os.path.join(tmp, 'images', file_name))
      if progress and (i + 1) % 1000 == 0:
        print(f'  synthetic {split}: {i + 1}/{n_images} images', flush=True)
    if per_caption:
      feats = np.repeat(feats, 5, axis=0)
      ids = [x for x in ids for _ in range(5)]
    np.save(os.path.join(tmp, f'{split}_ims.npy'), feats)
    with open(os.path.join(tmp, f'{split}_caps.txt'), 'w', encoding='utf-8') as f:
      f.write('\n'.join(captions) + '\n')
    with open(os.path.join(tmp, f'{split}_ids.txt'), 'w', encoding='utf-8') as f:
      f.write('\n'.join(str(x) for x in ids) + '\n')
  with open(os.path.join(tmp, 'id_mapping.json'), 'w', encoding='utf-8') as f:
    json.dump(id_mapping, f)
  shutil.rmtree(out_dir, ignore_errors=True)
  os.rename(tmp, out_dir)
