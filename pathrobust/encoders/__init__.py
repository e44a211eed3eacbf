"""Encoders: the :class:`Encoder` wrapper, and built-in specs one module per family.

``catalog`` imports every family module so that their ``@register_encoder`` decorators run.
"""

from pathrobust.encoders.base import Encoder, build_encoder, pool_tokens

__all__ = ["Encoder", "build_encoder", "pool_tokens"]
