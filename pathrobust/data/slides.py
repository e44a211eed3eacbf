"""Whole-slide images through OpenSlide: tissue detection and a grid of tiles at a target
resolution (µm/px), with level-0 coordinates.

Tiling: the tile's footprint at level 0 is ``tile_size * target_mpp / slide_mpp`` pixels; it is
read from the highest-resolution pyramid level that is at least as fine as the target and
resized to ``tile_size``. A grid cell is kept when the tissue mask (Otsu threshold on the
saturation of a low-resolution thumbnail) covers at least ``min_tissue`` of it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pathrobust.data.tiles import TileSource
from pathrobust.errors import UserError

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
THUMB_MAX = 1024


def open_slide(path: Path):
    try:
        import openslide
    except ImportError as exc:  # openslide-bin ships the C library
        raise UserError(f"cannot import openslide ({exc}); pip install openslide-python openslide-bin") from None
    if not path.is_file():
        raise UserError(f"{path}: no such slide file")
    try:
        return openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError) as exc:
        raise UserError(f"{path}: OpenSlide cannot open it ({type(exc).__name__}: {exc})") from None


def slide_mpp(slide, path: Path, default: float | None = None) -> float:
    import openslide

    value = slide.properties.get(openslide.PROPERTY_NAME_MPP_X)
    if value is None:
        if default is None:
            raise UserError(f"{path}: slide has no µm/px metadata; pass --slide-mpp")
        return float(default)
    return float(value)


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values (maximises between-class variance)."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    levels = np.arange(256)
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * levels)
    mean_all = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean_all * w0 / total - m0) ** 2 / (w0 * w1 / total)
    between[~np.isfinite(between)] = 0
    return float(np.argmax(between))


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail: saturation above Otsu (and above a floor so a
    blank slide is not all tissue), excluding near-white and near-black pixels."""
    rgb = rgb.astype(np.float32)
    mx, mn = rgb.max(-1), rgb.min(-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1), 0)
    sat_u8 = (sat * 255).astype(np.uint8)
    thr = max(otsu_threshold(sat_u8), 20.0)
    return (sat_u8 > thr) & (mx > 30) & (mn < 235)


class SlideTiles(TileSource):
    """Tiles on a regular grid over the tissue of one slide."""

    def __init__(self, path: str | os.PathLike, tile_size: int = 224, target_mpp: float = 0.5,
                 min_tissue: float = 0.5, slide_mpp_default: float | None = None, name: str | None = None) -> None:
        self.path = Path(path)
        self.tile_size = tile_size
        self.target_mpp = target_mpp
        slide = open_slide(self.path)
        try:
            self.mpp = slide_mpp(slide, self.path, slide_mpp_default)
            self.footprint = max(1, round(tile_size * target_mpp / self.mpp))  # level-0 pixels per tile
            downsample = self.footprint / tile_size
            self.level = slide.get_best_level_for_downsample(max(downsample, 1.0))
            if slide.level_downsamples[self.level] > downsample + 1e-6:
                self.level = max(0, self.level - 1)
            self.level_downsample = float(slide.level_downsamples[self.level])
            w0, h0 = slide.dimensions
            scale = max(w0, h0) / THUMB_MAX
            thumb = np.asarray(slide.get_thumbnail((max(1, int(w0 / scale)), max(1, int(h0 / scale)))).convert("RGB"))
        finally:
            slide.close()
        self.coords = self._grid(thumb, (w0, h0), min_tissue)
        if len(self.coords) == 0:
            raise UserError(f"{self.path}: no tissue found at {target_mpp} µm/px (min tissue {min_tissue:.0%})")
        self.name = name or self.path.stem
        self.tile_ids = [f"{x}_{y}" for x, y in self.coords]
        self._slide = None

    def _grid(self, thumb: np.ndarray, dims: tuple[int, int], min_tissue: float) -> np.ndarray:
        mask = tissue_mask(thumb)
        w0, h0 = dims
        sx, sy = mask.shape[1] / w0, mask.shape[0] / h0
        step = self.footprint
        coords = []
        for y in range(0, h0 - step + 1, step):
            for x in range(0, w0 - step + 1, step):
                cell = mask[int(y * sy): max(int(y * sy) + 1, int((y + step) * sy)),
                            int(x * sx): max(int(x * sx) + 1, int((x + step) * sx))]
                if cell.size and cell.mean() >= min_tissue:
                    coords.append((x, y))
        return np.asarray(coords, dtype=np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.coords)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_slide"] = None
        return state

    def read(self, index: int) -> np.ndarray:
        from PIL import Image

        if self._slide is None:
            self._slide = open_slide(self.path)
        x, y = (int(v) for v in self.coords[index])
        size = max(1, round(self.footprint / self.level_downsample))
        region = self._slide.read_region((x, y), self.level, (size, size)).convert("RGB")
        if size != self.tile_size:
            region = region.resize((self.tile_size, self.tile_size), Image.BICUBIC)
        return np.asarray(region)


def find_slides(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    slides = sorted(p for p in root.rglob("*") if p.suffix.lower() in SLIDE_SUFFIXES and p.is_file())
    if not slides:
        raise UserError(f"{root}: no slide files ({', '.join(SLIDE_SUFFIXES)})")
    return slides
