"""Schedules as pure functions of the step (DINOv2 ``CosineScheduler`` semantics).

Every schedule is evaluated at the training step, so a resumed run gets the same values."""

from __future__ import annotations

import math


def cosine(step: int, total: int, start: float, end: float, warmup_steps: int = 0,
           warmup_start: float = 0.0) -> float:
    """Linear warm-up ``warmup_start -> start`` over ``warmup_steps``, then a cosine from
    ``start`` to ``end`` reaching ``end`` at ``total - 1``; ``end`` after."""
    if step < warmup_steps:
        return warmup_start + (start - warmup_start) * step / warmup_steps
    span = max(total - warmup_steps - 1, 1)
    t = min(max(step - warmup_steps, 0) / span, 1.0)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * t))


def linear_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """``start -> end`` linearly over ``warmup_steps``, then constant ``end`` (teacher temperature)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


def scaled_lr(base_lr: float, batch_size: int, reference_batch: int = 1024) -> float:
    """DINOv2's square-root scaling: ``base_lr * sqrt(batch / 1024)``."""
    return base_lr * math.sqrt(batch_size / reference_batch)
