"""Plain feature regression, the baseline that needs no heads: the student's (projected)
tokens regress the teacher's tokens by cosine distance."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_regression_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``(..., D)`` student and teacher vectors -> scalar mean of ``1 - cos(student, teacher)``."""
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
