"""Devices and precisions: what ``--device`` and ``--precision`` mean, in one place."""

from __future__ import annotations

import contextlib

import torch

from pathrobust.errors import UserError

#: precision name -> torch dtype (``fp64`` only for metrics computed in float64)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
INFERENCE_PRECISIONS = ("fp32", "bf16", "fp16")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (or None) = CUDA when available, else CPU; anything else must exist here."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device}: not a torch device (cpu, cuda, cuda:1, auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    return dev


def resolve_precision(precision: str, device: torch.device, recommended: str = "fp32") -> str:
    """``auto`` = ``recommended`` (a model's setting) on CUDA, fp32 on CPU."""
    if precision == "auto":
        return recommended if device.type == "cuda" else "fp32"
    if precision not in INFERENCE_PRECISIONS:
        raise UserError(f"--precision {precision}: expected auto, {', '.join(INFERENCE_PRECISIONS)}")
    if precision == "fp16" and device.type == "cpu":
        raise UserError("--precision fp16: not supported on CPU; use fp32 or bf16")
    return precision


def dtype_of(precision: str) -> torch.dtype:
    try:
        return DTYPES[precision]
    except KeyError:
        raise UserError(f"precision {precision}: expected one of {', '.join(DTYPES)}") from None


def autocast(precision: str, device: torch.device):
    """Autocast to ``precision`` (a no-op context for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype_of(precision))
