"""AAHR, BUTD regions + BERT-base + frozen CLIP ViT-B/32 features, MS-COCO; the published
hyper-parameters (docs/method.md 3.4; run_coco.sh).

  python -m conversion bert --src bert-base-uncased/ --out weights/bert-base-uncased.safetensors
  python main.py --config configs/coco.py --workdir runs/coco \
      --config.data.manual_dir=/data
  python main.py --config configs/coco.py:quirks=corrected ...   # bug-fixed variant

run_coco.sh: batch 256, 40 epochs, lr 5e-4 (BERT 0.1x) x0.1 at epochs 15 and 25, AdamW wd 1e-4,
grad clip 2.0, 768 prototypes (Sinkhorn eps 0.1, tau 0.1), mask_weight 1.5, graph warm-up 8000
iterations, MoCo queue 2048 with momentum 0.999, triplet cut-off 1.9. Evaluation: COCO 5-fold 1K
and 5K on testall.
"""

from configs import aahr_common
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, batch_size=256, quirks='faithful')
  c = aahr_common.aahr_config('coco', batch_size=arg.batch_size, nmb_prototypes=768,
                              mask_weight=1.5)
  # Longest COCO evaluation caption (testall, dev): 56 BERT tokens. Training captions are not
  # measured here: `--mode verify_data` reports every split's longest, and training refuses to
  # start if this would cut any (data.allow_truncation).
  c.data.max_len = 96
  c.data.eval_split = 'testall'
  c.eval.eccv = True  # ECCV Caption / CxC on testall (eccv-caption package)
  c.model.bert_init = 'weights/bert-base-uncased.safetensors'
  return aahr_common.set_quirks(c, arg.quirks)
