"""Zero-shot CLIP baseline: the cached frozen-CLIP features alone (docs/data.md section 4).

  python main.py --config configs/clip_zeroshot.py:dataset=f30k --workdir runs/clip_f30k \
      --mode eval --config.data.manual_dir=/data \
      --config.model.clip_checkpoint=weights/open_clip_vit_b32_laion2b.safetensors
  ... :dataset=coco                          COCO 5K and 5-fold 1K (testall)
  ... --config.clip_zeroshot.normalize=False AAHR's clip_eval.py: raw dot products (not standard)

Features come from the cache of `--mode clip_cache` (built on first use); no training.
Published references (open_clip retrieval table, normalised, fp16 autocast): ViT-B-32
laion2b_s34b_b79k F30K rSum 526.86, COCO 5K 403.66; OpenAI ViT-B/32 504.36 and 361.89.
"""

from configs import common

DATASETS = {  # name -> (evaluation split, protocol)
    'f30k': ('test', 'single'),
    'coco': ('testall', 'coco'),
    'synthetic': ('test', 'single'),  # the demo world with the demo's random CLIP (weak)
}


def get_config(arg=None):
  arg = common.parse_arg(arg, dataset='f30k', normalize=True)
  if arg.dataset not in DATASETS:
    raise ValueError(f'dataset={arg.dataset!r}; expected one of {sorted(DATASETS)}')
  c = common.base_config()
  c.data.name = arg.dataset
  c.data.eval_split, c.eval.protocol = DATASETS[arg.dataset]
  if arg.dataset == 'synthetic':
    c.data.region_dim = 64
  c.model.name = 'clip_zeroshot'
  common.add_clip_fields(c)
  c.clip_zeroshot = dict(normalize=arg.normalize)  # False: AAHR's clip_eval.py scoring
  c.eval.save_sims = False  # True: also write results_<dataset>.npy
  return c
