"""AAHR configuration shared by configs/f30k.py and configs/coco.py: the model, its losses, the
relation module, prototypes, momentum contrast, and one flag per quirk of the released code.

Values are the released code's (docs/method.md 3.4: arguments.py defaults, run_f30k.sh /
run_coco.sh, hard-coded constants). `quirks='faithful'` (default) reproduces the released code
and is required for converted checkpoints and the published numbers; `quirks='corrected'` flips
every quirk flag that fixes a bug (table QUIRK_FLAGS; docs/method.md section 5).
"""

import ml_collections

from configs import common

# config path -> (faithful value, corrected value, quirk ids of docs/method.md section 5)
QUIRK_FLAGS = {
    'model.gglp_mask_padding': (False, True, 'Q1, Q20'),   # GGLP softmax over pads < batch max
    'model.renorm_fused': (False, True, 'Q5, Q10, Q16'),   # fused embeddings not unit-norm
    'model.bn_mask_padding': (False, True, 'Q8'),          # region BN statistics include pads
    'loss.triplet_max_over': ('all', 'eligible', 'Q9'),    # DWS row max over every entry
    'loss.triplet_on_empty_row': ('zero_direction', 'skip_row', 'Q9'),
    'loss.reg_loss': ('constant', 'off', 'Q3'),            # inert KL term: logged constant
    'moco.query': ('prefusion', 'fused', 'Q12'),           # queries v1/t1, keys fused
    'moco.key_encoder_mode': ('mixed', 'train', 'Q13'),    # key BERT eval, rest train mode
    'moco.mask_same_image': (False, True, 'Q14'),          # queue false negatives kept
    'relation.fine_grained_mask_padding': (False, True, 'Q17'),
    'data.token_aug_exclude_special': (False, True, 'Q19'),  # augmentation may insert [PAD]
}


def set_quirks(config: ml_collections.ConfigDict, mode: str) -> ml_collections.ConfigDict:
  """Sets every flag of QUIRK_FLAGS to its faithful or corrected value."""
  if mode not in ('faithful', 'corrected'):
    raise ValueError(f"quirks={mode!r}: expected 'faithful' or 'corrected'")
  for path, (faithful, corrected, _) in QUIRK_FLAGS.items():
    section, name = path.split('.')
    config[section][name] = faithful if mode == 'faithful' else corrected
  config.quirks = mode
  return config


def aahr_model(embed_size: int = 1024, bert: dict | None = None) -> ml_collections.ConfigDict:
  """config.model for aahr_jax.models.aahr.AAHR (fields = AAHRSettings + name, bert)."""
  m = ml_collections.ConfigDict()
  m.name = 'aahr'
  m.embed_size = embed_size            # D
  m.region_hidden = embed_size // 2    # FC_MLP hidden width (512)
  m.bert = dict(bert or common.BERT_BASE)
  m.bert_init = ''                     # converted BERT; '' = random init
  m.bert_remat = False                 # recompute BERT layers in the backward pass (memory)
  m.bert_scan = False                  # scan one BERT layer over stacked parameters
  m.num_heads = 16                     # local Transformers (nhead)
  m.dropout = 0.1                      # local Transformers
  m.gglp_heads = 8                     # hard-coded MultiHeadAttention(1024, 8)
  m.gglp_logit_scale = 1.0             # Q2: cosine logits, no temperature (a design choice)
  m.residual_weight = 0.8              # beta: v1 = beta * MaxK + (1 - beta) * GGLP
  m.maxk = 2
  m.gate_l2_inputs = True              # no_imgnorm = no_txtnorm = False
  m.renorm_fused = False
  m.bn_mask_padding = False
  m.gglp_mask_padding = False
  # Frozen CLIP whose global features are model inputs (cached once; docs/method.md 2.2).
  m.clip_dim = 512
  m.use_clip = True
  # OpenCLIP ViT-B-32 laion2b_s34b_b79k converted by `python -m conversion open_clip`.
  m.clip_checkpoint = 'weights/open_clip_vit_b32_laion2b.safetensors'
  return m


def aahr_config(dataset: str, batch_size: int, nmb_prototypes: int,
                mask_weight: float) -> ml_collections.ConfigDict:
  """The published AAHR configuration for `dataset` ('f30k' or 'coco')."""
  c = common.base_config()
  c.data.name = dataset
  c.data.region_dim = 2048
  c.data.num_regions = 36
  c.data.dev_captions = 5000           # Q32: dev truncated to the first 5,000 captions
  # Augmentation: common.base_config's (region_keep_prob 0.8; token_aug_probs select 0.2, of
  # those mask 0.5, random 0.1, delete 0.4), the released code's values.

  common.add_clip_fields(c)
  c.model = aahr_model()

  c.loss = ml_collections.ConfigDict()
  c.loss.base_loss = 'trip'            # DWS triplet (the released code's 'vse' option is not implemented)
  c.loss.gnn_loss = 'trip'             # likewise
  c.loss.triplet_margin = 0.2          # hard-coded; --margin is not used by the triplet
  c.loss.triplet_dim = 512             # DWS d
  c.loss.triplet_distance_clamp = 0.5
  c.loss.triplet_cutoff = 1.9 if dataset == 'coco' else 1.7
  c.loss.triplet_max_over = 'all'
  c.loss.triplet_on_empty_row = 'zero_direction'
  c.loss.swav_weight = 0.2
  c.loss.freeze_prototypes_niters = 2200  # SwAV loss used when it > 2200
  c.loss.nmb_prototypes = nmb_prototypes  # K
  c.loss.swav_temperature = 0.1
  c.loss.sinkhorn_epsilon = 0.1
  c.loss.sinkhorn_iterations = 3
  c.loss.reg_loss = 'constant'
  c.loss.reg_loss_weight = 10.0
  c.loss.moco_weight = 1.0             # InfoNCE weight once the queues are full

  c.relation = ml_collections.ConfigDict()
  c.relation.warmup = 8000             # graph losses from it >= 8000
  c.relation.threshold = 0.5           # connectivity: top floor(B * threshold) per row
  c.relation.topk = 10
  c.relation.mask_weight = mask_weight  # mu
  c.relation.sigma = 1.0
  c.relation.kl_temperature = 1.0
  c.relation.num_heads = 16
  c.relation.num_layers = 1            # num_layers_enc
  c.relation.dropout = 0.1
  c.relation.gcn_dropout = 0.6
  c.relation.relevance_fn = 'aahr_scan_mean'  # the only one implemented (HREM's learned and
  # CHAN's relevance functions are not)
  c.relation.fine_grained_mask_padding = False
  # Captions per pass of the word-region relevance: -1 auto (CPU: chunks of ~4 MiB of scores,
  # several times faster; GPU/TPU: all at once), 0 all at once, >0 this many (bounds memory).
  c.relation.caption_chunk = -1

  c.moco = ml_collections.ConfigDict()
  c.moco.enabled = True
  c.moco.queue_length = 2048           # moco_M (a multiple of the batch size)
  c.moco.momentum = 0.999              # moco_r
  c.moco.temperature = 0.07
  c.moco.query = 'prefusion'
  c.moco.key_encoder_mode = 'mixed'
  c.moco.mask_same_image = False

  c.optim.lr = 5e-4
  c.optim.lr_schedules = (15, 25)      # epochs at which every group's lr is x decay_rate
  c.optim.decay_rate = 0.1
  c.optim.weight_decay = 1e-4          # every group, biases and norms included
  c.optim.grad_clip = 2.0              # global L2 over encoders + criterion
  c.optim.lr_mults = (('txt/bert/.*', 0.1),)
  c.optim.graph_lr_factor = 1.0        # criterion group (prototypes, GNN Transformer, GCNs)
  # Never updated in the original (no gradient -> torch AdamW skips them): BERT pooler, the
  # unused BN, the HREM relevance MLPs. Prototypes and the graph module start late with their own
  # Adam step counts (docs/method.md 3.1).
  c.optim.frozen = ('.*/bns_1/.*', 'txt/bert/pooler/.*')

  c.batch_size = batch_size
  c.num_epochs = 40
  c.log_every_steps = 200

  c.eval.protocol = 'coco' if dataset == 'coco' else 'single'
  c.eval.batch_size = batch_size       # Q20: caption embeddings depend on the eval batch
  c.eval.selection_split = 'dev'       # Q4: one released train.py selects on the test split
  c.quirks = 'faithful'
  return c
