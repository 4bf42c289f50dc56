"""Demo: VSE-infinity (GPO) on the embedded synthetic world, a few minutes on a 2-core CPU.

  python main.py --config configs/demo.py --workdir runs/demo

The dataset is generated (seeded) into <workdir>/../synthetic_data on first use unless
data.manual_dir is set. The model is small: a 2-layer random-init BERT over the real uncased
WordPiece vocab, 256-d embeddings.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, epochs=12, batch_size=128, train_images=8000, region_dim=64,
                         embed_size=128, bert_width=64, warmup_epochs=1)
  c = common.base_config()
  c.data.name = 'synthetic'
  c.data.region_dim = arg.region_dim
  c.data.max_len = 32
  c.data.synthetic.train = arg.train_images
  c.model.embed_size = arg.embed_size
  c.model.region_hidden = 2 * arg.embed_size
  c.model.bert = dict(common.BERT_BASE, hidden_size=arg.bert_width, num_hidden_layers=2,
                      num_attention_heads=2, intermediate_size=2 * arg.bert_width,
                      max_position_embeddings=64)
  # A random-init BERT learns at the full rate here; the published configs use 0.1x for a
  # pretrained one.
  c.optim.lr_mults = (('txt/bert/.*', 1.0),)
  c.optim.lr = 5e-4
  c.optim.lr_schedules = (int(arg.epochs * 0.75),)
  c.loss.vse_mean_warmup_epochs = arg.warmup_epochs
  c.batch_size = arg.batch_size
  c.num_epochs = arg.epochs
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.eval.batch_size = 256
  return c
