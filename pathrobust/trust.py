"""Which ``"module:attr"`` references a data file may make pathrobust import and call.

Encoder specs name layer classes, builders and checkpoint-key converters as
``"module:attr"`` strings so that they fit in JSON. When such a string comes from a *file*
(an ``encoder.json`` in a model directory, a ``config.json`` beside the weights or in the
Hugging Face cache, a distillation recipe) it is data, not code: importing and calling
whatever it names would let a downloaded file run anything (``"act_layer": "os:abort"``).
Without ``trust_code=True`` (``--trust-code``) a file may only name

* a layer class (an ``nn.Module`` subclass, or a ``functools.partial`` of one) of
  ``torch.nn`` or ``timm.layers``, or
* one of pathrobust's own named builders and layers (:data:`PATHROBUST_CALLABLES`).

Anything else is refused with one line naming the file and the key. Specs built in Python
(the built-in catalog, installed plugins, ``--model module:factory``) are code the user
chose to run; their strings are imported as they are.

Timm's own string names (``"act_layer": "gelu"``) contain no colon; timm resolves them from
its own tables and they need no check.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping
from typing import Any

from pathrobust.errors import UserError

# Namespaces whose nn.Module classes any file may name (importing them runs no foreign code).
LAYER_MODULES = ("torch.nn", "timm.layers")
# pathrobust's own builders and layers that built-in specs and distilled students name.
PATHROBUST_CALLABLES = frozenset({
    "pathrobust.encoders.baselines:build_histogram",
    "pathrobust.encoders.conch:build_conch_vision",
    "pathrobust.encoders.conch:convert_conch",
    "pathrobust.encoders.convert:LayerNormEps12",
    "pathrobust.encoders.convert:convert_in_order",
    "pathrobust.encoders.convert:convert_timm",
    "pathrobust.encoders.convert:convert_transformers",
})
BUILDER_KEY = "builder"
CONVERTER_KEY = "weights_format"


def is_reference(value: Any) -> bool:
    """A ``"module:attr"`` string (what specs use for classes and functions)."""
    return isinstance(value, str) and ":" in value


def _in_layer_module(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in LAYER_MODULES)


def is_allowed(target: str) -> bool:
    """Whether a file may name ``target`` without ``trust_code``: see the module docstring."""
    if target in PATHROBUST_CALLABLES:
        return True
    module, _, attr = target.partition(":")
    if not attr or not _in_layer_module(module):
        return False
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return False
    from torch import nn

    while isinstance(obj, functools.partial):  # e.g. timm.layers.SwiGLUPacked = partial(GluMlp, ...)
        obj = obj.func
    return isinstance(obj, type) and issubclass(obj, nn.Module)


def check_reference(target: str, where: str, key: str, trust_code: bool = False) -> None:
    """Raise a one-line UserError unless ``target`` may be imported (see module docstring)."""
    if trust_code or is_allowed(target):
        return
    raise UserError(
        f"{where}: '{key}' = '{target}' is not a layer class of {' or '.join(LAYER_MODULES)} nor one of "
        "pathrobust's own, so it is not imported; pass trust_code=True (--trust-code) only if you trust "
        "this file to run code"
    )


def check_layer_kwargs(kwargs: Mapping[str, Any], where: str, prefix: str = "", trust_code: bool = False) -> None:
    """Check the ``*_layer`` references of architecture kwargs (the ones pathrobust imports)."""
    for key, value in kwargs.items():
        if key.endswith("_layer") and is_reference(value):
            check_reference(value, where, f"{prefix}{key}", trust_code)


def check_spec_data(data: Mapping[str, Any], where: str, trust_code: bool = False) -> None:
    """Check every reference of a spec read from a file: builder, converter, layer kwargs."""
    for key in (BUILDER_KEY, CONVERTER_KEY):
        value = data.get(key)
        if value is not None and not isinstance(value, str):
            raise UserError(f"{where}: '{key}' must be a string, got {value!r}")
        if key == BUILDER_KEY and value is not None and not is_reference(value):
            raise UserError(f"{where}: '{key}' = '{value}' must be MODULE:FUNCTION")
        if is_reference(value):
            check_reference(value, where, key, trust_code)
    kwargs = data.get("arch_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise UserError(f"{where}: 'arch_kwargs' must be an object, got {kwargs!r}")
    check_layer_kwargs(kwargs, where, "arch_kwargs.", trust_code)


def load_reference(target: str, what: str) -> Any:
    """Import ``module:attr`` (already checked or named by Python code); one-line errors.

    ``what`` names the reference in messages (``encoder spec 'x': builder``)."""
    module, _, attr = target.partition(":")
    if not module or not attr:
        raise UserError(f"{what}: '{target}' must be MODULE:NAME")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as exc:
        raise UserError(f"{what}: cannot import module '{module}' of '{target}' ({exc})") from None
    except AttributeError:
        raise UserError(f"{what}: module '{module}' has no attribute '{attr}' ('{target}')") from None


def resolve_layer_kwargs(kwargs: Mapping[str, Any], what: str = "arch_kwargs") -> dict[str, Any]:
    """``*_layer`` references -> the classes they name (kwargs checked beforehand)."""
    return {key: load_reference(value, f"{what}.{key}") if key.endswith("_layer") and is_reference(value) else value
            for key, value in kwargs.items()}
