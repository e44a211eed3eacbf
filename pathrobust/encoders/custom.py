"""Any ``torch.nn.Module`` as a pathrobust :class:`~pathrobust.encoders.base.Encoder`.

For notebooks: ``pathrobust.build_encoder(my_module, transform=my_transform)``. The
preprocessing is read from the transform — a torchvision ``Compose`` of ``Resize``,
``CenterCrop``, ``ToTensor``/``PILToTensor``/``ConvertImageDtype`` and ``Normalize``, or a
timm data config (``timm.data.resolve_data_config``) — and becomes the spec's geometry and
mean/std, so tiles are prepared in the extractor's workers exactly as for registered models.
Output dims and pooling variants come from one forward pass on a blank input; the weights'
identity (for run ids and provenance) is the sha256 of the module's state dict.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pathrobust.errors import UserError
from pathrobust.registry import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec

_INTERPOLATIONS = {"bicubic", "bilinear", "nearest"}


def preprocessing_from_transform(transform: Any, input_size: int = 224) -> dict[str, Any]:
    """EncoderSpec fields (``input_size``, ``resize_size``, ``interpolation``, ``mean``,
    ``std``) from a torchvision transform or a timm data config; None -> ImageNet at 224."""
    fields: dict[str, Any] = {"input_size": input_size, "resize_size": None, "interpolation": "bicubic",
                              "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    if transform is None:
        return fields
    if isinstance(transform, Mapping):  # timm data config
        size = transform.get("input_size", (3, input_size, input_size))
        side = int(size[-1])
        crop_pct = float(transform.get("crop_pct", 1.0) or 1.0)
        fields.update(input_size=side, mean=tuple(transform.get("mean", IMAGENET_MEAN)),
                      std=tuple(transform.get("std", IMAGENET_STD)),
                      interpolation=str(transform.get("interpolation", "bicubic")))
        if crop_pct < 1.0:
            fields["resize_size"] = int(side / crop_pct)
    else:
        steps = getattr(transform, "transforms", [transform])
        resized = None
        for step in steps:
            kind = type(step).__name__
            if kind == "Resize":
                size = step.size
                resized = size if isinstance(size, int) else (size[0] if len(size) == 1 else tuple(size))
                mode = str(getattr(step, "interpolation", "bicubic")).split(".")[-1].lower()
                fields["interpolation"] = mode if mode in _INTERPOLATIONS else "bicubic"
            elif kind == "CenterCrop":
                size = step.size
                fields["input_size"] = int(size if isinstance(size, int) else size[0])
            elif kind == "Normalize":
                fields["mean"], fields["std"] = tuple(map(float, step.mean)), tuple(map(float, step.std))
            elif kind not in ("ToTensor", "PILToTensor", "ConvertImageDtype", "ToImage", "ToDtype"):
                raise UserError(f"transform step {kind}: not understood; pathrobust reads Resize, CenterCrop, "
                                "ToTensor and Normalize (or pass a timm data config)")
        if isinstance(resized, int):
            if any(type(s).__name__ == "CenterCrop" for s in steps):
                fields["resize_size"] = resized
            else:
                fields["input_size"] = resized
        elif isinstance(resized, tuple):
            if resized[0] != resized[1]:
                raise UserError(f"transform Resize{resized}: pathrobust encoders take square inputs")
            fields["input_size"] = int(resized[0])
    if fields["resize_size"] is not None and fields["resize_size"] < fields["input_size"]:
        raise UserError(f"transform: resize {fields['resize_size']} is smaller than the crop {fields['input_size']}")
    return fields


def state_dict_sha256(module: nn.Module) -> str:
    """Identity of a module's weights: sha256 over its state dict's names, shapes and bytes."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def encoder_from_module(module: nn.Module, transform: Any = None, name: str | None = None,
                        pooling: str | None = None, num_prefix_tokens: int | None = None):
    """Wrap ``module`` (its ``forward_features`` or ``forward`` giving tokens, a feature map or
    vectors) as an Encoder; see the module doc."""
    from pathrobust.encoders.base import Encoder, backbone_tokens

    prep = preprocessing_from_transform(transform)
    if not isinstance(module, nn.Module):
        raise UserError(f"model: expected a torch.nn.Module, got {type(module).__name__}")
    was_training = module.training
    module.eval()
    blank = torch.zeros(1, 3, prep["input_size"], prep["input_size"])
    try:
        with torch.inference_mode():
            tokens = backbone_tokens(module, blank.to(next(module.parameters(), blank).device))
    except Exception as exc:  # the user's module on a blank input
        raise UserError(f"model {type(module).__name__}: a forward pass on a (1, 3, {prep['input_size']}, "
                        f"{prep['input_size']}) input failed ({type(exc).__name__}: {exc})") from None
    module.train(was_training)
    dim = int(tokens.shape[-1])
    prefix = num_prefix_tokens if num_prefix_tokens is not None else int(getattr(module, "num_prefix_tokens", 1))
    poolings = {"cls": dim} if tokens.shape[1] == 1 else {"cls": dim, "mean": dim, "cls+mean": 2 * dim}
    kind = type(module)
    spec = EncoderSpec(name=name or kind.__name__.lower(), family="custom", builder=f"{kind.__module__}:{kind.__qualname__}",
                       poolings=poolings, default_pooling="cls", num_prefix_tokens=prefix if tokens.shape[1] > 1 else 0,
                       pretrained=False, precision="fp32", mpp=None, license="user",
                       description="an in-memory torch module (pathrobust.build_encoder)", **prep)
    sha = state_dict_sha256(module)
    return Encoder(spec, module, spec.check_pooling(pooling), weights_sha256=sha, weights_source="in-memory module")
