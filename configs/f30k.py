"""AAHR, BUTD regions + BERT-base + frozen CLIP ViT-B/32 features, Flickr30K; the published
hyper-parameters (docs/method.md 3.4; run_f30k.sh).

  python -m conversion bert --src bert-base-uncased/ --out weights/bert-base-uncased.safetensors
  python main.py --config configs/f30k.py --workdir runs/f30k \
      --config.data.manual_dir=/data
  python main.py --config configs/f30k.py:quirks=corrected ...   # bug-fixed variant

run_f30k.sh: batch 128, 40 epochs, lr 5e-4 (BERT 0.1x) x0.1 at epochs 15 and 25, AdamW wd 1e-4,
grad clip 2.0, 384 prototypes (Sinkhorn eps 0.1, tau 0.1), mask_weight 1.0, graph warm-up 8000
iterations, MoCo queue 2048 with momentum 0.999, triplet cut-off 1.7. Evaluation: F30K 1K test.
"""

from configs import aahr_common
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, batch_size=128, quirks='faithful')
  c = aahr_common.aahr_config('f30k', batch_size=arg.batch_size, nmb_prototypes=384,
                              mask_weight=1.0)
  # Longest F30K evaluation caption (test, dev): 88 BERT tokens. Training captions are not
  # measured here: training refuses to start if this would cut any (data.allow_truncation).
  c.data.max_len = 96
  c.data.eval_split = 'test'
  c.model.bert_init = 'weights/bert-base-uncased.safetensors'
  return aahr_common.set_quirks(c, arg.quirks)
