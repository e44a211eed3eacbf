"""KoLeo regulariser (Sablayrolles et al. 2019; DINOv2 ``koleo_loss.py``).

Spreads the student's features: ``-mean_i log(min_{j != i} ||x_i - x_j||)`` over
L2-normalised vectors. Nearest neighbours are found by the largest dot product (equivalent
on the unit sphere)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``x`` ``(B, D)`` (B >= 2) -> scalar ``-mean_i log(||x_i - x_nn(i)|| + eps)`` after L2
    normalisation, computed in float32."""
    if x.shape[0] < 2:
        return x.sum() * 0.0
    x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(-2.0)  # below any cosine: a vector is never its own neighbour
        nn_index = dots.argmax(dim=1)
    distances = F.pairwise_distance(x, x[nn_index], p=2, eps=eps)
    return -torch.log(distances + eps).mean()
