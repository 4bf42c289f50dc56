"""PyTorch reference of AAHR's training step, run the way the released code runs it: the frozen
CLIP image and text towers are evaluated inside the step (by the query and again by the key
encoders), momentum encoders, the instance relation module, every loss, AdamW.

Written from docs/method.md (1.2, 2, 3) for benchmarks/train_step.py. The maths is the original's;
its per-item Python loops (MaxK pooling, the per-caption relevance loop, the exception-driven
negative sampling) are vectorised, so this baseline is faster than the released code, not slower.

  encoders.py   image / text encoders with CLIP inside (docs/method.md 2.2-2.11)
  criterion.py  DWS triplet, SwAV, instance relation module, InfoNCE (docs/method.md 2.13-2.17)
  step.py       the whole step: query + key encoders, EMA, queues, AdamW (docs/method.md 2.19, 3)
"""
