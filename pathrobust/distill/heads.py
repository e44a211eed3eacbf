"""Projection heads: the DINO head (DINOv2 ``dino_head.py``) and fixed prototypes.

``DINOHead``: MLP ``dim -> hidden -> hidden -> bottleneck`` (GELU), L2 normalisation, then a
weight-normalised linear layer (no bias, norm fixed to 1) to K prototypes.
``PrototypeHead``: fixed unit-norm prototypes (e.g. k-means centroids of teacher features);
logits are cosine similarities scaled by ``scale`` so that temperatures keep their meaning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DINOHead(nn.Module):
    """``(..., dim)`` -> ``(..., n_prototypes)`` logits."""

    def __init__(self, dim: int, n_prototypes: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = dim
        for _ in range(n_layers - 1):
            layers += [nn.Linear(width, hidden_dim), nn.GELU()]
            width = hidden_dim
        layers.append(nn.Linear(width, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, n_prototypes, bias=False))
        # the norm is fixed to 1 (DINO's norm_last_layer=True): only directions are learned
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        self.last_layer.parametrizations.weight.original0.requires_grad_(False)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear) and not nn.utils.parametrize.is_parametrized(m):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.last_layer.parameters() if p.requires_grad]


class PrototypeHead(nn.Module):
    """Fixed prototypes ``(K, dim)``: logits = ``scale * cos(x, prototype_k)``. No parameters."""

    def __init__(self, prototypes: torch.Tensor, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.register_buffer("prototypes", F.normalize(prototypes.float(), dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(x.float(), dim=-1) @ self.prototypes.t()


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iterations: int = 20, seed: int = 0) -> torch.Tensor:
    """Spherical k-means of ``x`` ``(N, D)`` -> ``(k, D)`` unit centroids (k-means++-free:
    initial centroids are ``k`` distinct rows chosen with ``seed``; empty clusters keep theirs)."""
    x = F.normalize(x.float(), dim=-1)
    if x.shape[0] < k:
        raise ValueError(f"k-means needs at least k={k} vectors, got {x.shape[0]}")
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(x.shape[0], generator=g)[:k].to(x.device)].clone()
    for _ in range(iterations):
        assign = (x @ centroids.t()).argmax(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        filled = counts > 0
        centroids[filled] = F.normalize(sums[filled], dim=-1)
    return centroids
