"""CONCH vision tower: a timm ViT-B/16 trunk at 448 px, attentional pooling with one query
(CoCa's contrastive pooler), LayerNorm and a projection to the 512-d image embedding.

Module names follow the CONCH checkpoint's ``visual.*`` layout (``trunk``,
``attn_pool_contrast``, ``ln_contrast``, ``proj_contrast``) so its state dict loads after the
``visual.`` prefix is stripped (see :mod:`pathrobust.encoders.convert`).
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from pathrobust.registry import EncoderSpec


class AttentionalPooler(nn.Module):
    """``n_queries`` learned queries cross-attending to the tokens (CoCa)."""

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_k(x)
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.attn(q, x, x, need_weights=False)[0]


class ConchVision(nn.Module):
    def __init__(self, embed_dim: int = 768, depth: int = 12, num_heads: int = 12, proj_dim: int = 512,
                 img_size: int = 448) -> None:
        super().__init__()
        self.trunk = timm.create_model(
            "vit_base_patch16_224", img_size=img_size, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, num_classes=0, global_pool="",
        )
        self.attn_pool_contrast = AttentionalPooler(embed_dim, embed_dim, n_head=8, n_queries=1)
        self.ln_contrast = nn.LayerNorm(embed_dim)
        self.proj_contrast = nn.Parameter(torch.randn(embed_dim, proj_dim) * embed_dim**-0.5)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Returns ``(B, 1, proj_dim)``: the image embedding as the only (prefix) token."""
        tokens = self.trunk.forward_features(x)
        pooled = self.ln_contrast(self.attn_pool_contrast(tokens))
        return pooled @ self.proj_contrast


def build_conch_vision(spec: EncoderSpec) -> nn.Module:
    kw = spec.arch_kwargs
    return ConchVision(kw.get("embed_dim", 768), kw.get("depth", 12), kw.get("num_heads", 12),
                       kw.get("proj_dim", 512), spec.input_size)
