"""Synthetic multi-acquisition slides: pseudo whole slides built from real H&E, each specimen
digitised under simulated stainings x scanners, with a slide label no colour histogram can see.

Specimens. Each specimen is a canvas of ``grid`` cells of ``cell`` px at level 0 (``mpp``
µm/px) on white glass, holding tissue islands cut from the bundled CC0 Aperio slide
(:mod:`pathrobust.data.he`; windows whose every cell is mostly tissue, randomly flipped) and a
few specks of debris too small to pass eva's foreground threshold. Islands are aligned to the
cell grid, so at ``mpp`` µm/px and ``cell``-px tiles eva's foreground grid cuts one tile per
tissue cell.

Label (``atypia`` / ``normal``, balanced). A positive specimen's first island is an
*atypia* region: its tissue shown at ``zoom`` x magnification (nuclei ``zoom`` times larger,
the measurable property: :func:`nucleus_area`), then, cell by cell, recoloured by rank so
that each cell holds exactly the multiset of RGB values of the native cell it replaces
(:func:`match_colours`). Every tile of every specimen therefore has the colour histogram of
some native tissue tile: colour histograms (``rgb-histogram``, ``hed-histogram``) carry no
label information by construction, while nuclear size and texture do.

Acquisitions. Every specimen is rendered under each ``staining`` x ``scanner`` pair with the
simulations of synthetic PLISM (:func:`~pathrobust.data.synth_plism.render_staining`,
:func:`~pathrobust.data.synth_plism.render_scanner`: stain vectors and amounts, colour
response, gamma, blur, sub-pixel shift, noise, JPEG), with one addition slides need: the
scanner's white calibration (the glass is rendered at a neutral near-white, as scanners
calibrate on it), without which tinted glass would pass the foreground threshold. The
first staining and first scanner form the reference acquisition. An encoder whose features
follow stain colour changes its slide scores across acquisitions: it loses concordance.

Output (written under a temporary name, then renamed)::

    <out>/slides/<specimen>_<staining>_<scanner>.tif   pyramidal tiled TIFF (levels 1, 2, 4, ...;
                                                       zlib; µm/px in the resolution tags)
    <out>/manifest.csv     slide_id, path, label, split, fold, patient_id, specimen_id,
                           acquisition, scanner, staining (pathrobust.data.slide_manifest)
    <out>/synth_slides.json   the config, the reference acquisition, provenance
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import uuid
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pathrobust.cache import cache_dir
from pathrobust.data.plism import SCANNERS, STAININGS
from pathrobust.errors import UserError

FORMAT_VERSION = 1
DONE_MARKER = "synth_slides.json"
CLASSES = ("normal", "atypia")
GLASS_WHITE = 0.95          # calibrated glass level after scanning (0..1)
MIN_CELL_TISSUE = 0.6       # every cell of an island window is at least this much tissue
TIFF_TILE = 256


@dataclass(frozen=True)
class SynthSlidesConfig:
    """Sizes of the synthetic slide dataset (defaults: the demo's; see the module doc)."""

    specimens: int = 20
    stainings: tuple[str, ...] = ("GV", "KRH")
    scanners: tuple[str, ...] = ("S60", "P")
    grid: tuple[int, int] = (8, 6)                               # canvas (columns, rows) of cells
    cell: int = 112                                              # px per cell at level 0
    mpp: float = 0.5                                             # µm/px of level 0
    islands: tuple[tuple[int, int], ...] = ((3, 2), (3, 2))      # (columns, rows); the first is the atypia one
    zoom: float = 2.0
    folds: int = 5
    specks: int = 6
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "version": FORMAT_VERSION}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @classmethod
    def quick(cls) -> SynthSlidesConfig:
        """The tests' size: 6 specimens (3 folds), 2 acquisitions, 6 tiles of 112 px per slide."""
        return cls(specimens=6, folds=3, stainings=("GV", "KRH"), scanners=("S60",), grid=(5, 4),
                   islands=((2, 2), (1, 2)), specks=3)

    @property
    def reference(self) -> str:
        return acquisition_name(self.stainings[0], self.scanners[0])

    def check(self) -> None:
        for s in self.stainings:
            if s not in STAININGS:
                raise UserError(f"stainings: unknown staining {s!r} (PLISM: {', '.join(STAININGS)})")
        for s in self.scanners:
            if s not in SCANNERS:
                raise UserError(f"scanners: unknown scanner {s!r} (PLISM: {', '.join(SCANNERS)})")
        if len(self.stainings) * len(self.scanners) < 2:
            raise UserError("synthetic slides need >= 2 acquisitions (stainings x scanners)")
        if self.specimens < 2 * self.folds or self.folds < 3:
            raise UserError(f"specimens {self.specimens}, folds {self.folds}: need folds >= 3 and >= 2 specimens per fold")
        if self.zoom < 1:
            raise UserError(f"zoom {self.zoom}: must be >= 1")


def acquisition_name(staining: str, scanner: str) -> str:
    return f"{staining}_{scanner}"


def _rng(*names, seed: int) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32("/".join(map(str, names)).encode()), seed])


# -- specimens ------------------------------------------------------------------------------
def match_colours(target: np.ndarray, source: np.ndarray) -> np.ndarray:
    """``target``'s structure with ``source``'s colours: the pixel of ``target`` with the k-th
    smallest brightness (R + G + B, ties in raster order) takes the k-th brightest colour of
    ``source``. Both uint8 ``(H, W, 3)`` of one shape; the result holds exactly ``source``'s
    multiset of RGB values, so any colour histogram of it equals that of ``source``."""
    if target.shape != source.shape:
        raise ValueError(f"shapes differ: {target.shape} and {source.shape}")
    t = target.reshape(-1, 3)
    s = source.reshape(-1, 3)
    t_order = np.argsort(t.astype(np.int32).sum(1), kind="stable")
    s_order = np.argsort(s.astype(np.int32).sum(1), kind="stable")
    out = np.empty_like(t)
    out[t_order] = s[s_order]
    return out.reshape(target.shape)


def nucleus_area(rgb: np.ndarray, dark_fraction: float = 0.15) -> float:
    """Mean area (px) of the connected dark (nuclear) blobs of a tile: the darkest
    ``dark_fraction`` of pixels by brightness, 4-connected components. Enlarged nuclei give
    larger blobs; a histogram-preserving recolouring keeps the dark fraction itself fixed."""
    from scipy import ndimage

    brightness = rgb.astype(np.int32).sum(-1)
    dark = brightness <= np.quantile(brightness, dark_fraction)
    labels, n = ndimage.label(dark)
    return float(dark.sum() / max(n, 1))


def _tissue_fraction_table(mask: np.ndarray) -> np.ndarray:
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    table[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    return table


def _window_ok(table: np.ndarray, x: int, y: int, cols: int, rows: int, cell: int) -> bool:
    for r in range(rows):
        for c in range(cols):
            y0, x0 = y + r * cell, x + c * cell
            total = table[y0 + cell, x0 + cell] - table[y0, x0 + cell] - table[y0 + cell, x0] + table[y0, x0]
            if total < MIN_CELL_TISSUE * cell * cell:
                return False
    return True


def _pick_window(rgb: np.ndarray, table: np.ndarray, cols: int, rows: int, cell: int, margin: int,
                 rng: np.random.Generator) -> np.ndarray:
    """A ``rows*cell`` x ``cols*cell`` window of mostly-tissue cells from the bundled slide, with
    ``margin`` px of context around it (the zoom reads from the centre), randomly flipped."""
    h, w = rgb.shape[:2]
    wh, ww = rows * cell, cols * cell
    for _ in range(2000):
        x = int(rng.integers(margin, w - ww - margin))
        y = int(rng.integers(margin, h - wh - margin))
        if _window_ok(table, x, y, cols, rows, cell):
            window = rgb[y:y + wh, x:x + ww]
            if rng.random() < 0.5:
                window = window[::-1]
            if rng.random() < 0.5:
                window = window[:, ::-1]
            return np.ascontiguousarray(window)
    raise RuntimeError(f"no {cols}x{rows}-cell tissue window in the bundled slide")


def _zoomed(window: np.ndarray, zoom: float, cell: int) -> np.ndarray:
    """The window's centre shown ``zoom`` x larger, each cell recoloured to the native cell's
    colour multiset (:func:`match_colours`)."""
    from PIL import Image

    h, w = window.shape[:2]
    ch, cw = max(1, round(h / zoom)), max(1, round(w / zoom))
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    centre = Image.fromarray(window[y0:y0 + ch, x0:x0 + cw])
    big = np.asarray(centre.resize((w, h), Image.BICUBIC))
    out = np.empty_like(window)
    for y in range(0, h, cell):
        for x in range(0, w, cell):
            out[y:y + cell, x:x + cell] = match_colours(big[y:y + cell, x:x + cell], window[y:y + cell, x:x + cell])
    return out


@dataclass
class Specimen:
    """One physical slide before digitisation: uint8 canvas ``(H, W, 3)`` at level 0, its label
    and the grid cells ``(column, row)`` of its islands (``lesion_cells``: the atypia cells)."""

    specimen_id: str
    label: str
    canvas: np.ndarray
    tissue_cells: list[tuple[int, int]]
    lesion_cells: list[tuple[int, int]]
    fold: int


def _place_islands(config: SynthSlidesConfig, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Top-left cells of the islands: inside the canvas, not touching each other (one free cell)."""
    cols, rows = config.grid
    for _ in range(1000):
        placed, taken = [], set()
        for icols, irows in config.islands:
            c0 = int(rng.integers(0, cols - icols + 1))
            r0 = int(rng.integers(0, rows - irows + 1))
            cells = {(c0 + c, r0 + r) for c in range(icols) for r in range(irows)}
            halo = {(c + dc, r + dr) for c, r in cells for dc in (-1, 0, 1) for dr in (-1, 0, 1)}
            if halo & taken:
                break
            placed.append((c0, r0))
            taken |= cells
        else:
            return placed
    raise UserError(f"islands {config.islands} do not fit apart on a {cols}x{rows}-cell canvas")


def make_specimens(config: SynthSlidesConfig = SynthSlidesConfig()) -> list[Specimen]:
    """The specimens of ``config`` (deterministic): labels alternate within folds so every fold,
    and so every split, is balanced."""
    from pathrobust.data.he import bundled_slide_rgb
    from pathrobust.data.slides import tissue_mask

    config.check()
    rgb = bundled_slide_rgb()
    table = _tissue_fraction_table(tissue_mask(rgb))
    cell = config.cell
    width, height = config.grid[0] * cell, config.grid[1] * cell
    fold_of = _balanced_folds(config)
    specimens = []
    for k in range(config.specimens):
        sid = f"S{k:03d}"
        label = CLASSES[k % 2]
        rng = _rng("specimen", sid, seed=config.seed)
        canvas = np.full((height, width, 3), 255, np.uint8)
        tissue, lesion = [], []
        for n, ((icols, irows), (c0, r0)) in enumerate(zip(config.islands, _place_islands(config, rng))):
            margin = int(cell * config.zoom)
            window = _pick_window(rgb, table, icols, irows, cell, margin, rng)
            cells = [(c0 + c, r0 + r) for r in range(irows) for c in range(icols)]
            if n == 0 and label == "atypia":
                window = _zoomed(window, config.zoom, cell)
                lesion = cells
            canvas[r0 * cell:(r0 + irows) * cell, c0 * cell:(c0 + icols) * cell] = window
            tissue += cells
        _add_specks(canvas, tissue, config, rng)
        specimens.append(Specimen(sid, label, canvas, tissue, lesion, fold=fold_of[k]))
    return specimens


def _balanced_folds(config: SynthSlidesConfig) -> list[int]:
    """Fold of every specimen: within each label, a seeded shuffle dealt round-robin to the folds."""
    rng = _rng("folds", seed=config.seed)
    folds = [0] * config.specimens
    for label in range(len(CLASSES)):
        members = [k for k in range(config.specimens) if k % 2 == label]
        for rank, i in enumerate(rng.permutation(len(members))):
            folds[members[i]] = rank % config.folds
    return folds


def _add_specks(canvas: np.ndarray, tissue: list[tuple[int, int]], config: SynthSlidesConfig,
                rng: np.random.Generator) -> None:
    """Dust on the glass: small haematoxylin-dark discs in empty cells, far below eva's 35 %."""
    cell = config.cell
    empty = [(c, r) for c in range(config.grid[0]) for r in range(config.grid[1]) if (c, r) not in tissue]
    for i in rng.permutation(len(empty))[:config.specks]:
        c, r = empty[i]
        radius = int(rng.integers(3, max(4, cell // 12)))
        cy = r * cell + int(rng.integers(radius, cell - radius))
        cx = c * cell + int(rng.integers(radius, cell - radius))
        yy, xx = np.ogrid[-radius:radius + 1, -radius:radius + 1]
        disc = yy * yy + xx * xx <= radius * radius
        patch = canvas[cy - radius:cy + radius + 1, cx - radius:cx + radius + 1]
        patch[disc] = (90, 60, 130)


# -- digitisation -----------------------------------------------------------------------------
def calibrated_scanner(params: dict) -> dict:
    """The scanner with its white balance set so that glass (RGB 1, 1, 1 after staining) comes
    out at :data:`GLASS_WHITE` in every channel: ``(colour @ 1) * wb`` raised to ``gamma`` equals it."""
    response = np.asarray(params["colour"]) @ np.ones(3)
    return {**params, "white_balance": GLASS_WHITE ** (1.0 / params["gamma"]) / response}


RENDER_MARGIN = 16  # px of glass rendered around tissue: wider than any scanner's blur


def digitise(canvas: np.ndarray, staining: str, scanner: str, seed: int, noise_seed: int) -> np.ndarray:
    """Render a specimen canvas under a staining and a (white-calibrated) scanner, JPEG included:
    uint8 ``(H, W, 3)``.

    Only the boxes around non-white content go through the simulation (with a glass margin
    wider than the blur); the glass elsewhere renders to the calibrated white level, so it is
    filled with that level plus the scanner's noise directly."""
    from PIL import Image
    from scipy import ndimage

    from pathrobust.data.synth_plism import render_scanner, render_staining, scanner_params, staining_params
    from pathrobust.stain import rgb_to_hed

    params = calibrated_scanner(scanner_params(scanner, seed))
    stain = staining_params(staining, seed)
    gen = torch.Generator().manual_seed(noise_seed)
    h, w = canvas.shape[:2]
    glass = torch.full((3, h, w), GLASS_WHITE).add_(params["noise"] * torch.randn((3, h, w), generator=gen))
    out = (glass.clamp_(0, 1) * 255).round_().to(torch.uint8).permute(1, 2, 0).numpy().copy()
    labels, _ = ndimage.label(canvas.min(-1) < 255)
    for box in ndimage.find_objects(labels):
        y0, y1 = max(0, box[0].start - RENDER_MARGIN), min(h, box[0].stop + RENDER_MARGIN)
        x0, x1 = max(0, box[1].start - RENDER_MARGIN), min(w, box[1].stop + RENDER_MARGIN)
        rgb = torch.from_numpy(np.ascontiguousarray(canvas[y0:y1, x0:x1])).permute(2, 0, 1)[None].float() / 255.0
        stained = render_staining(rgb_to_hed(rgb), stain).float()
        out[y0:y1, x0:x1] = render_scanner(stained, params, gen)[0]
    buf = io.BytesIO()
    Image.fromarray(out).save(buf, format="JPEG", quality=int(params["jpeg_quality"]))
    buf.seek(0)
    with Image.open(buf) as img:
        return np.asarray(img.convert("RGB"))


def write_pyramid_tiff(path: Path, rgb: np.ndarray, mpp: float, min_level_size: int = 128) -> None:
    """A tiled pyramidal RGB TIFF OpenSlide reads as generic-tiff: level 0 then 2x reductions
    (box filter) while the shorter side stays >= ``min_level_size``; zlib; the µm/px in the
    X/YResolution tags (pixels per centimetre)."""
    import tifffile
    from PIL import Image

    levels = [rgb]
    while min(levels[-1].shape[:2]) // 2 >= min_level_size:
        prev = Image.fromarray(levels[-1])
        levels.append(np.asarray(prev.reduce(2)))
    with tifffile.TiffWriter(path) as tif:
        for k, level in enumerate(levels):
            res = 1e4 / (mpp * 2 ** k)
            tif.write(level, tile=(TIFF_TILE, TIFF_TILE), photometric="rgb", compression="zlib",
                      resolution=(res, res), resolutionunit="CENTIMETER", subfiletype=1 if k else 0,
                      metadata=None)


# -- the dataset --------------------------------------------------------------------------------
def synth_slides(out: str | os.PathLike, config: SynthSlidesConfig = SynthSlidesConfig(), overwrite: bool = False,
                 progress: bool = True) -> Path:
    """Write the synthetic slide dataset (see the module doc) to ``out``; returns ``out``.
    Built under a temporary name and renamed, so ``out`` is complete or absent."""
    from pathrobust.data.slide_manifest import SlideRecord, write_slide_manifest
    from pathrobust.progress import tile_progress

    out = Path(out)
    config.check()
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"--out {out}: exists and is not empty; pass --overwrite or another --out")
        shutil.rmtree(out)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
    (tmp / "slides").mkdir(parents=True)
    try:
        specimens = make_specimens(config)
        records = []
        pairs = [(st, sc) for st in config.stainings for sc in config.scanners]
        with tile_progress("synth-slides", total=len(specimens) * len(pairs), enabled=progress) as advance:
            for spec in specimens:
                for staining, scanner in pairs:
                    acq = acquisition_name(staining, scanner)
                    sid = f"{spec.specimen_id}_{acq}"
                    pixels = digitise(spec.canvas, staining, scanner, config.seed, zlib.crc32(sid.encode()) + config.seed)
                    file = tmp / "slides" / f"{sid}.tif"
                    write_pyramid_tiff(file, pixels, config.mpp)
                    split = {0: "test", 1 % config.folds: "val"}.get(spec.fold, "train")
                    records.append(SlideRecord(
                        slide_id=sid, label=spec.label, label_index=CLASSES.index(spec.label),
                        patient_id=spec.specimen_id, path=out / "slides" / file.name, split=split, fold=spec.fold,
                        specimen_id=spec.specimen_id, acquisition=acq, scanner=scanner, staining=staining))
                    advance(1)
        write_slide_manifest(tmp / "manifest.csv", [_relocated(r, out, tmp) for r in records])
        info = {**asdict(config), "version": FORMAT_VERSION, "reference": config.reference, "classes": list(CLASSES),
                "slides": len(records), "split_rule": "fold 0 = test, fold 1 = val, others train",
                "source": "pathrobust synth-slides (real CC0 H&E of OpenSlide CMU-1, see "
                          "pathrobust/data/assets/ATTRIBUTION.md, under simulated stainings and scanners)"}
        (tmp / DONE_MARKER).write_text(json.dumps(info, indent=2) + "\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _relocated(record, out: Path, tmp: Path):
    """Paths in the manifest are written relative to its folder: point them into ``tmp``."""
    from dataclasses import replace

    return replace(record, path=tmp / record.path.relative_to(out))


def default_slides_data(config: SynthSlidesConfig = SynthSlidesConfig(), progress: bool = True) -> Path:
    """The synthetic slides used when no ``--data`` is given: built once into
    ``$PATHROBUST_CACHE/synth-slides/<config key>/``."""
    path = cache_dir("synth-slides") / config.key()
    if (path / DONE_MARKER).is_file():
        return path
    try:
        return synth_slides(path, config, overwrite=True, progress=progress)
    except OSError:
        if (path / DONE_MARKER).is_file():  # another process finished it first
            return path
        raise
