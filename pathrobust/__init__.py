"""pathrobust: benchmark and distill pathology tile encoders.

The CLI (``pathrobust ...``) is a thin layer over this package; everything it does is
importable::

    from pathrobust import build_encoder, extract_features
    enc = build_encoder("h0-mini", pooling="cls+mean")
"""

from __future__ import annotations

__version__ = "0.1.0"

from pathrobust.errors import UserError  # noqa: E402
from pathrobust.registry import EncoderSpec, get_spec, list_specs, register_encoder, resolve_spec  # noqa: E402
from pathrobust.encoders.base import Encoder, build_encoder  # noqa: E402
from pathrobust.extract import extract_features, load_features  # noqa: E402

__all__ = [
    "Encoder",
    "EncoderSpec",
    "UserError",
    "build_encoder",
    "extract_features",
    "get_spec",
    "list_specs",
    "load_features",
    "register_encoder",
    "resolve_spec",
]
