"""Whole-slide images through OpenSlide: eva's foreground grid of tiles at a target µm/px,
with level-0 coordinates and the geometry TRIDENT/CLAM users expect in the feature file.

Reproduced from kaiko-ai/eva 0.4.5 (``vision/data/wsi``: ``PatchCoordinates.from_file``,
``patching/mask.py``, ``samplers/foreground_grid.py``, ``backends/openslide.py``):

* µm/px of level 0: the mean of OpenSlide's ``mpp-x`` and ``mpp-y``, else the TIFF resolution
  tags (``tiff.XResolution`` in ``tiff.ResolutionUnit``), else ``slide_mpp_default``;
* the level-0 footprint of a tile is ``int(target_mpp / mpp * tile_size)`` pixels; the grid
  covers level 0 with that step from (0, 0), visited x-major (all y of the first column
  first), the visiting order shuffled by ``numpy.random.default_rng(seed).shuffle`` (seed 42);
* foreground mask: HSV saturation (OpenCV's 8-bit rounding) above 20, computed on the lowest-
  resolution level whose tile footprint still spans >= 9 mask pixels; a grid cell is kept
  when its (truncated) window of the mask has a foreground ratio >= 0.35; the first
  ``max_tiles`` kept cells in the shuffled order are the tiles;
* tiles are read from the coarsest level whose µm/px is not above the target (level 0 when
  none), ``int(target_mpp / level_mpp * tile_size)`` pixels wide, and resized to
  ``tile_size`` (bilinear, antialiased, as eva's ``ResizeAndCrop``) only when that differs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pathrobust.data.tiles import TileSource
from pathrobust.errors import UserError

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
THUMB_MAX = 1024
MIN_FOREGROUND = 0.35        # eva ForegroundGridSampler(min_foreground_ratio)
SATURATION_THRESHOLD = 20    # eva get_mask(saturation_threshold)
MIN_MASK_PATCH_PIXELS = 9    # eva get_mask_level(min_mask_patch_pixels = 3 * 3)
SAMPLER_SEED = 42            # eva ForegroundGridSampler(seed)
# micrometres per TIFF resolution unit (eva's table, plus inch, which OpenSlide also reports)
_UM_PER_UNIT = {"meter": 1e6, "decimeter": 1e5, "centimeter": 1e4, "millimeter": 1e3, "micrometer": 1.0,
                "nanometer": 1e-3, "picometer": 1e-6, "femtometer": 1e-9, "inch": 25400.0}


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
    """µm/px of level 0 (see the module doc); ``default`` when the slide has none."""
    props = slide.properties
    mpp_x, mpp_y = props.get("openslide.mpp-x"), props.get("openslide.mpp-y")
    try:
        if mpp_x and mpp_y:
            return (float(mpp_x) + float(mpp_y)) / 2.0
        res_x, res_y, unit = props.get("tiff.XResolution"), props.get("tiff.YResolution"), props.get("tiff.ResolutionUnit")
        if res_x and res_y and unit in _UM_PER_UNIT and float(res_x) > 0 and float(res_y) > 0:
            return (_UM_PER_UNIT[unit] / float(res_x) + _UM_PER_UNIT[unit] / float(res_y)) / 2.0
    except ValueError:
        raise UserError(f"{path}: unreadable µm/px metadata (mpp-x {mpp_x!r}, mpp-y {mpp_y!r})") from None
    if default is None:
        raise UserError(f"{path}: slide has no µm/px metadata; pass --slide-mpp")
    return float(default)


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
    blank slide is not all tissue), excluding near-white and near-black pixels. (Used to pick
    tissue regions of the bundled slide; slide tiling uses eva's :func:`foreground_mask`.)"""
    rgb = rgb.astype(np.float32)
    mx, mn = rgb.max(-1), rgb.min(-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1), 0)
    sat_u8 = (sat * 255).astype(np.uint8)
    thr = max(otsu_threshold(sat_u8), 20.0)
    return (sat_u8 > thr) & (mx > 30) & (mn < 235)


# OpenCV's RGB2HSV for 8-bit images: S = ((V - min) * round((255 << 12) / V) + (1 << 11)) >> 12,
# tabulated for every (V, V - min) pair so that a slide-sized image costs one table look-up per pixel
_HSV_SHIFT = 12
_SAT_DIV = np.zeros(256, dtype=np.int64)
_SAT_DIV[1:] = np.rint((255 << _HSV_SHIFT) / np.arange(1, 256, dtype=np.float64)).astype(np.int64)
_SAT_TABLE = ((np.arange(256)[None, :] * _SAT_DIV[:, None] + (1 << (_HSV_SHIFT - 1))) >> _HSV_SHIFT)
_SAT_TABLE = np.clip(_SAT_TABLE, 0, 255).astype(np.uint8).reshape(-1)  # index V * 256 + (V - min)


def _sat_index(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] < 3:
        raise ValueError(f"expected uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = np.maximum(np.maximum(r, g), b)
    return (v.astype(np.uint16) << 8) | (v - np.minimum(np.minimum(r, g), b))


def hsv_saturation(rgb: np.ndarray) -> np.ndarray:
    """Saturation channel of ``cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)`` for uint8 ``(H, W, 3)``:
    uint8 ``(H, W)``, bit-identical to OpenCV's fixed-point arithmetic."""
    return np.take(_SAT_TABLE, _sat_index(rgb))


def foreground_mask(rgb: np.ndarray, saturation_threshold: int = SATURATION_THRESHOLD) -> np.ndarray:
    """eva's foreground mask: uint8 ``(H, W)``, 1 where the HSV saturation exceeds the threshold
    (``cv2.threshold(S, 20, 1, THRESH_BINARY)``; no blur, no hole filling: eva's defaults)."""
    return np.take((_SAT_TABLE > saturation_threshold).astype(np.uint8), _sat_index(rgb))


def closest_level(level_mpps, target_mpp: float) -> int:
    """eva ``Wsi.get_closest_level``: the coarsest level whose µm/px is not above the target,
    else the finest level."""
    mpps = np.asarray(level_mpps, dtype=np.float64)
    kept = np.where(mpps > target_mpp, 0.0, mpps)
    return int(np.argmin(mpps)) if kept.max() == 0 else int(np.argmax(kept))


def mask_level(level_mpps, tile_size: int, target_mpp: float, min_pixels: int = MIN_MASK_PATCH_PIXELS) -> int | None:
    """eva ``get_mask_level``: the lowest-resolution level on which a tile still covers
    ``min_pixels`` pixels (``None`` when no level does)."""
    for level in reversed(range(len(level_mpps))):
        side = int(target_mpp / float(level_mpps[level]) * tile_size)
        if side * side >= min_pixels:
            return level
    return None


def grid_coords(layer_shape: tuple[int, int], width: int, height: int, shuffle: bool = True,
                seed: int = SAMPLER_SEED) -> np.ndarray:
    """eva ``get_grid_coords_and_indices`` without overlap, returned in visiting order:
    ``(M, 2)`` int64 (x, y) of a ``width`` x ``height`` grid over ``layer_shape`` (w, h), x-major,
    permuted by ``default_rng(seed).shuffle`` of the index list when ``shuffle``."""
    xs = np.arange(0, layer_shape[0] - width + 1, width, dtype=np.int64)
    ys = np.arange(0, layer_shape[1] - height + 1, height, dtype=np.int64)
    xy = np.stack([np.repeat(xs, len(ys)), np.tile(ys, len(xs))], 1).reshape(-1, 2)
    if shuffle:
        # eva shuffles the list of indices in place; ``permutation(n)`` draws the same order
        # (checked for lists of 1 to 100,003 indices) several times faster
        xy = xy[np.random.default_rng(seed).permutation(len(xy))]
    return xy


def foreground_ratios(mask: np.ndarray, scale_factors: tuple[float, float], xy: np.ndarray, width: int,
                      height: int) -> np.ndarray:
    """eva ``ForegroundGridSampler.is_foreground``'s ratio for every cell at once: the window
    ``mask[int(y / sy) : + int(height / sy), int(x / sx) : + int(width / sx)]`` (clipped by the
    mask's edges, as numpy slicing is), its sum over its size; 0 for an empty window."""
    sx, sy = scale_factors
    h, w = mask.shape
    # eva's int(x / sx): float64 division truncated toward zero (coordinates are >= 0)
    x0 = np.minimum((xy[:, 0] / float(sx)).astype(np.int64), w)
    y0 = np.minimum((xy[:, 1] / float(sy)).astype(np.int64), h)
    x1 = np.minimum(x0 + int(width / sx), w)
    y1 = np.minimum(y0 + int(height / sy), h)
    size = (x1 - x0) * (y1 - y0)
    # summed-area table restricted to the columns that windows start or end at (a full one
    # costs a slow column-wise cumulative sum over the whole mask)
    cols, inverse = np.unique(np.concatenate([x0, x1]), return_inverse=True)
    row_prefix = np.zeros((h, len(cols)), dtype=np.int64)
    inner = cols > 0
    row_prefix[:, inner] = np.cumsum(mask, axis=1, dtype=np.int32)[:, cols[inner] - 1]
    table = np.zeros((h + 1, len(cols)), dtype=np.int64)
    np.cumsum(row_prefix, axis=0, out=table[1:])
    c0, c1 = inverse[:len(x0)], inverse[len(x0):]
    total = table[y1, c1] - table[y0, c1] - table[y1, c0] + table[y0, c0]
    return np.where(size > 0, total / np.maximum(size, 1), 0.0)


def sample_foreground_grid(mask: np.ndarray, scale_factors: tuple[float, float], layer_shape: tuple[int, int],
                           width: int, height: int, max_samples: int | None = None,
                           min_foreground: float = MIN_FOREGROUND, shuffle: bool = True,
                           seed: int = SAMPLER_SEED) -> np.ndarray:
    """eva ``ForegroundGridSampler.sample``: level-0 ``(N, 2)`` int64 (x, y) of the first
    ``max_samples`` grid cells (all when ``None``) in visiting order whose foreground ratio is
    at least ``min_foreground``."""
    xy = grid_coords(layer_shape, width, height, shuffle, seed)
    keep = foreground_ratios(mask, scale_factors, xy, width, height) >= min_foreground
    picked = xy[keep]
    return picked if max_samples is None else picked[:max_samples]


def _rgb(region) -> np.ndarray:
    """An OpenSlide RGBA region as uint8 RGB, transparent pixels white (eva ``_read_postprocess``)."""
    data = np.array(region)
    if data.shape[-1] == 4:
        data[data[..., 3] == 0] = 255
    return np.ascontiguousarray(data[..., :3])


@dataclass(frozen=True)
class Tiling:
    """How tiles are cut from slides: protocol parameters (values in ``suites/slides.toml``).

    eva: Camelyon16-small 224 px at 0.25 µm/px, at most 1,000 tiles; PANDA-small 224 px at
    0.5 µm/px, at most 200; both min foreground 0.35, shuffled with seed 42."""

    tile_size: int = 224
    target_mpp: float = 0.5
    max_tiles: int | None = None
    min_foreground: float = MIN_FOREGROUND
    shuffle: bool = True
    seed: int = SAMPLER_SEED
    saturation_threshold: int = SATURATION_THRESHOLD


class SlideTiles(TileSource):
    """Tiles of one slide on eva's foreground grid (see the module doc).

    Args:
        path: slide file (anything OpenSlide opens: SVS, generic tiled TIFF, NDPI, MRXS, ...).
        tile_size: tile side in pixels at ``target_mpp`` (eva: 224).
        target_mpp: µm/px of the tiles (eva: Camelyon16 0.25, PANDA 0.5).
        min_tissue: minimum foreground ratio of a grid cell (eva: 0.35).
        slide_mpp_default: µm/px of level 0 when the slide has no metadata.
        name: the source's name (default: the file stem).
        max_tiles: keep at most this many tiles, the first in the shuffled order (eva's ``max_samples``).
        shuffle, seed: the grid's visiting order (eva: shuffled with seed 42).
        saturation_threshold: the foreground mask's threshold (eva: 20).
    """

    def __init__(self, path: str | os.PathLike, tile_size: int = 224, target_mpp: float = 0.5,
                 min_tissue: float = MIN_FOREGROUND, slide_mpp_default: float | None = None, name: str | None = None,
                 *, max_tiles: int | None = None, shuffle: bool = True, seed: int = SAMPLER_SEED,
                 saturation_threshold: int = SATURATION_THRESHOLD) -> None:
        if tile_size < 1 or target_mpp <= 0:
            raise UserError(f"tile size {tile_size} px at {target_mpp} µm/px: both must be positive")
        if max_tiles is not None and max_tiles < 1:
            raise UserError(f"max tiles {max_tiles}: must be >= 1")
        self.path = Path(path)
        self.tile_size, self.target_mpp, self.min_tissue = int(tile_size), float(target_mpp), float(min_tissue)
        self.max_tiles, self.shuffle, self.seed = max_tiles, bool(shuffle), int(seed)
        self.saturation_threshold = int(saturation_threshold)
        self.name = name or self.path.stem
        slide = open_slide(self.path)
        try:
            self.mpp = slide_mpp(slide, self.path, slide_mpp_default)
            self.dimensions = tuple(int(v) for v in slide.dimensions)
            downsamples = [float(d) for d in slide.level_downsamples]
            level_mpps = [self.mpp * d for d in downsamples]
            self.footprint = int(self.target_mpp / self.mpp * self.tile_size)  # level-0 pixels per tile
            if self.footprint < 1 or self.footprint > min(self.dimensions):
                raise UserError(f"{self.path}: a {self.tile_size}-px tile at {self.target_mpp} µm/px spans "
                                f"{self.footprint} level-0 px; the slide is {self.dimensions[0]}x{self.dimensions[1]}")
            m_level = mask_level(level_mpps, self.tile_size, self.target_mpp)
            if m_level is None:
                raise UserError(f"{self.path}: no level where a tile spans {MIN_MASK_PATCH_PIXELS} mask pixels")
            m_dims = slide.level_dimensions[m_level]
            mask = foreground_mask(_rgb(slide.read_region((0, 0), m_level, m_dims)), self.saturation_threshold)
            scale = (self.dimensions[0] / m_dims[0], self.dimensions[1] / m_dims[1])
            self.level = closest_level(level_mpps, self.target_mpp)
            self.level_downsample = downsamples[self.level]
            self.read_size = int(self.target_mpp / level_mpps[self.level] * self.tile_size)
        finally:
            slide.close()
        self.mask_level = m_level
        self.coords = sample_foreground_grid(mask, scale, self.dimensions, self.footprint, self.footprint,
                                             self.max_tiles, self.min_tissue, self.shuffle, self.seed)
        if len(self.coords) == 0:
            raise UserError(f"{self.path}: no tissue: no {self.tile_size}-px tile at {self.target_mpp} µm/px has "
                            f"{self.min_tissue:.0%} foreground (saturation > {self.saturation_threshold})")
        self.tile_ids = [f"{x}_{y}" for x, y in self.coords]
        self._slide = None

    @classmethod
    def from_tiling(cls, path: str | os.PathLike, tiling: Tiling, name: str | None = None,
                    slide_mpp_default: float | None = None) -> SlideTiles:
        return cls(path, tiling.tile_size, tiling.target_mpp, tiling.min_foreground, slide_mpp_default, name,
                   max_tiles=tiling.max_tiles, shuffle=tiling.shuffle, seed=tiling.seed,
                   saturation_threshold=tiling.saturation_threshold)

    def __len__(self) -> int:
        return len(self.coords)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_slide"] = None
        return state

    def attrs(self) -> dict[str, int | float | str]:
        """Geometry for the feature file. TRIDENT/CLAM names describe the read: ``patch_level``
        (read level), ``patch_size`` (tile side at that level), ``patch_size_level0``,
        ``level0_magnification`` = 10 / µm/px and ``target_magnification`` = that of the read
        (so ``patch_size * level0 / target = patch_size_level0``, TRIDENT's relation),
        ``level0_width/height``, ``overlap`` 0, ``name``; pathrobust's add the tile the encoder
        saw (``tile_size`` px at ``target_mpp``), ``slide_mpp`` and the sampler's parameters."""
        mag0 = 10.0 / self.mpp
        return {
            "name": self.name, "patch_level": int(self.level), "patch_size": int(self.read_size),
            "patch_size_level0": int(self.footprint), "level0_magnification": float(mag0),
            "target_magnification": float(mag0 * self.read_size / self.footprint),
            "level0_width": int(self.dimensions[0]), "level0_height": int(self.dimensions[1]), "overlap": 0,
            "tile_size": int(self.tile_size), "target_mpp": float(self.target_mpp), "slide_mpp": float(self.mpp),
            "read_downsample": float(self.level_downsample), "min_foreground": float(self.min_tissue),
            "max_tiles": int(self.max_tiles or 0), "sampler_shuffle": int(self.shuffle), "sampler_seed": int(self.seed),
            "saturation_threshold": int(self.saturation_threshold),
        }

    def fingerprint(self) -> str:
        """Name, tile count and ends, plus the tiling geometry (another µm/px is other data)."""
        return (f"{super().fingerprint()}:{self.tile_size}px@{self.target_mpp:g}um:level{self.level}:"
                f"read{self.read_size}:fg{self.min_tissue:g}:seed{self.seed}")

    def read(self, index: int) -> np.ndarray:
        from PIL import Image

        if self._slide is None:
            self._slide = open_slide(self.path)
        x, y = (int(v) for v in self.coords[index])
        region = _rgb(self._slide.read_region((x, y), self.level, (self.read_size, self.read_size)))
        if self.read_size != self.tile_size:
            region = np.asarray(Image.fromarray(region).resize((self.tile_size, self.tile_size), Image.BILINEAR))
        return region


def find_slides(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    slides = sorted(p for p in root.rglob("*") if p.suffix.lower() in SLIDE_SUFFIXES and p.is_file())
    if not slides:
        raise UserError(f"{root}: no slide files ({', '.join(SLIDE_SUFFIXES)})")
    return slides
