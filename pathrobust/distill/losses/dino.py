"""DINO loss on CLS tokens and the two ways of centring the teacher's targets.

Definitions follow DINOv2 (``dinov2/loss/dino_clstoken_loss.py``): the teacher's logits
over K prototypes become targets either by Sinkhorn-Knopp (equipartition over the batch,
3 iterations, float32) or by subtracting an EMA centre before a sharpened softmax; the
student's log-softmax at temperature ``student_temp`` is scored by cross-entropy against
every teacher crop except a global crop paired with itself, averaged over those pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pathrobust.distill.dist import all_reduce_max, all_reduce_sum


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3,
                   n_samples: torch.Tensor | int | None = None) -> torch.Tensor:
    """Sinkhorn-Knopp targets from teacher logits.

    Args:
        teacher_logits: ``(B, K)`` logits (this rank's rows).
        teacher_temp: temperature of ``exp(logits / temp)``.
        n_iterations: alternating normalisations (DINOv2: 3).
        n_samples: total rows over all ranks (default ``B * world`` reduced here); pass the
            reduced count when ranks hold different numbers of rows (iBOT's masked tokens).

    Returns:
        ``(B, K)`` float32: every row sums to 1; over the whole (all-rank) batch each
        prototype's column sum tends to ``n_samples / K`` (balanced assignment).
    """
    scaled = teacher_logits.float() / teacher_temp
    # subtracting the global maximum cancels in the first normalisation and keeps exp finite
    top = scaled.max() if scaled.numel() else scaled.new_tensor(float("-inf"))
    q = torch.exp(scaled - all_reduce_max(top.reshape(1).clone())).t()  # (K, B)
    k = q.shape[0]
    if n_samples is None:
        n_samples = all_reduce_sum(torch.tensor(float(q.shape[1]), device=q.device))
    n = torch.as_tensor(n_samples, dtype=q.dtype, device=q.device)
    q /= all_reduce_sum(q.sum())
    for _ in range(n_iterations):
        # each prototype gets mass 1/K (a prototype no sample reaches stays at 0, not 0/0)
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True)).clamp_min(torch.finfo(q.dtype).tiny)
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # each sample gets mass 1/B
        q /= n
    q *= n
    return q.t()


def softmax_centered(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """``softmax((logits - center) / temp)`` in float32: ``(B, K)``, ``(1, K)`` -> ``(B, K)``."""
    return F.softmax((teacher_logits.float() - center) / teacher_temp, dim=-1)


class EMACenter(nn.Module):
    """The DINO v1 centre: ``c <- m c + (1 - m) mean_batch(logits)``, batch mean over all ranks."""

    def __init__(self, dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))

    def targets(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Targets with the current centre, then the centre update. ``(B, K)`` -> ``(B, K)``."""
        out = softmax_centered(teacher_logits, self.center, teacher_temp)
        self.update(teacher_logits)
        return out

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        total = all_reduce_sum(teacher_logits.float().sum(dim=0, keepdim=True))
        count = all_reduce_sum(torch.tensor(float(teacher_logits.shape[0]), device=total.device))
        self.center.mul_(self.momentum).add_(total / count, alpha=1 - self.momentum)


def dino_loss(student_global: torch.Tensor, student_local: torch.Tensor | None,
              teacher_probs: torch.Tensor, student_temp: float = 0.1) -> torch.Tensor:
    """Cross-entropy between student crops and teacher global crops.

    Args:
        student_global: ``(G, B, K)`` student logits of the G global crops.
        student_local: ``(L, B, K)`` student logits of the L local crops, or None.
        teacher_probs: ``(G, B, K)`` centred teacher targets of the same G global crops.
        student_temp: student softmax temperature.

    Returns:
        Scalar: mean over the ``G*(G-1) + L*G`` (student crop, teacher crop) pairs, pairs of a
        global crop with itself skipped, of the batch-mean cross-entropy.
    """
    g = student_global.shape[0]
    total = student_global.new_zeros(())
    n_terms = 0
    lsm_global = F.log_softmax(student_global.float() / student_temp, dim=-1)
    for i in range(g):
        for j in range(g):
            if i != j:
                total = total - (teacher_probs[j] * lsm_global[i]).sum(-1).mean()
                n_terms += 1
    if student_local is not None and student_local.shape[0] > 0:
        lsm_local = F.log_softmax(student_local.float() / student_temp, dim=-1)  # (L, B, K)
        # sum over teacher crops j and local crops at once: (L, B, K) x (G, B, K)
        cross = torch.einsum("lbk,gbk->lgb", lsm_local, teacher_probs)
        total = total - cross.mean(dim=-1).sum()
        n_terms += student_local.shape[0] * g
    return total / max(n_terms, 1)
