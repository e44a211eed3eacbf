"""Distillation of a frozen teacher encoder into a timm ViT student (DINO + iBOT + KoLeo).

Modules, one job each: ``losses/`` (DINO, iBOT, KoLeo, feature regression), ``heads``
(DINO projection heads, fixed prototypes), ``masking`` (BEiT block masks), ``augment``
(multi-crop pathology augmentation), ``schedules`` (lr, weight decay, teacher temperature,
EMA momentum), ``recipe`` (TOML -> validated dataclasses), ``data`` (tile folders, tile h5,
whole slides; deterministic per-step batches and per-rank shards), ``dist``
(torch.distributed helpers), ``trainer`` and ``export``.
"""

from pathrobust.distill.recipe import Recipe, load_recipe

__all__ = ["Recipe", "load_recipe"]
