"""Model FLOPs of one AAHR training step, counted from the architecture (matmuls only).

A matmul [m, k] x [k, n] is 2 m n k FLOPs. Per example, N = region slots (per-batch width),
L = BERT tokens (per-batch width), D = embed size, h = BERT width:

  bert(L)        = layers * (2 L h 3h + 2 L h h + 2 * 2 L L h + 2 * 2 L h I)   (QKV, out, QK^T+PV, FFN)
  tf_layer(S, d) = 2 S d 3d + 2 S d d + 2 * 2 S S d + 2 * 2 S d d              (FF width = d)
  gglp(S)        = heads * (2 d d + 2 S d d + 2 * 2 S d + 2 d d)   (q, keys per slot, logits+pool,
                   values on the pooled vector: sum_s w_s (W f_s + b) = W sum_s w_s f_s + b;
                   the original applies W per slot, + heads * 2 (S-1) d d, not counted)
  head(S)        = tf_layer(S, D) + gglp(S) + 2 * 2 c D (fc_clip) + 2 * 2D * D (gate)
  image(N)       = 2 N (F Hr + Hr D + F D) + head(N)
  text(L)        = bert(L) + 2 L h D + head(L)
  encoders       = B (image + text)
  relation       = 2 B B L N D (word-region relevance, no gradient) + 4 * 2 B B D (x x^T ...)
                   + 2 (2 B D D + 2 B B D) + 2 (2B) D D + 2 (2B)^2 D (three GCNs)
                   + tf_layer(2B, D) (one sequence of 2B)
  losses         = 4 * 2 B B D (triplets) + 2 * 2 B K D (SwAV) + 2 * 2 B M D (InfoNCE)
  clip           = B (vit(T = (img/patch)^2 + 1) + text_tf(77)), each pre-norm blocks with
                   FF 4w, + patch embedding 2 (T-1) 3 p^2 w + projections

  train step = 3 * (encoders + relation grad parts + losses) + encoders (momentum keys)
               + relevance once (forward only) [+ clip once when CLIP runs in the step]

Backward = 2 x forward for every differentiated matmul (weight and input gradients).
"""


def bert(length: int, cfg: dict) -> float:
  h, inter = cfg['hidden_size'], cfg['intermediate_size']
  per_layer = 2 * length * h * 3 * h + 2 * length * h * h + 4 * length * length * h \
      + 4 * length * h * inter
  return cfg['num_hidden_layers'] * per_layer + 2 * h * h  # + pooler


def tf_layer(s: int, d: int, ff: int | None = None) -> float:
  ff = ff or d
  return 2 * s * d * 3 * d + 2 * s * d * d + 4 * s * s * d + 4 * s * d * ff


def gglp(s: int, d: int, heads: int) -> float:
  return heads * (2 * d * d + 2 * s * d * d + 4 * s * d + 2 * d * d)


def head(s: int, m) -> float:
  d = m.embed_size
  return tf_layer(s, d) + gglp(s, d, m.gglp_heads) + 4 * m.clip_dim * d + 4 * d * d


def image_encoder(n: int, config) -> float:
  m, f = config.model, config.data.region_dim
  return 2 * n * (f * m.region_hidden + m.region_hidden * m.embed_size + f * m.embed_size) \
      + head(n, m)


def text_encoder(length: int, config) -> float:
  m = config.model
  return bert(length, m.bert) + 2 * length * m.bert['hidden_size'] * m.embed_size \
      + head(length, m)


def clip_towers(arch: dict) -> float:
  """One image + one caption through the CLIP towers (forward)."""
  w, p = arch['vision_width'], arch['patch_size']
  tokens = (arch['image_size'] // p) ** 2 + 1
  vision = 2 * (tokens - 1) * 3 * p * p * w + arch['vision_layers'] * tf_layer(tokens, w, 4 * w) \
      + 2 * w * arch['embed_dim']
  tw, c = arch['text_width'], arch['context_length']
  text = arch['text_layers'] * tf_layer(c, tw, 4 * tw) + 2 * tw * arch['embed_dim']
  return vision + text


def step_flops(config, batch_size: int, regions: int, tokens: int,
               clip_arch: dict | None = None) -> dict:
  """{'encoders', 'relation', 'losses', 'clip', 'total'} FLOPs of one training step.

  regions, tokens: per-batch widths N and L. clip_arch: include one CLIP pass per example.
  """
  b, d = batch_size, config.model.embed_size
  encoders = b * (image_encoder(regions, config) + text_encoder(tokens, config))
  relevance = 2 * b * b * tokens * regions * d
  graph = (8 * b * b * d + 2 * (2 * b * d * d + 2 * b * b * d) + 2 * (2 * b) * d * d
           + 2 * (2 * b) ** 2 * d + tf_layer(2 * b, d))
  losses = (8 * b * b * d + 4 * b * config.loss.nmb_prototypes * d
            + 4 * b * config.moco.queue_length * d)
  clip = b * clip_towers(clip_arch) if clip_arch else 0.0
  parts = {'encoders': 4 * encoders, 'relation': relevance + 3 * graph, 'losses': 3 * losses,
           'clip': clip}
  parts['total'] = sum(parts.values())
  return parts
