"""Demo on the embedded synthetic world: a few minutes on a 2-core CPU.

  python main.py --config configs/demo.py --workdir runs/demo                  # AAHR (3 epochs)
  python main.py --config configs/demo.py:model=gpo --workdir runs/demo_gpo    # VSE-infinity (GPO)

The dataset is generated (seeded) into <workdir>/data on first use unless data.manual_dir is
set, then built with the same tfds builder as Flickr30K/COCO. The models are small: a 2-layer
random-init BERT over the real uncased WordPiece vocab, 128-d embeddings. AAHR gets its frozen
CLIP features from a seeded random-init CLIP (no pretrained weights offline), cached once.
Deviations from the published recipes, for a random-init BERT and a short run: BERT at the full
learning rate (not 0.1x), lr 1e-3, batch 64; AAHR's gates scaled down so every loss term is on.
6,000 training images (30,000 captions) keep AAHR's 3 epochs within 5 minutes on a slow 2-core
CPU; `:train_images=8000` gives the larger world the earlier README results used.
"""

from configs import aahr_common
from configs import common


def _small_bert(width: int) -> dict:
  return dict(common.BERT_BASE, hidden_size=width, num_hidden_layers=2, num_attention_heads=2,
              intermediate_size=2 * width, max_position_embeddings=64)


def get_config(arg=None):
  arg = common.parse_arg(arg, model='aahr', epochs=0, batch_size=64, train_images=6000,
                         region_dim=64, embed_size=128, bert_width=64, warmup_epochs=2)
  if not arg.epochs:  # AAHR learns faster per step but each step costs about twice as much
    arg.epochs = 3 if arg.model == 'aahr' else 5
  if arg.model == 'aahr':
    c = aahr_common.aahr_config('f30k', batch_size=arg.batch_size, nmb_prototypes=64,
                                mask_weight=1.0)
    c.model = aahr_common.aahr_model(arg.embed_size, _small_bert(arg.bert_width))
    c.model.region_hidden = 2 * arg.embed_size
    c.model.num_heads = 4
    c.model.clip_checkpoint = ''  # the seeded demo CLIP (input_pipeline/clip_cache.py)
    c.relation.num_heads = 4
    c.moco.queue_length = 16 * arg.batch_size
    steps_per_epoch = arg.train_images * 5 // arg.batch_size
    c.loss.freeze_prototypes_niters = steps_per_epoch // 2  # SwAV from mid epoch 0
    c.relation.warmup = steps_per_epoch                     # graph losses from epoch 1
    aahr_common.set_quirks(c, 'faithful')
  elif arg.model == 'gpo':
    c = common.base_config()
    c.model.embed_size = arg.embed_size
    c.model.region_hidden = 2 * arg.embed_size
    c.model.bert = _small_bert(arg.bert_width)
    c.loss.vse_mean_warmup_epochs = arg.warmup_epochs
  else:
    raise ValueError(f"configs/demo.py: model={arg.model!r}; expected 'gpo' or 'aahr'")
  c.data.name = 'synthetic'
  c.data.manual_dir = ''
  c.data.region_dim = arg.region_dim
  c.data.max_len = 32
  c.data.synthetic.train = arg.train_images
  c.optim.lr_mults = (('txt/bert/.*', 1.0),)
  c.optim.lr = 1e-3
  c.optim.lr_schedules = (max(1, int(arg.epochs * 0.75)),)
  c.batch_size = arg.batch_size
  c.num_epochs = arg.epochs
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.eval.protocol = 'single'
  c.eval.batch_size = 256
  c.data.eval_split = 'test'
  return c
