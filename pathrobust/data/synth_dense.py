"""Synthetic dense (segmentation) data: real H&E tiles with nucleus-level masks, rendered
under simulated stainings and scanners, in the generic dense layout.

Pixels are real: ``tile`` px crops (native ~0.5 um/px) of the bundled CC0 slide
(:mod:`pathrobust.data.he`), train and evaluation tiles from disjoint horizontal stripes.
Masks come from what the stain shows, computed once on the reference (original) pixels:

* **nuclei** (1): haematoxylin concentration (colour deconvolution, :mod:`pathrobust.stain`),
  Gaussian-smoothed (sigma 1 px), above ``nuclei_threshold``; opened with a 3x3 cross, holes
  filled, components smaller than ``min_nucleus_px`` (about a 4 px disc: debris) dropped;
* **background** (0): glass and lumina — total optical density below ``background_od``
  after the same smoothing;
* **stroma** (2): the remaining tissue (eosin-dominated).

Splits (generic layout, read by :func:`pathrobust.data.eva_dense.read_generic_dense`):
``train`` and ``val`` in the reference rendering (training and checkpoint choice);
``test`` = other tiles, each under one simulated (staining, scanner) pair drawn at random
(the reported split: an encoder whose grids move with the stain transfers worse); and one
``val_<staining>-<scanner>`` split per simulated rendering holding the ``val`` tiles (same
names, same masks) for the segmentation-consistency figure. Stainings and scanners are those
of the synthetic PLISM data (:func:`pathrobust.data.synth_plism.staining_params`,
``scanner_params``, ``render_staining``, ``render_scanner``; JPEG left out).

The tree is written under a temporary name and renamed; a tree built by the same config is
reused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from pathrobust.cache import cache_dir
from pathrobust.data.eva_dense import GENERIC_MANIFEST, SYNTHETIC_MANIFEST
from pathrobust.data.he import bundled_slide_rgb
from pathrobust.data.slides import tissue_mask
from pathrobust.data.synthetic import mark_synthetic
from pathrobust.data.synth_plism import render_scanner, render_staining, scanner_params, staining_params
from pathrobust.errors import UserError
from pathrobust.stain import rgb_to_hed

CLASSES = ("background", "nuclei", "stroma")
MANIFEST = SYNTHETIC_MANIFEST
VERSION = 1
RENDER_PREFIX = "val_"


@dataclass(frozen=True)
class SynthDenseConfig:
    """Sizes and thresholds (sizes: the demo's, as suites/eva.toml [synthetic] sets them)."""

    tile: int = 96
    train_tiles: int = 16
    val_tiles: int = 8
    test_tiles: int = 8
    renderings: tuple[str, ...] = ("GIV-AT2", "KRH-S360", "MY-P")  # <staining>-<scanner>
    nuclei_threshold: float = 0.09
    background_od: float = 0.35
    min_nucleus_px: int = 12
    seed: int = 0


def default_synth_dense_root() -> Path:
    """``$PATHROBUST_CACHE/synth-dense``."""
    return cache_dir("synth-dense")


@lru_cache(maxsize=1)
def tissue_integral() -> np.ndarray:
    """Summed-area table ``(H + 1, W + 1)`` of the bundled slide's tissue mask (computed once
    per process; the synthetic generators count tissue in windows with it)."""
    mask = tissue_mask(bundled_slide_rgb()).astype(np.float32)
    return np.pad(mask.cumsum(0).cumsum(1), ((1, 0), (1, 0)))


@lru_cache(maxsize=8)
def _positions(band: str, size: int, min_tissue: float = 0.5) -> np.ndarray:
    """Top-left (x, y) of ``size`` windows with enough tissue inside one horizontal stripe of
    height ``4 * size``: even stripes for ``train``, odd ones for ``eval`` (disjoint tiles)."""
    ii = tissue_integral()
    frac = (ii[size:, size:] - ii[:-size, size:] - ii[size:, :-size] + ii[:-size, :-size]) / (size * size)
    ys, xs = np.nonzero(frac >= min_tissue)
    stripe = 4 * size
    inside = ys % stripe + size <= stripe
    odd = (ys // stripe) % 2 == 1
    keep = inside & (odd if band == "eval" else ~odd)
    return np.stack([xs[keep], ys[keep]], 1)


def sample_tiles(n: int, band: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` distinct tissue tiles ``(n, size, size, 3)`` uint8 and their (x, y)."""
    pos = _positions(band, size)
    if len(pos) < n:
        raise UserError(f"synth-dense: only {len(pos)} {size} px tissue windows in the '{band}' stripes, need {n}")
    pick = pos[rng.choice(len(pos), size=n, replace=False)]
    rgb = bundled_slide_rgb()
    return np.stack([rgb[y:y + size, x:x + size] for x, y in pick]), pick


def nucleus_masks(tiles: np.ndarray, config: SynthDenseConfig = SynthDenseConfig()) -> np.ndarray:
    """Class-index masks ``(n, H, W)`` uint8 (0 background, 1 nuclei, 2 stroma) of uint8 tiles."""
    from scipy import ndimage

    x = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2).double() / 255.0
    hed = rgb_to_hed(x).numpy()
    od = -np.log(np.clip(x.numpy(), 1e-6, 1.0)).sum(axis=1)
    cross = ndimage.generate_binary_structure(2, 1)
    out = np.empty(tiles.shape[:3], dtype=np.uint8)
    for i in range(len(tiles)):
        h = ndimage.gaussian_filter(hed[i, 0], 1.0)
        nuclei = ndimage.binary_fill_holes(ndimage.binary_opening(h > config.nuclei_threshold, structure=cross))
        labels, n = ndimage.label(nuclei)
        if n:
            sizes = ndimage.sum(nuclei, labels, index=np.arange(1, n + 1))
            nuclei = np.isin(labels, 1 + np.flatnonzero(sizes >= config.min_nucleus_px))
        background = ndimage.gaussian_filter(od[i], 1.0) < config.background_od
        out[i] = np.where(nuclei, 1, np.where(background, 0, 2))
    return out


def render(tiles: np.ndarray, rendering: str, seed: int) -> np.ndarray:
    """Tiles under a simulated ``<staining>-<scanner>`` (synthetic PLISM's models, no JPEG)."""
    staining, _, scanner = rendering.partition("-")
    x = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2).double() / 255.0
    hed = rgb_to_hed(x)
    rgb = render_staining(hed, staining_params(staining, seed))
    generator = torch.Generator().manual_seed(seed)
    return render_scanner(rgb, scanner_params(scanner, seed), generator)


def _write_split(root: Path, split: str, names: list[str], tiles: np.ndarray, masks: np.ndarray) -> None:
    from PIL import Image

    (root / split / "images").mkdir(parents=True)
    (root / split / "masks").mkdir(parents=True)
    for name, tile, mask in zip(names, tiles, masks):
        Image.fromarray(tile).save(root / split / "images" / f"{name}.png", compress_level=1)
        Image.fromarray(mask, mode="L").save(root / split / "masks" / f"{name}.png")


def write_synth_dense(out: str | os.PathLike | None = None, config: SynthDenseConfig = SynthDenseConfig(),
                      overwrite: bool = False) -> Path:
    """Write the synthetic dense dataset under ``out`` (default :func:`default_synth_dense_root`)."""
    out = Path(out) if out is not None else default_synth_dense_root()
    manifest = {"version": VERSION, **asdict(config), "renderings": list(config.renderings)}
    if out.exists():
        try:
            existing = json.loads((out / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            existing = None
        if existing == manifest and not overwrite:
            return out
        if not overwrite:
            raise UserError(f"--out {out}: exists and was not built by this synth-dense config; pass --overwrite or another --out")
    for r in config.renderings:
        staining, _, scanner = r.partition("-")
        if not staining or not scanner:
            raise UserError(f"synth-dense rendering '{r}': expected <staining>-<scanner>, e.g. GIV-AT2")
    if min(config.train_tiles, config.val_tiles, config.test_tiles) < 1:
        raise UserError("synth-dense: every split needs at least one tile")
    rng = np.random.default_rng(config.seed)
    train, _ = sample_tiles(config.train_tiles, "train", config.tile, rng)
    held, _ = sample_tiles(config.val_tiles + config.test_tiles, "eval", config.tile, rng)
    val, test = held[:config.val_tiles], held[config.val_tiles:]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / GENERIC_MANIFEST).write_text(json.dumps({"classes": list(CLASSES), "ignore_index": None}) + "\n")
        _write_split(tmp, "train", [f"train_{i:04d}" for i in range(len(train))], train, nucleus_masks(train, config))
        val_masks = nucleus_masks(val, config)
        val_names = [f"val_{i:04d}" for i in range(len(val))]
        _write_split(tmp, "val", val_names, val, val_masks)
        if config.renderings:
            which = rng.integers(0, len(config.renderings), size=len(test))
            rendered = np.empty_like(test)
            for k, r in enumerate(config.renderings):
                if (which == k).any():
                    rendered[which == k] = render(test[which == k], r, config.seed)
        else:
            rendered = test
        _write_split(tmp, "test", [f"test_{i:04d}" for i in range(len(test))], rendered, nucleus_masks(test, config))
        for r in config.renderings:
            _write_split(tmp, RENDER_PREFIX + r, val_names, render(val, r, config.seed), val_masks)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        mark_synthetic(tmp, "synth-dense", manifest, note="nucleus/stroma/background masks of real CC0 H&E tiles "
                       "from haematoxylin density, under simulated stainings and scanners; not a real dataset")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def rendering_splits(split_names) -> list[str]:
    """The consistency splits (``val_<rendering>``) among a task's split names, sorted."""
    return sorted(s for s in split_names if s.startswith(RENDER_PREFIX))
