"""A seeded training batch with AAHR's shapes, shared by the JAX and the PyTorch step.

Region counts vary below the static width of 36 (region dropout) with one full item, so the
per-batch width is 36; token counts vary below `tokens` with one item of exactly `tokens`, so
the JAX static width (config.data.max_len = tokens) equals the PyTorch per-batch width. Every
eighth caption shares its image with its neighbour (positives beyond the diagonal).
"""

import numpy as np

CLIP_START, BERT_CLS, BERT_SEP = 49406, 101, 102  # open_clip start token; uncased BERT ids


def make(config, batch_size: int, tokens: int, clip_arch: dict, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  b, n, f = batch_size, config.data.num_regions, config.data.region_dim
  region_len = rng.integers(max(2, int(0.6 * n)), n + 1, b).astype(np.int32)
  region_len[0] = n
  regions = rng.random((b, n, f), dtype=np.float32)
  regions *= (np.arange(n)[None, :] < region_len[:, None])[:, :, None]
  bert_len = rng.integers(max(3, tokens // 3), tokens + 1, b).astype(np.int32)
  bert_len[0] = tokens
  vocab = config.model.bert['vocab_size']
  bert_ids = rng.integers(1000 if vocab > 2000 else 4, vocab, (b, tokens)).astype(np.int32)
  bert_ids[:, 0] = BERT_CLS if vocab > 2000 else 1
  bert_ids[np.arange(b), bert_len - 1] = BERT_SEP if vocab > 2000 else 2
  bert_ids[np.arange(tokens)[None, :] >= bert_len[:, None]] = 0
  image_index = np.arange(b, dtype=np.int32)
  image_index[1::8] = image_index[0::8][:len(image_index[1::8])]
  clip_dim = config.model.clip_dim
  context, clip_vocab = clip_arch['context_length'], clip_arch['vocab_size']
  clip_tokens = rng.integers(1, clip_vocab - 2, (b, context)).astype(np.int32)
  clip_len = np.minimum(bert_len, context)
  clip_tokens[:, 0] = min(CLIP_START, clip_vocab - 2)
  clip_tokens[np.arange(b), clip_len - 1] = clip_vocab - 1  # end of text: the largest id
  clip_tokens[np.arange(context)[None, :] >= clip_len[:, None]] = 0
  size = clip_arch['image_size']
  return {
      'regions': regions, 'region_len': region_len, 'bert_ids': bert_ids, 'bert_len': bert_len,
      'caption_index': np.arange(b, dtype=np.int32), 'image_index': image_index,
      'valid': np.ones((b,), bool),
      'clip_image': rng.normal(size=(b, clip_dim)).astype(np.float32),
      'clip_text': rng.normal(size=(b, clip_dim)).astype(np.float32),
      'images': rng.normal(size=(b, size, size, 3)).astype(np.float32),
      'clip_tokens': clip_tokens,
  }


def cached_fields(batch: dict) -> dict:
  return {k: v for k, v in batch.items() if k not in ('images', 'clip_tokens')}


def online_fields(batch: dict) -> dict:
  return {k: v for k, v in batch.items() if k not in ('clip_image', 'clip_text')}
