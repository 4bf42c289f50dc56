"""VSE-infinity (GPO), BUTD regions + BERT-base, Flickr30K; the published hyper-parameters.

  python -m conversion bert --src bert-base-uncased/ --out weights/bert-base-uncased.safetensors
  python main.py --config configs/gpo_f30k.py --workdir runs/gpo_f30k \
      --config.data.manual_dir=/data

woodfrog/vse_infty train_region.sh: AdamW lr 5e-4 (BERT 0.1x), wd 1e-4, 25 epochs, lr x0.1 at
epoch 15, batch 128, embed 1024, margin 0.2, max violation after a 1-epoch mean-violation
warm-up, grad clip 2.0. Evaluation: Flickr30K 1K test.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, batch_size=128)
  c = common.base_config()
  c.data.name = 'f30k'
  c.data.region_dim = 2048
  # Longest F30K evaluation caption: 88 BERT tokens; training captions are not measured here:
  # training refuses to start if this would cut any (data.allow_truncation).
  c.data.max_len = 96
  c.data.eval_split = 'test'
  c.model.bert_init = 'weights/bert-base-uncased.safetensors'
  c.optim.lr = 5e-4
  c.optim.lr_schedules = (15,)
  c.num_epochs = 25
  c.batch_size = arg.batch_size
  c.eval.protocol = 'single'
  return c
