"""`--mode verify_data`: checks V1-V14 of docs/data.md 1.8 on the raw files of a dataset.

Prints one line per problem (`ERROR`/`WARN` + the file + what was expected), then a summary, and
writes the report as JSON; the exit status is non-zero when any check fails. `cheap_checks` is the
part that costs seconds (no image decoding, no tokenisation; published counts only warn) and runs
before a dataset is built for training. V12 (the CLIP pairing probe) runs with `deep=True`.
"""

import concurrent.futures
import dataclasses
import json
import os

import numpy as np
from PIL import Image

from input_pipeline import layouts
from input_pipeline import scan_files

ROW_BYTES = 36 * 2048 * 4   # one BUTD row: 294,912 bytes
SAMPLE = 20                 # rows read for V9 / V14
# Published counts (docs/data.md 1.3, 1.8): captions, accepted npy rows, ids lines, unique ids.
EXPECTED = {
    'f30k': {
        'captions': {'train': 145000, 'dev': 5070, 'test': 5000},
        'rows': {'train': (29000,), 'dev': (5070, 1014), 'test': (5000, 1000)},
        'id_range': (0, 31013), 'id_union': 31014,
    },
    'coco': {
        'captions': {'train': 566435, 'dev': 5000, 'test': 5000, 'testall': 25000},
        'rows': {'train': (113287,), 'dev': (5000, 1000), 'test': (5000, 1000),
                 'testall': (25000, 5000)},
        'id_range': None, 'id_union': None,
    },
}


@dataclasses.dataclass
class Report:
  errors: list = dataclasses.field(default_factory=list)
  warnings: list = dataclasses.field(default_factory=list)
  info: list = dataclasses.field(default_factory=list)

  def error(self, check: str, where: str, message: str) -> None:
    self.errors.append(f'{check} {where}: {message}')

  def warn(self, check: str, where: str, message: str) -> None:
    self.warnings.append(f'{check} {where}: {message}')

  def note(self, check: str, where: str, message: str) -> None:
    self.info.append(f'{check} {where}: {message}')

  def lines(self) -> list[str]:
    return ([f'ERROR {x}' for x in self.errors] + [f'WARN  {x}' for x in self.warnings]
            + [f'INFO  {x}' for x in self.info])

  def summary(self) -> str:
    verdict = 'FAILED' if self.errors else 'OK'
    return f'verify_data {verdict}: {len(self.errors)} errors, {len(self.warnings)} warnings'


def _captions(report: Report, path: str) -> list[str] | None:
  """V3: UTF-8, no empty line, count divisible by 5 (every problem, not only the first)."""
  if not os.path.isfile(path):
    report.error('V1', path, 'file not found (one caption per line, 5 per image)')
    return None
  with open(path, 'rb') as f:
    raw = f.read()
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b'\n') + 1
    report.error('V3', f'{path}:{line}', f'not UTF-8 (byte {e.start}: {e.reason}); expected '
                 'UTF-8 text')
    return None
  lines = text.split('\n')
  if lines and lines[-1] == '':
    lines.pop()
  captions = [x.strip() for x in lines]
  empty = [n + 1 for n, c in enumerate(captions) if not c]
  if empty:
    report.error('V3', path, f'{len(empty)} empty caption line(s) at line(s) '
                 f'{", ".join(map(str, empty[:10]))}; expected one caption on every line')
  if len(captions) % 5:
    report.error('V3', path, f'{len(captions):,} caption lines, expected a multiple of 5')
  return captions


def _features(report: Report, path: str, n_captions: int | None, accepted: tuple | None,
              region_dim: int | None):
  """V4, V5, V6, V9, V14: header, exact size, granularity, first/last/sampled rows."""
  if not os.path.isfile(path):
    report.error('V1', path, 'file not found (float32 .npy [R, 36, 2048])')
    return None
  try:
    shape, dtype, fortran, header = scan_files.npy_header(path)
  except scan_files.DataError as e:
    report.error('V4', path, str(e).split(': ', 1)[1])
    return None
  if len(shape) != 3 or shape[1] != 36 or (region_dim and shape[2] != region_dim):
    report.error('V4', path, f'shape {shape}, expected (R, 36, {region_dim or "F"})')
    return None
  if dtype != np.dtype('<f4'):
    (report.warn if dtype.kind == 'f' else report.error)(
        'V4', path, f'dtype {dtype.str}, expected <f4 (float32)')
  if fortran:
    report.warn('V4', path, 'Fortran order, expected C order (rows are read slowly)')
  expected = header + int(np.prod(shape)) * dtype.itemsize
  size = os.path.getsize(path)
  if size != expected:
    row = int(np.prod(shape[1:])) * dtype.itemsize
    report.error('V5', path, f'{size:,} bytes, expected {expected:,} = header {header} + '
                 f'{shape[0]:,} x {row:,}; truncated or damaged (about '
                 f'{max(size - header, 0) // row:,} complete rows), download it again')
    return None
  feats = np.load(path, mmap_mode='r')
  rows = shape[0]
  if n_captions:
    if rows not in (n_captions, n_captions // 5):
      report.error('V6', path, f'{rows:,} rows, expected {n_captions // 5:,} (per image) or '
                   f'{n_captions:,} (per caption)')
    else:
      report.note('V6', path, f'{rows:,} rows, one per {"caption" if rows == n_captions else "image"}')
  if accepted and rows not in accepted:
    report.error('V4', path, f'{rows:,} rows, expected {" or ".join(f"{a:,}" for a in accepted)}')
  sample = np.unique(np.linspace(0, rows - 1, min(rows, SAMPLE)).astype(int))
  if not np.all(np.isfinite(np.asarray(feats[sample]))) or not np.isfinite(feats[-1]).all():
    report.error('V14', path, 'non-finite values (NaN/inf) in sampled rows; expected finite')
  if n_captions and rows == n_captions:
    images = np.unique(np.linspace(0, rows // 5 - 1, min(rows // 5, SAMPLE)).astype(int))
    for i in images:
      block = np.asarray(feats[5 * i:5 * i + 5])
      if not (block == block[0]).all():
        report.error('V9', path, f'rows {5 * i}..{5 * i + 4} differ; a per-caption file repeats '
                     'each image row 5 times')
        break
  return feats


def _ids(report: Report, path: str, n_captions: int | None) -> list[int] | None:
  """V7: integers, line count per image or per caption, repeated blocks, unique count."""
  if not os.path.isfile(path):
    report.error('V1', path, 'file not found (one integer image id per line)')
    return None
  try:
    ids = scan_files.read_ids(path)
  except scan_files.DataError as e:
    report.error('V7', path, str(e).split(': ', 1)[1] if ': ' in str(e) else str(e))
    return None
  if n_captions:
    if len(ids) not in (n_captions, n_captions // 5):
      report.error('V7', path, f'{len(ids):,} lines, expected {n_captions // 5:,} (per image) '
                   f'or {n_captions:,} (per caption)')
      return None
    if len(ids) == n_captions:
      try:
        scan_files.check_id_blocks(ids, path)
      except scan_files.DataError as e:
        report.error('V7', path, str(e).split(': ', 1)[1])
    unique = len(set(ids))
    if unique != n_captions // 5:
      report.error('V7', path, f'{unique:,} unique ids, expected {n_captions // 5:,}')
  return ids


def _images(report: Report, found: layouts.Layout, dataset: str, ids_by_split: dict,
            decode: bool, threads: int = 8) -> None:
  """V11: every id is in the mapping and its file exists (and decodes)."""
  if found.mapping_path is None:
    report.error('V11', os.path.join(found.dataset_dir, 'id_mapping.json'),
                 'not found; expected {"<image id>": "<file>"} (F30K: VSE-infinity '
                 'data/f30k/id_mapping.json; COCO: AAHR "additional data/coco/id_mapping.json")')
    return
  try:
    mapping = layouts.read_mapping(found.mapping_path, dataset)
  except scan_files.DataError as e:
    report.error('V11', found.mapping_path, str(e).split(': ', 1)[1])
    return
  if found.image_dir is None:
    report.error('V11', found.dataset_dir, 'no image folder (flickr30k-images/ or images/)')
    return
  paths = {}
  for split, ids in ids_by_split.items():
    for image_id in dict.fromkeys(ids):
      name = mapping.get(str(image_id))
      if name is None:
        report.error('V11', found.mapping_path, f'no entry for image id {image_id} '
                     f'({split}_ids.txt); every id must map to an image file')
      else:
        paths[found.image_path(name)] = (split, image_id)
  missing = [p for p in paths if not os.path.isfile(p)]
  for p in missing[:20]:
    report.error('V11', p, f'image file not found (id {paths[p][1]} of {paths[p][0]})')
  if len(missing) > 20:
    report.error('V11', found.image_dir, f'{len(missing):,} image files missing in all')
  if not decode:
    return
  present = [p for p in paths if p not in set(missing)]
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    for p, problem in zip(present, pool.map(_decode_problem, present)):
      if problem:
        report.error('V11', p, f'cannot decode the image ({problem}); expected a readable '
                     'JPEG/PNG, download it again')
  report.note('V11', found.image_dir, f'{len(present):,} image files present'
              + (' and decoded' if decode else ''))


def _decode_problem(path: str) -> str | None:
  try:
    with Image.open(path) as img:
      img.draft('RGB', (64, 64))   # JPEG: decode at reduced scale, still reads every byte
      img.load()
  except (OSError, ValueError, SyntaxError) as e:
    return str(e)
  return None


def _disjoint(report: Report, dataset: str, ids_by_split: dict, spec: dict | None,
              cheap: bool = False) -> None:
  """V10: splits disjoint; F30K ids cover 0..31013; COCO test within testall."""
  sets = {s: set(v) for s, v in ids_by_split.items()}
  main = [s for s in ('train', 'dev', 'test' if dataset != 'coco' else 'testall') if s in sets]
  for i, a in enumerate(main):
    for b in main[i + 1:]:
      shared = sets[a] & sets[b]
      if shared:
        (report.error if dataset in EXPECTED else report.warn)(
            'V10', f'{a}_ids.txt/{b}_ids.txt', f'{len(shared):,} ids in both (e.g. '
            f'{sorted(shared)[:3]}); expected disjoint splits')
  if dataset == 'coco' and 'test' in sets and 'testall' in sets and not sets['test'] <= sets['testall']:
    report.warn('V10', 'test_ids.txt', 'ids outside testall; expected test to be a subset')
  spec = spec or {}
  if spec.get('id_range') and all(s in sets for s in ('train', 'dev', 'test')):
    lo, hi = spec['id_range']
    union = sets['train'] | sets['dev'] | sets['test']
    outside = [x for x in union if not lo <= x <= hi]
    if outside or len(union) != spec['id_union']:
      (report.warn if cheap else report.error)('V10', 'train/dev/test_ids.txt', f'{len(union):,} distinct ids '
                   f'({len(outside)} outside {lo}..{hi}), expected exactly {lo}..{hi}')


def _lengths(report: Report, split: str, captions: list[str]) -> None:
  """V13: BERT and CLIP token lengths for shape planning."""
  from input_pipeline import caption_tokens   # pylint: disable=import-outside-toplevel
  from input_pipeline import clip_tokenizer   # pylint: disable=import-outside-toplevel
  bert = caption_tokens.tokenize(captions).lengths
  clip_tok = clip_tokenizer.get_tokenizer()
  clip_len = np.asarray([len(clip_tok.encode(c)) + 2 for c in captions])
  report.note('V13', split, f'BERT length max {bert.max()}, p99.9 '
              f'{int(np.quantile(bert, 0.999, method="higher"))}; CLIP length max '
              f'{clip_len.max()}, p99.9 {int(np.quantile(clip_len, 0.999, method="higher"))}, '
              f'{int((clip_len > 77).sum())} longer than 77 (cut by open_clip)')


def run(manual_dir: str, dataset: str, *, layout: str = 'auto', cheap: bool = False,
        check_images: bool = True, deep: bool = False, region_dim: int | None = 2048,
        clip_checkpoint: str | None = None, expected: dict | None = None) -> Report:
  report = Report()
  try:
    found = layouts.find(manual_dir, dataset, layout)
  except scan_files.DataError as e:
    report.error('V1', manual_dir, str(e))
    return report
  report.note('V1', found.precomp_dir, f'{found.name} layout')
  spec = EXPECTED.get(dataset) if expected is None else expected
  present = scan_files.available_splits(found.precomp_dir)
  splits = list(spec['captions']) if spec and not cheap else present
  for split in (spec['captions'] if spec and cheap else ()):
    if split not in present:
      report.warn('V1', os.path.join(found.precomp_dir, f'{split}_caps.txt'), 'not found')
  count_problem = report.warn if cheap else report.error
  ids_by_split, captions_by_split = {}, {}
  for split in splits:
    path = lambda kind, s=split: os.path.join(found.precomp_dir, f'{s}_{kind}')
    captions = _captions(report, path('caps.txt'))
    n = len(captions) if captions is not None and len(captions) % 5 == 0 else None
    want = spec['captions'].get(split) if spec else None
    if captions is not None and want is not None and len(captions) != want:
      count_problem('V2', path('caps.txt'), f'{len(captions):,} captions, expected {want:,}')
    accepted = spec['rows'].get(split) if spec and not cheap else None
    feats = _features(report, path('ims.npy'), n, accepted, region_dim)
    if cheap and not check_images and not os.path.isfile(path('ids.txt')):
      ids = None   # region-only training does not need the ids
    else:
      ids = _ids(report, path('ids.txt'), n)
    if ids is not None:
      ids_by_split[split] = ids
    if feats is not None and ids is not None and n and len(feats) != len(ids):
      report.warn('V8', path('ims.npy'), f'{len(feats):,} rows but {len(ids):,} id lines: read '
                  'correctly here, but the original AAHR loader pairs CLIP images with the wrong '
                  'captions on this split')
    if captions is not None and n:
      captions_by_split[split] = captions
  _disjoint(report, dataset, ids_by_split, spec, cheap)
  if check_images:
    _images(report, found, dataset, ids_by_split, decode=not cheap)
  if not cheap:
    for split, captions in captions_by_split.items():
      _lengths(report, split, captions)
  if deep and not report.errors:
    _pairing_probe(report, found, dataset, clip_checkpoint, captions_by_split, ids_by_split)
  return report


def _pairing_probe(report: Report, found: layouts.Layout, dataset: str, checkpoint: str | None,
                   captions_by_split: dict, ids_by_split: dict, n: int = 100) -> None:
  """V12: zero-shot i2t R@1 on the first n test images with their first captions (> 50%)."""
  split = 'test' if 'test' in captions_by_split else next(iter(captions_by_split), None)
  if not checkpoint or split is None:
    report.warn('V12', found.precomp_dir, 'skipped: needs config.model.clip_checkpoint and a '
                'test split')
    return
  from input_pipeline import clip_encoder   # pylint: disable=import-outside-toplevel
  mapping = layouts.read_mapping(found.mapping_path, dataset)
  ids, captions = ids_by_split[split], captions_by_split[split]
  step = len(ids) // (len(captions) // 5)
  count = min(n, len(captions) // 5)
  paths = [found.image_path(mapping[str(ids[step * i])]) for i in range(count)]
  encoder = clip_encoder.ClipEncoder(checkpoint, batch_size=50)
  img = encoder.image_features(paths)
  txt = encoder.text_features([captions[5 * i] for i in range(count)])
  img /= np.linalg.norm(img, axis=1, keepdims=True)
  txt /= np.linalg.norm(txt, axis=1, keepdims=True)
  r1 = float(np.mean(np.argmax(img @ txt.T, axis=1) == np.arange(count))) * 100
  line = f'zero-shot i2t R@1 {r1:.1f}% on the first {count} images (chance {100 / count:.1f}%)'
  (report.note if r1 > 50 else report.error)('V12', split, line + ('' if r1 > 50 else
                                             '; expected > 50%: images and captions mis-paired?'))


def cheap_checks(config, manual_dir: str) -> Report:
  """The seconds-long part of verify_data; raises DataError listing every error."""
  from input_pipeline import clip_features, datasets   # pylint: disable=import-outside-toplevel
  report = run(manual_dir, datasets.dataset_name(config), layout=config.data.get('layout', 'auto'),
               cheap=True, check_images=clip_features.clip_wanted(config),
               region_dim=config.data.region_dim)
  for line in report.warnings:
    print(f'warning: {line}', flush=True)
  if report.errors:
    raise scan_files.DataError('; '.join(report.errors[:5]) + (
        f' (and {len(report.errors) - 5} more; run --mode verify_data)'
        if len(report.errors) > 5 else ''))
  return report


def main(config, workdir: str) -> int:
  """--mode verify_data: prints the report, writes <workdir>/verify_data.json, returns 0 or 1."""
  from input_pipeline import datasets   # pylint: disable=import-outside-toplevel
  raw = datasets.manual_dir(config, workdir)
  deep = bool(config.data.get('verify_deep', False))
  report = run(raw, datasets.dataset_name(config), layout=config.data.get('layout', 'auto'),
               deep=deep, region_dim=config.data.region_dim,
               clip_checkpoint=config.model.get('clip_checkpoint', '') or None)
  for line in report.lines():
    print(line)
  print(report.summary())
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'verify_data.json'), 'w', encoding='utf-8') as f:
    json.dump(dataclasses.asdict(report), f, indent=1)
  return 1 if report.errors else 0
