"""Real H&E pixels that ship with pathrobust (see ``assets/ATTRIBUTION.md``).

``sample_he_tiles`` draws tissue tiles at random positions (deterministic given the seed)
from the bundled CC0 Aperio slide; every synthetic dataset and the demo build on it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from pathrobust.data.slides import open_slide, tissue_mask

ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED_SLIDE = ASSETS / "cmu_small_region.svs"
BUNDLED_MPP = 0.499


def bundled_slide_path() -> Path:
    return BUNDLED_SLIDE


@lru_cache(maxsize=1)
def bundled_slide_rgb() -> np.ndarray:
    """The whole bundled slide as uint8 RGB ``(2967, 2220, 3)`` (level 0, ≈0.5 µm/px)."""
    slide = open_slide(BUNDLED_SLIDE)
    try:
        return np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    finally:
        slide.close()


def sample_he_tiles(n: int, size: int = 224, seed: int = 0, min_tissue: float = 0.6,
                    return_coords: bool = False):
    """``n`` tiles ``(n, size, size, 3)`` uint8 at random tissue positions of the bundled slide.

    Positions are drawn uniformly among those whose tile has at least ``min_tissue`` tissue;
    tiles may overlap. With ``return_coords`` also returns ``(n, 2)`` (x, y) positions."""
    rgb = bundled_slide_rgb()
    mask = tissue_mask(rgb).astype(np.float32)
    h, w = mask.shape
    # tissue fraction of every size x size window, via an integral image
    ii = np.pad(mask.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    frac = (ii[size:, size:] - ii[:-size, size:] - ii[size:, :-size] + ii[:-size, :-size]) / (size * size)
    ys, xs = np.nonzero(frac >= min_tissue)
    if len(ys) == 0:
        raise ValueError(f"no {size}px window with {min_tissue:.0%} tissue in the bundled slide")
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(ys), size=n, replace=len(ys) < n)
    coords = np.stack([xs[pick], ys[pick]], 1).astype(np.int64)
    tiles = np.stack([rgb[y:y + size, x:x + size] for x, y in coords])
    return (tiles, coords) if return_coords else tiles
