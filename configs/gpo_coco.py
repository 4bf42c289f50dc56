"""VSE-infinity (GPO), BUTD regions + BERT-base, COCO; the published hyper-parameters.

  python -m conversion bert --src bert-base-uncased/ --out weights/bert-base-uncased.safetensors
  python main.py --config configs/gpo_coco.py --workdir runs/gpo_coco \
      --config.data.manual_dir=/data

woodfrog/vse_infty train_region.sh: AdamW lr 5e-4 (BERT 0.1x), wd 1e-4, 25 epochs, lr x0.1 at
epoch 15, batch 128, embed 1024, margin 0.2, max violation after a 1-epoch mean-violation
warm-up, grad clip 2.0. Evaluation: COCO 5-fold 1K and 5K on testall.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, batch_size=128)
  c = common.base_config()
  c.data.name = 'coco'
  c.data.region_dim = 2048
  # Longest COCO evaluation caption: 56 BERT tokens; training captions are not measured here:
  # training refuses to start if this would cut any (data.allow_truncation).
  c.data.max_len = 64
  c.data.eval_split = 'testall'
  c.eval.eccv = True  # ECCV Caption / CxC on testall (eccv-caption package)
  c.model.bert_init = 'weights/bert-base-uncased.safetensors'
  c.optim.lr = 5e-4
  c.optim.lr_schedules = (15,)
  c.num_epochs = 25
  c.batch_size = arg.batch_size
  c.eval.protocol = 'coco'
  return c
