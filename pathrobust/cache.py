"""pathrobust's cache directory: ``$PATHROBUST_CACHE``, default ``~/.cache/pathrobust``.

Holds what is built once and reused: the synthetic datasets (``synth-plism/``,
``synth-hest/``, ``synth-eva/``) and the sha256 of weight files (``sha256.json``)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``$PATHROBUST_CACHE/<parts...>`` (resolved at call time, not at import time)."""
    root = os.environ.get("PATHROBUST_CACHE") or Path.home() / ".cache" / "pathrobust"
    return Path(root).joinpath(*parts)
