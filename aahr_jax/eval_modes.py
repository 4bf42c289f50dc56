"""What `--mode eval` and `--mode search` do beyond evaluating one checkpoint of the workdir.

  --mode eval                                  the best checkpoint (best.json), else the latest
  --mode eval --checkpoint 3000                one step of the workdir (train.evaluate_checkpoint)
  --mode eval --checkpoint 3000,6000,runs/b    an ensemble: similarity matrices averaged; members
                                               are steps of this workdir, other workdirs, or
                                               converted original checkpoints
  --mode eval --results a.npy[,b.npy]          reference mode: results_*.npy of the PyTorch code
  --mode eval --config configs/clip_zeroshot.py   the zero-shot CLIP baseline
  --mode search --query "..." [--top_k 10]     text-to-image search over the evaluation split
  --mode encode_texts --texts T.txt --out E.npy   caption embeddings of the lines of T.txt

Ensembles, reference re-scoring and the zero-shot baseline write eval/<split>_<tag>.json (tag
ensemble, reference, clip_zeroshot), leaving the model's eval/<split>.json as it was.
"""

import os

import numpy as np

from aahr_jax import clip_zeroshot
from aahr_jax import evaluate
from aahr_jax import inference
from aahr_jax import multi_positive
from aahr_jax import search_index
from aahr_jax.models import aahr
from input_pipeline import datasets

ZERO_SHOT_MODEL = 'clip_zeroshot'


def split_list(value: str | None) -> list[str]:
  """'a,b , c' -> ['a', 'b', 'c'] (a comma-separated flag value)."""
  return [v.strip() for v in (value or '').split(',') if v.strip()]


def _is_path(spec: str) -> bool:
  return os.sep in spec or os.path.isdir(spec)


def run_eval(config, workdir: str, checkpoints: list[str], results: list[str]) -> dict:
  if config.model.name == ZERO_SHOT_MODEL:
    return evaluate_zero_shot(config, workdir)
  if results:
    if checkpoints:
      raise ValueError('--results re-scores saved matrices; it cannot be combined with '
                       '--checkpoint')
    split_name = config.data.eval_split
    return evaluate.evaluate_results_files(
        results, protocol=config.eval.protocol, workdir=workdir, split_name=split_name,
        ground_truth=multi_positive.for_config(config, workdir, split_name))
  if len(checkpoints) > 1 or (checkpoints and _is_path(checkpoints[0])):
    return evaluate_ensemble(config, workdir, checkpoints)
  from aahr_jax import train  # pylint: disable=import-outside-toplevel
  which = evaluate.default_checkpoint(workdir, checkpoints[0] if checkpoints else None)
  return train.evaluate_checkpoint(config, workdir, which)


def _load_member(spec: str, workdir: str):
  """(model config, variables, description) of one ensemble member."""
  if _is_path(spec):
    if inference.is_workdir(spec):
      model_config, variables, _, step = inference.load_workdir(spec)
      return model_config, variables, f'{spec} step {step}'
    model_config, variables, _ = inference.load_converted_dir(spec)
    return model_config, variables, spec
  model_config, variables, _, step = inference.load_workdir(workdir, spec)
  return model_config, variables, f'{workdir} step {step}'


def evaluate_ensemble(config, workdir: str, specs: list[str]) -> dict:
  """Encodes the evaluation split with every member, then evaluates the averaged similarity."""
  from aahr_jax import sharding  # pylint: disable=import-outside-toplevel
  split_name = config.data.eval_split
  split = datasets.open_split(datasets.build(config, workdir), split_name)
  datasets.check_eval_protocol(config, split_name, split)
  mesh = sharding.create_mesh(config.mesh)
  members, names = [], []
  for spec in specs:
    model_config, variables, name = _load_member(spec, workdir)
    print(f'Encoding {split_name} with {name} ...', flush=True)
    members.append(evaluate.encode_split(aahr.build_model(model_config), variables, split,
                                         mesh=mesh, batch_size=config.eval.batch_size,
                                         text=datasets.text_options(config)))
    names.append(name)
  images, captions = evaluate.ensemble_embeddings(members)
  return evaluate.evaluate_embeddings(
      images, captions, split_name=split_name, protocol=config.eval.protocol, workdir=workdir,
      header_extra={'checkpoint': f'ensemble of {len(names)}: ' + ' + '.join(names),
                    'ensemble': names, 'selection_split': _selection_of(workdir)},
      save_sims=config.eval.get('save_sims', False), dataset=config.data.name, tag='ensemble',
      ground_truth=multi_positive.for_config(config, workdir, split_name, split))


def _selection_of(workdir: str) -> str:
  best = evaluate.read_best(workdir)
  return best['selection_split'] if best else 'none recorded'


def load_clip_features(config, workdir: str, split_name: str):
  """(clip_image_feat [n, D], clip_text_feat [5n, D]) of a split: the frozen-CLIP cache (built
  here if missing) or, with config.data.clip_online, computed now."""
  from input_pipeline import clip_cache  # pylint: disable=import-outside-toplevel
  from input_pipeline import clip_features  # pylint: disable=import-outside-toplevel
  builder = datasets.build(config, workdir)
  if not clip_features.clip_online(config):
    clip_cache.build(config, workdir)
  split = datasets.open_split(builder, split_name, config, workdir)
  return (split.clip.images(np.arange(split.num_images)),
          split.clip.texts(np.arange(split.num_captions)))


def evaluate_zero_shot(config, workdir: str) -> dict:
  split_name = config.data.eval_split
  images, texts = load_clip_features(config, workdir, split_name)
  return clip_zeroshot.evaluate_features(
      images, texts, normalize=config.clip_zeroshot.normalize, protocol=config.eval.protocol,
      split_name=split_name, workdir=workdir, save_sims=config.eval.get('save_sims', False),
      dataset=config.data.name,
      model_name=os.path.basename(config.model.get('clip_checkpoint', '') or 'CLIP'))


def run_search(workdir: str, query: str, top_k: int, checkpoint: str | None = None) -> list:
  """Prints and returns the top_k (image index, score) of the workdir's evaluation split."""
  if not query:
    raise ValueError('--mode search needs --query "some text"')
  if top_k < 1:
    raise ValueError(f'--top_k {top_k}: expected at least 1 image to list')
  retriever = inference.Retriever.from_checkpoint(workdir, checkpoint)
  config = inference.load_workdir_config(workdir)
  images, meta = search_index.open_index(retriever, config, workdir, config.data.eval_split)
  indices, scores = search_index.top_k(images, retriever.embed_texts([query]), top_k)
  print(search_index.format_hits(query, meta, indices[0], scores[0]), flush=True)
  return list(zip(indices[0].tolist(), scores[0].tolist()))


def read_texts(path: str) -> list[str]:
  """The lines of a UTF-8 file, one text each; blank lines and other encodings are refused."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--texts {path}: no such file (expected a UTF-8 text file, one text '
                            'per line)')
  with open(path, 'rb') as f:
    raw_lines = f.read().splitlines()
  texts = []
  for number, raw in enumerate(raw_lines, start=1):
    try:
      text = raw.decode('utf-8').strip()
    except UnicodeDecodeError as e:
      raise ValueError(f'{path}: line {number} is not UTF-8 text ({e.reason} at byte '
                       f'{e.start}); save the file as UTF-8') from None
    if not text:
      raise ValueError(f'{path}: line {number} is blank; write one text per line')
    texts.append(text)
  if not texts:
    raise ValueError(f'{path} holds no text; write one text per line')
  return texts


def run_encode_texts(workdir: str, texts_path: str, out_path: str, checkpoint: str | None = None,
                     batch_size: int = 256) -> np.ndarray:
  """Embeds each line of `texts_path` as a caption and writes `out_path` (.npy, float32 [N, D])
  with a .json beside it (the texts file, the checkpoint, the normalisation state): the text
  side of the image index that --mode search writes, for users' own retrieval code."""
  if not texts_path or not out_path:
    raise ValueError('--mode encode_texts needs --texts FILE (one text per line) and '
                     '--out EMBEDDINGS.npy')
  if not out_path.endswith('.npy'):
    raise ValueError(f'--out {out_path}: expected a path ending in .npy')
  texts = read_texts(texts_path)
  retriever = inference.Retriever.from_checkpoint(workdir, checkpoint)
  parts = []
  for start in range(0, len(texts), batch_size):
    parts.append(retriever.embed_texts(texts[start:start + batch_size]))
    print(f'encoded {min(start + batch_size, len(texts))}/{len(texts)} texts', flush=True)
  embeddings = np.concatenate(parts)
  search_index.export_embeddings(out_path, embeddings, {
      'texts_file': os.path.abspath(texts_path), 'num_texts': len(texts),
      'checkpoint': retriever.source})
  print(f'Wrote {embeddings.shape[0]} x {embeddings.shape[1]} text embeddings of '
        f'{retriever.source} to {out_path} (metadata: {os.path.splitext(out_path)[0]}.json)',
        flush=True)
  return embeddings
