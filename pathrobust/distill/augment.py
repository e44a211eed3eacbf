"""Multi-crop pathology augmentation, deterministic per sample.

One tile (uint8 ``(H, W, 3)``) -> ``n_global`` global crops and ``n_local`` local crops,
float in [0, 1]. Each crop: random resized crop (DINO scales), horizontal/vertical flips,
a random multiple of 90 degrees (tissue has no canonical orientation), colour jitter
(brightness, contrast, saturation, hue), HED stain jitter (Tellez et al. 2018: stain
concentrations from colour deconvolution scaled by ``U(1-s, 1+s)`` and shifted by
``U(-b, b)``) and Gaussian blur. No solarisation (meaningless for H&E).

Randomness comes from a ``torch.Generator`` the caller seeds per (seed, step, sample), so
the crops of a sample do not depend on the number of ranks, workers or on resuming.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from pathrobust.distill.recipe import AugmentConfig, CropsConfig
from pathrobust.stain import EPS, HED_FROM_RGB, RGB_FROM_HED


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def _chance(g: torch.Generator, p: float) -> bool:
    return p > 0 and float(torch.rand((), generator=g)) < p


def random_resized_crop_box(g: torch.Generator, height: int, width: int, scale: tuple[float, float],
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box ``(top, left, h, w)`` drawn from ``g``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(g, *scale)
        aspect = math.exp(_uniform(g, *log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=g))
            left = int(torch.randint(0, width - w + 1, (), generator=g))
            return top, left, h, w
    side = min(height, width)  # fallback: centre square
    return (height - side) // 2, (width - side) // 2, side, side


def hed_jitter(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``x`` (3, H, W) RGB in [0, 1]; ``alpha``, ``beta`` (3,) per-stain scale and shift.

    Uses :mod:`pathrobust.stain`'s colour-deconvolution matrices but keeps negative stain
    concentrations (``rgb_to_hed`` clamps them to 0), so ``alpha = 1, beta = 0`` returns the
    input unchanged."""
    eps = torch.tensor(EPS, dtype=torch.float32)
    log_eps = torch.log(eps)
    od = torch.log(x.float().clamp_min(EPS)) / log_eps  # (3, H, W), in [0, 1]
    stains = torch.einsum("chw,cd->dhw", od, HED_FROM_RGB.float())
    stains = stains * alpha.view(3, 1, 1) + beta.view(3, 1, 1)
    od = torch.einsum("dhw,dc->chw", stains, RGB_FROM_HED.float())
    return torch.exp(od * log_eps).clamp(0, 1).to(x.dtype)


class MultiCropAugment:
    """Callable ``(tile uint8 HxWx3, generator) -> (globals (G,3,Sg,Sg), locals (L,3,Sl,Sl))``."""

    def __init__(self, crops: CropsConfig, augment: AugmentConfig) -> None:
        self.crops = crops
        self.aug = augment

    def __call__(self, tile: np.ndarray, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        img = torch.from_numpy(np.array(tile[..., :3], dtype=np.uint8, copy=True)).permute(2, 0, 1)  # uint8 (3, H, W)
        c, a = self.crops, self.aug
        globals_ = [self.crop(img, g, c.global_size, c.global_scale, a.blur_p[i]) for i in range(c.n_global)]
        locals_ = [self.crop(img, g, c.local_size, c.local_scale, a.blur_p_local) for _ in range(c.n_local)]
        local_t = torch.stack(locals_) if locals_ else torch.zeros(0, 3, c.local_size, c.local_size)
        return torch.stack(globals_), local_t

    def crop(self, img: torch.Tensor, g: torch.Generator, size: int, scale: list[float], blur_p: float) -> torch.Tensor:
        a = self.aug
        top, left, h, w = random_resized_crop_box(g, img.shape[1], img.shape[2], (scale[0], scale[1]))
        x = TF.resized_crop(img, top, left, h, w, [size, size], antialias=True).float().div_(255.0)
        if _chance(g, a.flip_p):
            x = x.flip(-1)
        if _chance(g, a.flip_p):
            x = x.flip(-2)
        if a.rot90:
            k = int(torch.randint(0, 4, (), generator=g))
            x = torch.rot90(x, k, dims=(-2, -1))
        if _chance(g, a.color_jitter_p):
            x = self.color_jitter(x, g)
        if _chance(g, a.hed_p):
            alpha = torch.tensor([_uniform(g, 1 - a.hed_sigma, 1 + a.hed_sigma) for _ in range(3)])
            beta = torch.tensor([_uniform(g, -a.hed_bias, a.hed_bias) for _ in range(3)])
            x = hed_jitter(x, alpha, beta)
        if _chance(g, blur_p):
            sigma = _uniform(g, *a.blur_sigma) * size / 224  # the recipe's sigma is for 224 px
            kernel = max(3, 2 * math.ceil(3 * sigma) + 1)
            x = TF.gaussian_blur(x, [kernel, kernel], [sigma, sigma])
        return x.clamp_(0, 1).contiguous()

    def color_jitter(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Brightness, contrast, saturation, hue in a random order (torchvision ColorJitter)."""
        a = self.aug
        factors = {
            0: _uniform(g, max(0.0, 1 - a.brightness), 1 + a.brightness),
            1: _uniform(g, max(0.0, 1 - a.contrast), 1 + a.contrast),
            2: _uniform(g, max(0.0, 1 - a.saturation), 1 + a.saturation),
            3: _uniform(g, -a.hue, a.hue),
        }
        for op in torch.randperm(4, generator=g).tolist():
            if op == 0 and a.brightness > 0:
                x = TF.adjust_brightness(x, factors[0])
            elif op == 1 and a.contrast > 0:
                x = TF.adjust_contrast(x, factors[1])
            elif op == 2 and a.saturation > 0:
                x = TF.adjust_saturation(x, factors[2])
            elif op == 3 and a.hue > 0:
                x = TF.adjust_hue(x, factors[3])
        return x
