"""The :class:`Encoder` module every suite and the distiller use, and :func:`build_encoder`.

An Encoder wraps a backbone with the spec's normalisation and pooling:

* ``encoder.prepare(tile)`` — geometric preprocessing of one uint8 ``(H, W, 3)`` tile to a
  uint8 ``(3, S, S)`` tensor (resize / centre crop). Cheap, runs in DataLoader workers, and
  keeps batches in uint8 so host-to-device copies are 4x smaller.
* ``encoder.forward_tokens(x)`` — ``x`` float ``(B, 3, S, S)`` in [0, 1] (or uint8) ->
  tokens ``(B, N, D)``, prefix tokens (CLS, registers) first. A CNN's final feature map
  becomes ``1 + h*w`` tokens, the global average first.
* ``encoder(x)`` — pooled features ``(B, output_dim)`` for the selected pooling.

Normalisation lives inside the module, so a teacher and a student with different
mean/std can share the same augmented batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pathrobust.encoders.backbone import create_backbone, load_backbone, resolve_layer_kwargs
from pathrobust.errors import UserError
from pathrobust.registry import EncoderSpec, resolve_spec

__all__ = ["Encoder", "backbone_tokens", "build_encoder", "create_backbone", "pool_tokens", "prepare_tile",
           "resolve_layer_kwargs"]


def pool_tokens(tokens: torch.Tensor, pooling: str, num_prefix_tokens: int) -> torch.Tensor:
    """Pool tokens ``(B, N, D)`` -> ``(B, D)`` (``cls``, ``mean``) or ``(B, 2D)`` (``cls+mean``).

    ``mean`` averages the patch tokens only (after the ``num_prefix_tokens`` CLS/register
    tokens); when a backbone has no patch tokens it averages all tokens."""
    cls = tokens[:, 0]
    if pooling == "cls":
        return cls
    patches = tokens[:, num_prefix_tokens:] if tokens.shape[1] > num_prefix_tokens else tokens
    mean = patches.mean(dim=1)
    if pooling == "mean":
        return mean
    if pooling == "cls+mean":
        return torch.cat([cls, mean], dim=-1)
    raise ValueError(f"unknown pooling '{pooling}'")


def backbone_tokens(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a backbone and return tokens ``(B, N, D)`` whatever its output layout."""
    out = backbone.forward_features(x) if hasattr(backbone, "forward_features") else backbone(x)
    if out.ndim == 4:  # CNN feature map (B, C, h, w): global average first, then h*w patch tokens
        flat = out.flatten(2).transpose(1, 2)
        return torch.cat([flat.mean(dim=1, keepdim=True), flat], dim=1)
    if out.ndim == 2:
        return out[:, None, :]
    return out


_INTERPOLATION = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest"}


def prepare_tile(tile: np.ndarray | torch.Tensor, spec: EncoderSpec) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` tile -> uint8 ``(3, S, S)``: shorter-side resize to
    ``spec.resize_size`` then centre crop ``spec.input_size`` (or a direct resize to the
    input size when ``resize_size`` is None). Tiles already at the input size pass through."""
    # np.require copies only read-only or non-contiguous arrays (PIL hands out read-only ones)
    t = tile if isinstance(tile, torch.Tensor) else torch.from_numpy(np.require(tile, requirements=["C", "W"]))
    if t.ndim != 3 or t.shape[-1] not in (3, 4):
        raise UserError(f"tile has shape {tuple(t.shape)}; expected (H, W, 3)")
    t = t[..., :3].permute(2, 0, 1)
    size = spec.input_size
    h, w = t.shape[1:]
    if spec.resize_size is None:
        if (h, w) != (size, size):
            t = _resize(t, (size, size), spec.interpolation)
        return t.contiguous()
    short = spec.resize_size
    if min(h, w) != short:
        scale = short / min(h, w)
        t = _resize(t, (max(short, round(h * scale)), max(short, round(w * scale))), spec.interpolation)
        h, w = t.shape[1:]
    top, left = (h - size) // 2, (w - size) // 2
    return t[:, top : top + size, left : left + size].contiguous()


def _resize(t: torch.Tensor, hw: tuple[int, int], interpolation: str) -> torch.Tensor:
    mode = _INTERPOLATION[interpolation]
    x = t[None].float()
    kwargs = {"antialias": True} if mode in ("bilinear", "bicubic") else {}
    y = F.interpolate(x, size=hw, mode=mode, align_corners=False if mode != "nearest" else None, **kwargs)
    return y.round_().clamp_(0, 255).to(torch.uint8)[0]


class Encoder(nn.Module):
    """A backbone plus the spec's normalisation and pooling. See the module docstring."""

    def __init__(self, spec: EncoderSpec, backbone: nn.Module, pooling: str | None = None,
                 weights_sha256: str | None = None, weights_source: str | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        self.pooling = spec.check_pooling(pooling)
        self.weights_sha256 = weights_sha256
        self.weights_source = weights_source
        self.tiles_embedded = 0  # throughput bookkeeping of the extractor (tiles, seconds)
        self.seconds_embedding = 0.0
        # CNNs (depthwise convolutions above all) run ~1.8x faster in channels-last layout on CPU
        self.channels_last = not hasattr(backbone, "patch_embed") and any(
            isinstance(m, nn.Conv2d) for m in backbone.modules())
        if self.channels_last:
            backbone.to(memory_format=torch.channels_last)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def num_prefix_tokens(self) -> int:
        return self.spec.num_prefix_tokens

    @property
    def output_dim(self) -> int:
        return self.spec.poolings[self.pooling]

    @property
    def input_size(self) -> int:
        return self.spec.input_size

    def prepare(self, tile: np.ndarray | torch.Tensor) -> torch.Tensor:
        return prepare_tile(tile, self.spec)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return backbone_tokens(self.backbone, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pool_tokens(self.forward_tokens(x), self.pooling, self.num_prefix_tokens)

    @property
    def tiles_per_second(self) -> float | None:
        """Extraction throughput so far (decoding included), or None before any extraction."""
        return self.tiles_embedded / self.seconds_embedding if self.seconds_embedding > 0 else None

    def provenance(self) -> dict[str, Any]:
        """What a feature file or run records about this encoder."""
        return {
            "model": self.spec.name,
            "spec_hash": self.spec.hash,
            "pooling": self.pooling,
            "output_dim": self.output_dim,
            "input_size": self.spec.input_size,
            "mean": list(self.spec.mean),
            "std": list(self.spec.std),
            "weights_sha256": self.weights_sha256 or "",
            "weights_source": self.weights_source or "",
        }


# -- building ----------------------------------------------------------------------------
def build_encoder(model: str | EncoderSpec | nn.Module, *, pooling: str | None = None, weights: str | None = None,
                  device: str | torch.device = "cpu", trust_code: bool = False, transform: Any = None,
                  name: str | None = None) -> Encoder:
    """Build an encoder ready for inference (eval mode, frozen).

    Args:
        model: a registered name, ``pkg.module:factory``, ``file.py:factory``, a distilled
            model directory, an EncoderSpec, an Encoder (returned as it is, re-pooled if
            asked), or any ``torch.nn.Module`` (with ``transform``: its preprocessing, a
            torchvision Compose or a timm data config; ``name``: its row name — see
            :mod:`pathrobust.encoders.custom`).
        pooling: pooling variant (default: the spec's).
        weights: a weights file or directory; ``"random"`` for the random initialisation
            (tests, floors). Default: search as described in :mod:`pathrobust.weights`.
        device: where to put the module.
        trust_code: let files (a model directory's ``encoder.json``, a ``config.json`` beside
            the weights) name builders and layers other than torch's, timm's and
            pathrobust's own (see :mod:`pathrobust.trust`).
    """
    if isinstance(model, Encoder):
        if pooling is None or pooling == model.pooling:
            return model.to(device)
        return Encoder(model.spec, model.backbone, pooling, model.weights_sha256, model.weights_source).to(device)
    if isinstance(model, nn.Module):
        from pathrobust.encoders.custom import encoder_from_module

        encoder = encoder_from_module(model, transform=transform, name=name, pooling=pooling)
        encoder.eval().requires_grad_(False)
        return encoder.to(device)
    spec = resolve_spec(model, trust_code=trust_code)
    pooling = spec.check_pooling(pooling)
    backbone, sha256, source = load_backbone(spec, weights, trust_code=trust_code)
    encoder = Encoder(spec, backbone, pooling, weights_sha256=sha256, weights_source=source)
    encoder.eval().requires_grad_(False)
    return encoder.to(device)
