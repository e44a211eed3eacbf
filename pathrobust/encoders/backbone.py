"""Build a spec's backbone (its architecture) and load its weights into it.

:func:`create_backbone` instantiates the architecture with random weights: the spec's
``builder`` (``function(spec) -> nn.Module``) or ``timm.create_model(spec.arch, **kwargs)``.
:func:`load_backbone` adds the weights: :mod:`pathrobust.weights` finds and reads the
checkpoint, the converter the spec names (``weights_format``) maps its keys, and the result
must fit the architecture exactly.

When a timm ``config.json`` (``architecture`` + ``model_args``) accompanies the weights it
is authoritative for the architecture; the spec adds what the config cannot hold (layer
classes such as SwiGLUPacked). The config is data: the layer classes it names are checked
(:mod:`pathrobust.trust`) before anything is imported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pathrobust import trust
from pathrobust.errors import UserError
from pathrobust.registry import EncoderSpec, get_converter
from pathrobust.weights import check_fits, locate_weights, read_state_dict, sha256_file


def resolve_layer_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Specs store layer classes as ``"module:Name"`` strings (JSON-friendly); import them.

    The strings come from Python code or were checked when their file was read."""
    return trust.resolve_layer_kwargs(kwargs)


def create_backbone(spec: EncoderSpec, arch_kwargs: Mapping[str, Any] | None = None,
                    arch: str | None = None) -> nn.Module:
    """Instantiate the architecture with random weights (seeded by ``spec.seed``).

    ``arch``/``arch_kwargs`` override the spec's own (a hub ``config.json`` is authoritative
    when there is one)."""
    torch.manual_seed(spec.seed)
    if spec.builder:
        builder = spec.builder if callable(spec.builder) else trust.load_reference(
            spec.builder, f"encoder spec '{spec.name}': builder")
        return builder(spec)
    import timm

    kwargs = resolve_layer_kwargs(spec.arch_kwargs if arch_kwargs is None else arch_kwargs)
    kwargs.setdefault("num_classes", 0)
    arch = arch or spec.arch
    try:
        return timm.create_model(arch, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError) as exc:  # unknown name, unknown or bad kwargs
        raise UserError(f"encoder spec '{spec.name}': timm cannot build '{arch}' with {kwargs} "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def architecture_from_config(spec: EncoderSpec, config: dict[str, Any] | None) -> tuple[str | None, dict[str, Any]]:
    """The hub config is authoritative; the spec supplies what JSON cannot (layer classes)."""
    if config is None or spec.builder:
        return spec.arch, dict(spec.arch_kwargs)
    kwargs = dict(spec.arch_kwargs)
    kwargs.update(config.get("model_args", {}))
    return config["architecture"], kwargs


def load_backbone(spec: EncoderSpec, weights: str | os.PathLike | None = None,
                  trust_code: bool = False) -> tuple[nn.Module, str, str]:
    """Build ``spec``'s backbone with its weights. Returns ``(module, sha256, source)``.

    ``trust_code``: let a ``config.json`` beside the weights name any layer class."""
    if not spec.pretrained or (weights is not None and str(weights) == "random"):
        return create_backbone(spec), f"random-init:seed={spec.seed}", "random initialisation"
    found = locate_weights(spec, weights)
    if found.config is not None:
        model_args = found.config.get("model_args", {})
        config_file = found.path.parent / "config.json"
        if not isinstance(model_args, dict) or not isinstance(found.config.get("architecture"), str):
            raise UserError(f"{config_file}: expected 'architecture' (a timm name) and 'model_args' (an object)")
        trust.check_layer_kwargs(model_args, str(config_file), "model_args.", trust_code)
    arch, kwargs = architecture_from_config(spec, found.config)
    module = create_backbone(spec, kwargs, arch)
    sd = read_state_dict(found.path)
    try:
        sd = get_converter(spec)(sd, module)
    except UserError as exc:
        raise UserError(f"{found.source}: {exc}") from None
    except KeyError as exc:  # a converter missing a tensor it needs
        raise UserError(f"{found.source}: does not fit the converter '{spec.weights_format}' ({exc})") from None
    check_fits(module, sd, found.source)
    module.load_state_dict(sd, strict=True)
    return module, sha256_file(found.path), found.source
