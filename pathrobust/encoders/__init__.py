"""Encoders: the :class:`Encoder` wrapper, and built-in specs one module per family.

Importing this package imports :mod:`~pathrobust.encoders.catalog`, whose family modules
register their specs (and converters) with :mod:`pathrobust.registry`; the registry imports
this package at its first lookup.
"""

from pathrobust.encoders import catalog  # noqa: F401  (registers the built-in specs)
from pathrobust.encoders.base import Encoder, build_encoder, pool_tokens

__all__ = ["Encoder", "build_encoder", "pool_tokens"]
