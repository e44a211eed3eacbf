"""Distillation losses, one per module; pure functions plus small stateful wrappers."""

from pathrobust.distill.losses.dino import EMACenter, dino_loss, sinkhorn_knopp, softmax_centered
from pathrobust.distill.losses.ibot import ibot_loss
from pathrobust.distill.losses.koleo import koleo_loss
from pathrobust.distill.losses.regression import cosine_regression_loss

__all__ = ["EMACenter", "cosine_regression_loss", "dino_loss", "ibot_loss", "koleo_loss",
           "sinkhorn_knopp", "softmax_centered"]
