"""Colour deconvolution for H&E (Ruifrok & Johnston), in torch.

Shared by the HED-histogram baseline, the HED stain jitter of distillation and the
simulated stainings of the synthetic PLISM data. Conventions follow scikit-image's
``rgb2hed``/``hed2rgb``: RGB in [0, 1], optical density ``OD = log(max(rgb, eps)) / log(eps)``
(so OD is in [0, 1]), and ``stains = OD @ HED_FROM_RGB``.
"""

from __future__ import annotations

import torch

# Rows: haematoxylin, eosin, DAB optical-density vectors (scikit-image's rgb_from_hed).
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
EPS = 1e-6


def rgb_to_hed(rgb: torch.Tensor) -> torch.Tensor:
    """``rgb`` (..., 3, H, W) in [0, 1] -> stain concentrations (..., 3, H, W), >= 0."""
    log_adjust = torch.log(torch.tensor(EPS, dtype=rgb.dtype, device=rgb.device))
    od = torch.log(rgb.clamp_min(EPS)) / log_adjust
    m = HED_FROM_RGB.to(rgb.device, rgb.dtype)
    stains = torch.einsum("...chw,cd->...dhw", od, m)
    return stains.clamp_min(0)


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hed`: concentrations (..., 3, H, W) -> RGB in [0, 1]."""
    log_adjust = torch.log(torch.tensor(EPS, dtype=hed.dtype, device=hed.device))
    m = RGB_FROM_HED.to(hed.device, hed.dtype)
    log_rgb = -torch.einsum("...chw,cd->...dhw", hed * -log_adjust, m)
    return torch.exp(log_rgb).clamp(0, 1)
