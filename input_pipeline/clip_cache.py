"""`--mode clip_cache`: the frozen-CLIP features of every image and caption of a built dataset.

    python main.py --config configs/f30k.py --workdir runs/f30k --mode clip_cache \
        --config.model.clip_checkpoint=weights/open_clip_vit_b32_laion2b.safetensors

Runs the Flax OpenCLIP (a file from `python -m conversion open_clip`) over every unique image
(OpenCLIP evaluation preprocessing on the host) and every caption (CLIP tokenizer), in batches
with progress, and stores float32 features aligned with the tfds dataset (layout: clip_features.py).
Each split is written to `<split>.partial/` and renamed when complete, so an interrupted build
leaves no half-written split and a rerun only computes the splits still missing.
For the synthetic demo, `ensure_demo_clip` provides a small random-init CLIP (weak features).
"""

import json
import os
import shutil
import time

import numpy as np

from input_pipeline import clip_encoder
from input_pipeline import clip_features
from input_pipeline import datasets
from input_pipeline import layouts

ensure_demo_clip = clip_encoder.ensure_demo_clip
PROGRESS_SECONDS = 10.0


def build(config, workdir: str) -> str:
  """Builds the missing splits of the cache; returns its folder."""
  builder = datasets.build(config, workdir)
  root = datasets.data_dir(config, workdir)
  checkpoint = clip_features.checkpoint_path(config, root)
  out_dir = clip_features.cache_dir(config, root, builder.builder_config.name, checkpoint)
  found = datasets.layout(config, workdir)
  encoder = None
  for split, info in builder.info.splits.items():
    folder = os.path.join(out_dir, split)
    if os.path.isfile(os.path.join(folder, clip_features.META_FILE)):
      print(f'CLIP cache {folder}: present', flush=True)
      continue
    encoder = encoder or clip_encoder.ClipEncoder(
        checkpoint, batch_size=config.data.get('clip_batch_size', 256))
    write_split(encoder, builder.as_data_source(split).source, found, folder, split,
                dataset=builder.info.full_name, num_images=info.num_examples)
  return out_dir


def _image_paths(examples, found: layouts.Layout, split: str, n: int) -> list[str]:
  paths = []
  for i in range(n):
    example = examples[i]
    rel = example['image_path'].decode()
    if not rel:
      raise datasets.DataError(
          f'{found.mapping_path or found.dataset_dir + "/id_mapping.json"}: image id '
          f'{int(example["image_id"])} ({split} image {i}) has no image file; CLIP features need '
          'every raw image (docs/data.md 1.5)')
    paths.append(os.path.join(found.dataset_dir, rel))
  return paths


def _in_chunks(fn, items: list, what: str, chunk: int) -> np.ndarray:
  out, start, last = [], time.time(), time.time()
  for lo in range(0, len(items), chunk):
    out.append(fn(items[lo:lo + chunk]))
    done = min(lo + chunk, len(items))
    if time.time() - last > PROGRESS_SECONDS or done == len(items):
      last = time.time()
      print(f'  {what}: {done:,}/{len(items):,} ({done / max(last - start, 1e-9):,.0f}/s)',
            flush=True)
  return np.concatenate(out)


def write_split(encoder: clip_encoder.ClipEncoder, examples, found: layouts.Layout, folder: str,
                split: str, *, dataset: str, num_images: int) -> None:
  paths = _image_paths(examples, found, split, num_images)
  captions = [c.decode('utf-8') for i in range(num_images) for c in examples[i]['captions']]
  print(f'CLIP features of {split}: {num_images:,} images, {len(captions):,} captions -> {folder}',
        flush=True)
  chunk = 8 * encoder.batch_size
  image_feat = _in_chunks(encoder.image_features, paths, f'{split} images', chunk)
  text_feat = _in_chunks(encoder.text_features, captions, f'{split} captions', chunk)
  tmp = folder.rstrip('/') + '.partial'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  np.save(os.path.join(tmp, clip_features.IMAGE_FILE), image_feat.astype(np.float32))
  np.save(os.path.join(tmp, clip_features.TEXT_FILE), text_feat.astype(np.float32))
  meta = {
      'clip': {'path': os.path.abspath(encoder.checkpoint),
               'size': os.path.getsize(encoder.checkpoint),
               'fingerprint': clip_features.fingerprint(encoder.checkpoint),
               'config': encoder.config.to_dict()},
      'dataset': dataset, 'split': split, 'num_images': num_images,
      'num_captions': len(captions), 'dim': int(image_feat.shape[1]),
      'preprocessing': {'image': f'resize shorter side {encoder.image_size} bicubic (PIL), '
                                 'centre crop, RGB, /255, CLIP mean/std',
                        'text': 'open_clip SimpleTokenizer ids (clip_tokenizer.py)'},
      'features': 'unnormalised encode_image / encode_text, float32',
  }
  with open(os.path.join(tmp, clip_features.META_FILE), 'w', encoding='utf-8') as f:
    json.dump(meta, f, indent=1)
  shutil.rmtree(folder, ignore_errors=True)
  os.replace(tmp, folder)
