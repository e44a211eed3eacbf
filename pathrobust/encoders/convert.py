"""Checkpoint-key converters, the functions a spec's ``weights_format`` names.

``timm``: the checkpoint already has timm's names (wrappers such as ``module.`` stripped,
classifier heads dropped). ``in-order``: same tensors in the same order under other names.
``transformers-vit`` / ``transformers-dinov2``: Hugging Face ``transformers`` ViT / DINOv2
checkpoints into timm ViTs, as follows. (CONCH's converter lives with its model in
:mod:`pathrobust.encoders.conch`.)

Phikon (``ViTModel``), Phikon-v2, Hibou and Midnight (``Dinov2Model``, with or without
registers) publish transformers-layout weights. pathrobust runs every ViT through timm, so
their state dicts are renamed key by key; both the classic names of published checkpoints
(``encoder.layer.N.attention.attention.query``) and transformers 5's names
(``layers.N.attention.q_proj``) are understood. Separate q/k/v projections are fused into
timm's ``qkv``; SwiGLU gate/up projections into the packed ``fc1``; DINOv2's CLS position
embedding is folded into the CLS token when the timm model adds positions to patches only
(``no_embed_class``); position grids of another size are resampled (bicubic).
"""

from __future__ import annotations

import re
from functools import partial

import torch
from torch import nn

from pathrobust.errors import UserError
from pathrobust.registry import register_converter

# transformers' ViT uses LayerNorm eps 1e-12 (timm's default is 1e-6); specs name this class.
LayerNormEps12 = partial(nn.LayerNorm, eps=1e-12)

_BLOCK = re.compile(r"^(?:encoder\.layers?|layers)\.(\d+)\.(.+)$")
_QKV_KEY = re.compile(r"^attention\.(?:attention\.)?(query|key|value|q_proj|k_proj|v_proj)\.(weight|bias)$")
_GATE_UP_KEY = re.compile(r"^mlp\.(gate_proj|up_proj)\.(weight|bias)$")
_BLOCK_RENAMES = [
    (r"^attention\.(?:output\.dense|o_proj)\.(weight|bias)$", r"attn.proj.\1"),
    (r"^(?:layernorm_before|norm1)\.(weight|bias)$", r"norm1.\1"),
    (r"^(?:layernorm_after|norm2)\.(weight|bias)$", r"norm2.\1"),
    (r"^(?:intermediate\.dense|mlp\.fc1|mlp\.weights_in)\.(weight|bias)$", r"mlp.fc1.\1"),
    (r"^(?:output\.dense|mlp\.fc2|mlp\.weights_out|mlp\.down_proj)\.(weight|bias)$", r"mlp.fc2.\1"),
    (r"^layer_scale1\.lambda1$", "ls1.gamma"),
    (r"^layer_scale2\.lambda1$", "ls2.gamma"),
]
_QKV = {"query": 0, "q_proj": 0, "key": 1, "k_proj": 1, "value": 2, "v_proj": 2}


def _strip_wrappers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "model.", "backbone.", "encoder."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


@register_converter("timm")
def convert_timm(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    sd = _strip_wrappers(sd)
    # Heads are not part of a feature extractor built with num_classes=0.
    own = model.state_dict()
    return {k: v for k, v in sd.items() if k in own or not k.startswith(("head.", "fc.", "classifier."))}


@register_converter("in-order")
def convert_in_order(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map checkpoint tensors onto the model key by key in order (same architecture, other
    naming, e.g. the efficientnet-lite0 package onto timm ``tf_efficientnet_lite0``)."""
    own = list(model.state_dict())
    theirs = [k for k in sd if not k.startswith(("_fc.", "fc.", "classifier."))]
    if len(theirs) != len(own):
        raise UserError(
            f"checkpoint has {len(theirs)} tensors but the architecture expects {len(own)}"
        )
    return {mine: sd[k] for mine, k in zip(own, theirs)}


def _strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("vit.", "dinov2.", "model.", "backbone."):
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


@register_converter("transformers-vit", "transformers-dinov2")
def convert_transformers(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a transformers ViT/DINOv2 state dict for the timm ``model`` (see module doc)."""
    sd = _strip_prefix(sd)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], list[torch.Tensor | None]] = {}
    gate_up: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    pos = None
    for key, value in sd.items():
        if key.startswith("pooler.") or key == "embeddings.mask_token":
            continue  # not part of the feature extractor
        if key == "embeddings.cls_token":
            out["cls_token"] = value
        elif key == "embeddings.register_tokens":
            out["reg_token"] = value
        elif key == "embeddings.position_embeddings":
            pos = value
        elif key.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("layernorm."):
            out["norm." + key.rsplit(".", 1)[1]] = value
        elif m := _BLOCK.match(key):
            block, rest = int(m.group(1)), m.group(2)
            if q := _QKV_KEY.match(rest):
                qkv.setdefault((block, q.group(2)), [None, None, None])[_QKV[q.group(1)]] = value
                continue
            if g := _GATE_UP_KEY.match(rest):
                gate_up.setdefault((block, g.group(2)), {})[g.group(1)] = value
                continue
            for pattern, repl in _BLOCK_RENAMES:
                if re.match(pattern, rest):
                    out[f"blocks.{block}." + re.sub(pattern, repl, rest)] = value
                    break
            else:
                out[key] = value  # unknown: left as-is so the fit check names it
        else:
            out[key] = value
    for (block, kind), parts in qkv.items():
        if any(p is None for p in parts):
            raise KeyError(f"block {block}: incomplete query/key/value {kind}")
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    for (block, kind), parts in gate_up.items():
        # packed SwiGLU: act(first half) * second half == silu(gate) * up
        out[f"blocks.{block}.mlp.fc1.{kind}"] = torch.cat([parts["gate_proj"], parts["up_proj"]], dim=0)
    if pos is not None:
        out.update(_position_embedding(pos, out, model))
    return out


def _position_embedding(pos: torch.Tensor, out: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """transformers keeps a CLS position (1, 1 + N, D); timm models with ``no_embed_class``
    add positions to patches only, so the CLS position is folded into the CLS token."""
    from timm.layers import resample_abs_pos_embed

    result = {}
    if getattr(model, "no_embed_class", False):
        if "cls_token" in out:
            result["cls_token"] = out["cls_token"] + pos[:, :1]
        pos, prefix = pos[:, 1:], 0
    else:
        prefix = 1
    target = model.pos_embed.shape[1] - prefix
    if pos.shape[1] - prefix != target:
        grid = tuple(model.patch_embed.grid_size)
        pos = resample_abs_pos_embed(pos, new_size=list(grid), num_prefix_tokens=prefix)
    result["pos_embed"] = pos
    return result
