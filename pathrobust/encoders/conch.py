"""CONCH's vision tower, laid out so MahmoodLab's ``pytorch_model.bin`` loads strictly.

CONCH (MahmoodLab/CONCH, ``conch_ViT-B-16``) is a CoCa model. The image path used for tile
embeddings, ``model.encode_image(image, proj_contrast=False, normalize=False)`` (what the
CONCH README recommends for linear probes and MIL, and what plismbench, CLAM and HEST call),
is::

    tokens = trunk.forward_features(x)            # timm ViT-B/16 at 448 px: CLS + 28*28 tokens, final LayerNorm
    pooled = attn_pool_contrast(tokens)[:, 0]     # one learned 512-d query cross-attending to all 785 tokens
    embedding = ln_contrast(pooled)               # (B, 512)

``proj_contrast=True`` adds ``embedding @ proj_contrast`` (512 x 512), the space shared with
the text tower; ``normalize=True`` then L2-normalises. Both widths are 512, so a wrong
choice would not show up as a shape error: the spec's ``arch_kwargs["proj_contrast"]``
chooses, default ``False`` (the README's vision-encoder embedding).

Module names are the checkpoint's ``visual.*`` names with the prefix removed (``trunk.*``,
``attn_pool_contrast.{query,attn.*,ln_q,ln_k}``, ``ln_contrast``, ``proj_contrast``);
:func:`convert_conch` picks those tensors out of the full CoCa state dict.
"""

from __future__ import annotations

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pathrobust.errors import UserError
from pathrobust.registry import EncoderSpec, register_converter

VISUAL_PREFIX = "visual."
# The captioning pooler only feeds CoCa's text decoder; no image embedding uses it.
CAPTION_ONLY_PREFIXES = ("attn_pool_caption.", "ln_caption.")
ARCH_KWARGS = ("width", "depth", "num_heads", "mlp_ratio", "patch_size", "embed_dim_contrast",
               "attn_pooler_heads", "proj_contrast")


class AttentionalPooler(nn.Module):
    """CoCa's attentional pooler: ``n_queries`` learned ``d_model`` queries, LayerNormed,
    cross-attend to the LayerNormed ``context_dim`` tokens (keys and values projected from
    ``context_dim`` to ``d_model``). Returns ``(B, n_queries, d_model)``."""

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        # Sequence-first like CONCH's; kdim != d_model gives separate q/k/v_proj_weight tensors.
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_k(x).permute(1, 0, 2)  # (B, N, C) -> (N, B, C)
        q = self.ln_q(self.query).unsqueeze(1).expand(-1, x.shape[1], -1)
        out = self.attn(q, x, x, need_weights=False)[0]
        return out.permute(1, 0, 2)


class ConchVision(nn.Module):
    """CONCH ``VisualModel`` with ``attentional_pool_contrast=True`` (captioning pooler left out).

    ``forward_features`` returns ``(B, 1, embed_dim_contrast)``: the image embedding as the
    single prefix token, so the ``cls`` pooling is the embedding itself."""

    def __init__(self, width: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 patch_size: int = 16, img_size: int = 448, embed_dim_contrast: int = 512,
                 attn_pooler_heads: int = 8, proj_contrast: bool = False) -> None:
        super().__init__()
        # CONCH's coca_model._build_vision_tower: timm defaults otherwise (CLS token, qkv bias,
        # final LayerNorm, no pre-norm), forward = forward_features.
        self.trunk = VisionTransformer(
            img_size=img_size, patch_size=patch_size, embed_dim=width, depth=depth, num_heads=num_heads,
            mlp_ratio=mlp_ratio, num_classes=0, dynamic_img_size=True,
        )
        self.attn_pool_contrast = AttentionalPooler(embed_dim_contrast, width, attn_pooler_heads, n_queries=1)
        self.ln_contrast = nn.LayerNorm(embed_dim_contrast)
        self.proj_contrast = nn.Parameter(width**-0.5 * torch.randn(embed_dim_contrast, embed_dim_contrast))
        self.project = proj_contrast

    def embed(self, x: torch.Tensor, project: bool | None = None) -> torch.Tensor:
        """``encode_image(x, proj_contrast=project, normalize=False)`` -> ``(B, 512)``."""
        tokens = self.trunk.forward_features(x)
        pooled = self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])
        if self.project if project is None else project:
            pooled = pooled @ self.proj_contrast
        return pooled

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)[:, None, :]


def build_conch_vision(spec: EncoderSpec) -> nn.Module:
    kw = dict(spec.arch_kwargs)
    unknown = sorted(set(kw) - set(ARCH_KWARGS))
    if unknown:
        raise UserError(f"encoder spec '{spec.name}': unknown CONCH arch_kwargs {unknown} (known: {sorted(ARCH_KWARGS)})")
    return ConchVision(img_size=spec.input_size, **kw)


@register_converter("conch")
def convert_conch(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CONCH CoCa state dict -> :class:`ConchVision` state dict.

    Keeps the ``visual.*`` tensors without the prefix (a vision-only state dict, already
    unprefixed, passes through), drops the captioning pooler and, when the model's input
    size differs from the checkpoint's, resamples ``trunk.pos_embed`` the way CONCH's
    ``resize_pos_embed`` does for ``force_image_size`` (bilinear, no antialiasing)."""
    if sd and all(k.startswith("module.") for k in sd):  # DDP wrapper, as CONCH's read_state_dict strips
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if any(k.startswith(VISUAL_PREFIX) for k in sd):
        sd = {k[len(VISUAL_PREFIX):]: v for k, v in sd.items() if k.startswith(VISUAL_PREFIX)}
    elif not any(k.startswith("trunk.") for k in sd):
        raise UserError(f"not a CONCH checkpoint: no 'visual.*' or 'trunk.*' keys (first key '{next(iter(sd), '')}')")
    sd = {k: v for k, v in sd.items() if not k.startswith(CAPTION_ONLY_PREFIXES)}
    own = model.state_dict().get("trunk.pos_embed")
    pos = sd.get("trunk.pos_embed")
    if own is not None and pos is not None and pos.shape != own.shape and pos.shape[-1] == own.shape[-1]:
        sd["trunk.pos_embed"] = resample_abs_pos_embed(
            pos, new_size=list(model.trunk.patch_embed.grid_size), num_prefix_tokens=1,
            interpolation="bilinear", antialias=False,
        )
    return sd
