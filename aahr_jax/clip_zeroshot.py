"""Zero-shot CLIP baseline: the cached frozen-CLIP features alone, scored like AAHR
(docs/data.md section 4).

Standard protocol (CLIP_benchmark, the open_clip retrieval table): both features L2-normalised,
S = cosine similarity. `normalize=False` scores the raw features by dot product, as AAHR's
`clip_eval.py` (evalrank_clip) does; that is not the standard protocol and gives other numbers.
The features come from the frozen-CLIP cache (one vector per image, one per caption, split order).
"""

import numpy as np

from aahr_jax import evaluate


def unit_rows(features: np.ndarray) -> np.ndarray:
  """Rows divided by their L2 norm in float64, then fp32 (a zero row stays zero)."""
  features = np.asarray(features, np.float64)
  norms = np.linalg.norm(features, axis=1, keepdims=True)
  return (features / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def zero_shot_embeddings(clip_image_feat, clip_text_feat, *, normalize: bool = True
                         ) -> tuple[np.ndarray, np.ndarray]:
  """[n_images, D] and [n_captions, D] CLIP features -> the embeddings the evaluator compares."""
  images, texts = np.asarray(clip_image_feat), np.asarray(clip_text_feat)
  if images.ndim != 2 or texts.ndim != 2 or images.shape[1] != texts.shape[1]:
    raise ValueError(f'CLIP features must be images [n, D] and captions [5n, D], got '
                     f'{images.shape} and {texts.shape}')
  if texts.shape[0] != 5 * images.shape[0]:
    raise ValueError(f'{texts.shape[0]} caption features for {images.shape[0]} images; the '
                     'protocol needs 5 per image (caption c of image c // 5)')
  if normalize:
    return unit_rows(images), unit_rows(texts)
  return images.astype(np.float32), texts.astype(np.float32)


def evaluate_features(clip_image_feat, clip_text_feat, *, normalize: bool, protocol: str,
                      split_name: str, workdir: str | None, model_name: str = 'CLIP',
                      save_sims: bool = False, dataset: str | None = None) -> dict:
  """The full report (table, eval/<split>_clip_zeroshot.json, recall plot, optional npy) for
  CLIP alone."""
  images, texts = zero_shot_embeddings(clip_image_feat, clip_text_feat, normalize=normalize)
  scoring = 'cosine (L2-normalised)' if normalize else 'raw dot product (clip_eval.py)'
  return evaluate.evaluate_embeddings(
      images, texts, split_name=split_name, protocol=protocol, workdir=workdir,
      header_extra={'checkpoint': f'zero-shot {model_name}, {scoring}',
                    'selection_split': 'none (zero-shot)', 'clip_normalize': bool(normalize)},
      save_sims=save_sims, dataset=dataset, tag='clip_zeroshot')
