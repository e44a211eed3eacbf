"""The mark every synthetic dataset carries, so that runs on it say so everywhere.

Synthetic generators write ``pathrobust-synthetic.json`` at the root of what they build
(generator name and parameters). :func:`synthetic_info` finds it from any path inside the
dataset; runs on such data are labelled synthetic in the results DB and in every report
format, and never share axes with published results of the real benchmarks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MARKER = "pathrobust-synthetic.json"


def mark_synthetic(root: str | os.PathLike, generator: str, params: dict[str, Any], note: str = "") -> Path:
    """Write the marker into ``root`` (call before the dataset is moved into place)."""
    path = Path(root) / MARKER
    info = {"generator": generator, "params": params, "note": note}
    path.write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
    return path


def synthetic_info(path: str | os.PathLike) -> dict[str, Any] | None:
    """The marker of the synthetic dataset holding ``path`` (itself or a parent), or None."""
    path = Path(path).resolve()
    for folder in [path, *path.parents] if path.is_dir() else list(path.parents):
        marker = folder / MARKER
        if marker.is_file():
            try:
                return json.loads(marker.read_text())
            except (OSError, ValueError):
                return {"generator": "unknown"}
    return None
