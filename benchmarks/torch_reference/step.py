"""The whole AAHR training step in PyTorch (docs/method.md 1.2, 2.16, 2.19, 3.1-3.2).

Order within a step, as the original: EMA of the key encoders from this step's query
parameters, query encoders (CLIP inside, no grad), criterion, key encoders (CLIP inside
again), InfoNCE against the queues, enqueue, NaN check (a host sync, as the original's
`if torch.isnan(loss)`), backward, global-norm clipping to 2.0, AdamW with four groups.
The EMA is applied before the query forward instead of after it: it reads the same
parameters, so the result is identical.

Precision: 'bf16' runs the encoders and CLIP under torch.autocast(bfloat16) and the criterion
in fp32; 'fp32' disables autocast. `compile=True` wraps the forward + losses in torch.compile
(the optimizer and EMA stay eager).
"""

import copy
import dataclasses

import torch
from torch.nn import functional as F
import transformers

from benchmarks.torch_reference import criterion as criterion_lib
from benchmarks.torch_reference import encoders


@dataclasses.dataclass
class Sizes:
  """Everything the reference needs from a JAX config (see `sizes_from_config`)."""
  img_dim: int
  embed_size: int
  region_hidden: int
  num_heads: int
  dropout: float
  gglp_heads: int
  residual_weight: float
  clip_dim: int
  bert: dict
  relation_heads: int
  num_prototypes: int
  cutoff: float
  mask_weight: float
  swav: dict
  queue_length: int
  momentum: float
  lr: float
  bert_lr_mult: float
  grad_clip: float
  clip: dict  # open_clip CLIP(embed_dim, vision_cfg, text_cfg) arguments


def sizes_from_config(config, clip_arch: dict) -> Sizes:
  m, loss = config.model, config.loss
  bert_mult = dict(config.optim.lr_mults).get('txt/bert/.*', 1.0)
  return Sizes(
      img_dim=config.data.region_dim, embed_size=m.embed_size, region_hidden=m.region_hidden,
      num_heads=m.num_heads, dropout=m.dropout, gglp_heads=m.gglp_heads,
      residual_weight=m.residual_weight, clip_dim=m.clip_dim, bert=dict(m.bert),
      relation_heads=config.relation.num_heads, num_prototypes=loss.nmb_prototypes,
      cutoff=loss.triplet_cutoff, mask_weight=config.relation.mask_weight,
      swav=dict(temperature=loss.swav_temperature, epsilon=loss.sinkhorn_epsilon,
                iterations=loss.sinkhorn_iterations),
      queue_length=config.moco.queue_length, momentum=config.moco.momentum,
      lr=config.optim.lr, bert_lr_mult=bert_mult, grad_clip=config.optim.grad_clip,
      clip=open_clip_args(clip_arch))


def open_clip_args(arch: dict) -> dict:
  """open_clip.model.CLIP arguments from the benchmark's CLIP description."""
  return dict(
      embed_dim=arch['embed_dim'],
      vision_cfg=dict(image_size=arch['image_size'], patch_size=arch['patch_size'],
                      width=arch['vision_width'], layers=arch['vision_layers'],
                      head_width=arch['vision_width'] // arch['vision_heads']),
      text_cfg=dict(context_length=arch['context_length'], vocab_size=arch['vocab_size'],
                    width=arch['text_width'], heads=arch['text_heads'],
                    layers=arch['text_layers']))


def build_clip(args: dict):
  """OpenCLIP's CLIP at random init (no weights offline; the cost is the architecture's)."""
  import open_clip  # pylint: disable=import-outside-toplevel
  return open_clip.model.CLIP(**args)


class ReferenceStep:
  """Holds the model, the key encoders, the queues and the optimizer; `step(batch)` trains."""

  def __init__(self, s: Sizes, device: str, precision: str = 'bf16', compile: bool = False,
               seed: int = 0):
    torch.manual_seed(seed)
    self.s, self.device = s, torch.device(device)
    self.amp = precision == 'bf16'
    self.clip = build_clip(s.clip).to(self.device).eval().requires_grad_(False)
    bert = transformers.BertModel(transformers.BertConfig(**s.bert))
    self.img = encoders.ImageEncoder(s).to(self.device).train()
    self.txt = encoders.TextEncoder(s, bert).to(self.device).train()
    self.criterion = criterion_lib.Criterion(
        s.embed_size, s.num_prototypes, s.relation_heads, s.cutoff, s.mask_weight,
        s.swav, relevance_matmul_dtype=torch.bfloat16 if self.amp else None
    ).to(self.device).train()
    # Key encoders: deep copies; BERT in inference mode, the rest in train mode (Q13).
    self.key_img = copy.deepcopy(self.img).requires_grad_(False)
    self.key_txt = copy.deepcopy(self.txt).requires_grad_(False)
    self.key_txt.bert.eval()
    self.query_params = list(self.img.parameters()) + list(self.txt.parameters())
    self.key_params = list(self.key_img.parameters()) + list(self.key_txt.parameters())
    d, m = s.embed_size, s.queue_length
    self.queue_img = F.normalize(torch.rand(d, m, device=self.device), dim=0)
    self.queue_txt = F.normalize(torch.rand(d, m, device=self.device), dim=0)
    self.pointer = 0
    bert_ids = {id(p) for p in self.txt.bert.parameters()}
    self.optimizer = torch.optim.AdamW([
        {'params': [p for p in self.txt.parameters() if id(p) not in bert_ids], 'lr': s.lr},
        {'params': list(self.txt.bert.parameters()), 'lr': s.lr * s.bert_lr_mult},
        {'params': list(self.img.parameters()), 'lr': s.lr},
        {'params': list(self.criterion.parameters()), 'lr': s.lr},
    ], lr=s.lr, weight_decay=1e-4)
    self.trainable = [p for g in self.optimizer.param_groups for p in g['params']]
    self.forward = torch.compile(self._forward) if compile else self._forward

  def _forward(self, b: dict):
    autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)
    with autocast:
      v, v1, regions = self.img(b['regions'], b['region_len'], b['images'], self.clip)
      t, t1, words = self.txt(b['bert_ids'], b['bert_len'], b['clip_tokens'], self.clip)
      with torch.no_grad():
        vk = self.key_img(b['regions'], b['region_len'], b['images'], self.clip)[0]
        tk = self.key_txt(b['bert_ids'], b['bert_len'], b['clip_tokens'], self.clip)[0]
    with torch.autocast(self.device.type, enabled=False):
      f = lambda x: x.float()
      loss = self.criterion(f(v), f(t), f(v1), f(t1), f(regions), f(words), b['bert_len'],
                            b['image_index'])
      loss = loss + criterion_lib.info_nce(f(v1), f(t1), f(vk), f(tk), self.queue_img,
                                           self.queue_txt)
    return loss, vk.float(), tk.float()

  @torch.no_grad()
  def _ema(self):
    torch._foreach_mul_(self.key_params, self.s.momentum)
    torch._foreach_add_(self.key_params, self.query_params, alpha=1.0 - self.s.momentum)

  @torch.no_grad()
  def _enqueue(self, vk, tk):
    n = vk.shape[0]
    self.queue_img[:, self.pointer:self.pointer + n] = vk.t()
    self.queue_txt[:, self.pointer:self.pointer + n] = tk.t()
    self.pointer = (self.pointer + n) % self.s.queue_length

  def step(self, batch: dict):
    self._ema()
    self.optimizer.zero_grad(set_to_none=True)
    loss, vk, tk = self.forward(batch)
    self._enqueue(vk, tk)
    if torch.isnan(loss):  # the original's check: a host sync every step
      return loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.trainable, self.s.grad_clip)
    self.optimizer.step()
    return loss.detach()


def torch_batch(batch: dict, device: str) -> dict:
  """Numpy benchmark batch -> tensors at the per-batch widths (the original's padding)."""
  n, length = int(batch['region_len'].max()), int(batch['bert_len'].max())
  t = lambda a, dtype: torch.as_tensor(a).to(device=device, dtype=dtype)
  return {'regions': t(batch['regions'][:, :n], torch.float32),
          'region_len': t(batch['region_len'], torch.long),
          'bert_ids': t(batch['bert_ids'][:, :length], torch.long),
          'bert_len': t(batch['bert_len'], torch.long),
          'image_index': t(batch['image_index'], torch.long),
          'images': t(batch['images'], torch.float32).permute(0, 3, 1, 2).contiguous(),
          'clip_tokens': t(batch['clip_tokens'], torch.long)}
