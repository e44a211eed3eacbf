"""Small EVA datasets in the CRC and MHIST layouts, made of real H&E tiles.

Every tile is a real 224 px crop of the bundled CC0 slide (``pathrobust.data.he``); train and
validation tiles come from disjoint stripes of the slide (as CRC's train and validation sets
come from different patients). Labels follow visible tissue properties:

* CRC-like, 9 classes = 3 tissue *architectures* x 3 *nuclear-density* levels:
  - architecture: the native tile; a 2x magnified view (its centre half upsampled: larger
    nuclei, coarser texture); or the tile cut into 56 px blocks that are shuffled and rotated
    (local texture kept, glandular/stromal architecture destroyed);
  - nuclear density: the tertile (per architecture, thresholds from the training pool) of the
    fraction of pixels whose haematoxylin concentration (colour deconvolution) exceeds 0.05.
  A colour histogram sees the density (haematoxylin amount) but hardly the architecture:
  shuffling leaves the pixel distribution unchanged and magnification changes it only a
  little, so it can separate about a third of the structure; an image encoder sees both.
* MHIST-like, binary (SSA 0 / HP 1, ~40/60 as in MHIST): SSA tiles show the tissue at 1.6x
  magnification (enlarged, coarser nuclei and crypts), HP tiles at the native scale.
* nuclei, a dense (segmentation) task: nucleus / stroma / background masks of real tiles,
  with simulated stainings and scanners (:mod:`pathrobust.data.synth_dense`).

Layouts written: ``crc/NCT-CRC-HE-100K/<CLASS>/*.tif``, ``crc/CRC-VAL-HE-7K/<CLASS>/*.tif``,
``mhist/images/*.png`` + ``mhist/annotations.csv`` (MHIST's columns), ``nuclei/`` (the
generic image + mask layout). The whole tree is written under a temporary name and renamed,
so an interrupted build leaves nothing behind.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pathrobust.cache import cache_dir
from pathrobust.data.eva import CRC_CLASSES, CRC_TRAIN_DIR, CRC_VAL_DIR
from pathrobust.data.he import bundled_slide_rgb
from pathrobust.data.synth_dense import SynthDenseConfig, tissue_integral, write_synth_dense
from pathrobust.data.synthetic import mark_synthetic
from pathrobust.errors import UserError
from pathrobust.stain import rgb_to_hed

MANIFEST = "synth-eva.json"
VERSION = 3
DENSE_DIR = "nuclei"
TILE = 224
ARCHITECTURES = ("native", "zoom2", "shuffle")
H_THRESHOLD = 0.05  # haematoxylin concentration counted as nuclear
STRIPE = 2 * TILE  # the slide is cut into horizontal stripes; every third one holds validation tiles


@dataclass(frozen=True)
class SynthEvaConfig:
    """Sizes of the synthetic sets (defaults keep the whole demo small)."""

    crc_train_per_class: int = 40
    crc_val_per_class: int = 15
    mhist_tiles: int = 150
    mhist_test_fraction: float = 0.3
    mhist_ssa_fraction: float = 0.4
    dense_tile: int = 96
    dense_train_tiles: int = 16
    dense_val_tiles: int = 8
    dense_test_tiles: int = 8
    dense_renderings: tuple[str, ...] = ("GIV-AT2", "KRH-S360", "MY-P")
    seed: int = 0

    def dense(self) -> SynthDenseConfig:
        """The nuclei set's :class:`~pathrobust.data.synth_dense.SynthDenseConfig`."""
        return SynthDenseConfig(tile=self.dense_tile, train_tiles=self.dense_train_tiles,
                                val_tiles=self.dense_val_tiles, test_tiles=self.dense_test_tiles,
                                renderings=tuple(self.dense_renderings), seed=self.seed)


def default_synth_root() -> Path:
    """``$PATHROBUST_CACHE/synth-eva`` (default ``~/.cache/pathrobust/synth-eva``)."""
    return cache_dir("synth-eva")


# -- tiles -----------------------------------------------------------------------------------
@lru_cache(maxsize=4)
def _tissue_positions(band: str, size: int = TILE, min_tissue: float = 0.6) -> np.ndarray:
    """Top-left (x, y) of every ``size`` window with enough tissue lying wholly inside a
    stripe of ``band`` (``val``: stripes 1, 4, 7, ...; ``train``: the others), so that no
    validation tile overlaps a training tile while both see every kind of tissue."""
    ii = tissue_integral()
    frac = (ii[size:, size:] - ii[:-size, size:] - ii[size:, :-size] + ii[:-size, :-size]) / (size * size)
    ys, xs = np.nonzero(frac >= min_tissue)
    inside = ys % STRIPE + size <= STRIPE
    is_val = (ys // STRIPE) % 3 == 1
    keep = inside & (is_val if band == "val" else ~is_val)
    return np.stack([xs[keep], ys[keep]], 1)


def sample_tiles(n: int, band: str, rng: np.random.Generator) -> np.ndarray:
    """``n`` real tissue tiles ``(n, 224, 224, 3)`` uint8 from the ``train`` or ``val`` stripes."""
    positions = _tissue_positions(band)
    rgb = bundled_slide_rgb()
    pick = positions[rng.choice(len(positions), size=n, replace=len(positions) < n)]
    return np.stack([rgb[y:y + TILE, x:x + TILE] for x, y in pick])


def magnify(tiles: np.ndarray, factor: float) -> np.ndarray:
    """Centre ``224 / factor`` px of each tile upsampled back to 224 (bilinear, antialias)."""
    side = int(round(TILE / factor))
    off = (TILE - side) // 2
    crop = torch.from_numpy(tiles[:, off:off + side, off:off + side]).permute(0, 3, 1, 2).float()
    up = F.interpolate(crop, size=(TILE, TILE), mode="bilinear", align_corners=False, antialias=True)
    return up.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def shuffle_blocks(tiles: np.ndarray, rng: np.random.Generator, block: int = 56) -> np.ndarray:
    """Cut each tile into ``block`` px squares, permute them and rotate each by k * 90 degrees:
    the same pixels (so the same colour histogram), another architecture."""
    g = TILE // block
    out = np.empty_like(tiles)
    for i, tile in enumerate(tiles):
        blocks = [tile[r * block:(r + 1) * block, c * block:(c + 1) * block] for r in range(g) for c in range(g)]
        order = rng.permutation(len(blocks))
        for j, src in enumerate(order):
            r, c = divmod(j, g)
            out[i, r * block:(r + 1) * block, c * block:(c + 1) * block] = np.rot90(blocks[src], k=int(rng.integers(4)))
    return out


def nuclear_fraction(tiles: np.ndarray, batch: int = 64) -> np.ndarray:
    """Fraction of pixels with haematoxylin concentration above ``H_THRESHOLD``: ``(n,)``
    (on every second pixel: a nucleus spans many)."""
    out = []
    for start in range(0, len(tiles), batch):
        x = torch.from_numpy(np.ascontiguousarray(tiles[start:start + batch, ::2, ::2])).permute(0, 3, 1, 2).float() / 255.0
        out.append((rgb_to_hed(x)[:, 0] > H_THRESHOLD).float().mean(dim=(1, 2)).numpy())
    return np.concatenate(out) if out else np.zeros(0)


def _architecture(tiles: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "native":
        return tiles
    if kind == "zoom2":
        return magnify(tiles, 2.0)
    return shuffle_blocks(tiles, rng)


def crc_like(cfg: SynthEvaConfig) -> dict[str, list[tuple[np.ndarray, int]]]:
    """``{"train": [(tile, label)...], "val": [...]}`` with labels in CRC class order."""
    rng = np.random.default_rng(cfg.seed)
    per = {"train": cfg.crc_train_per_class, "val": cfg.crc_val_per_class}
    out: dict[str, list[tuple[np.ndarray, int]]] = {"train": [], "val": []}
    for a, kind in enumerate(ARCHITECTURES):
        thresholds = None
        for split in ("train", "val"):
            chosen: list[list[np.ndarray]] = [[], [], []]
            for _ in range(50):  # draw pools until every density level has its tiles
                pool = _architecture(sample_tiles(max(per[split] * 12, 48), split, rng), kind, rng)
                density = nuclear_fraction(pool)
                if thresholds is None:  # tertiles of the first training pool define the levels
                    thresholds = np.quantile(density, [1 / 3, 2 / 3])
                level = np.digitize(density, thresholds)
                for d in range(3):
                    need = per[split] - len(chosen[d])
                    chosen[d] += [pool[i] for i in np.flatnonzero(level == d)[:max(need, 0)]]
                if all(len(c) >= per[split] for c in chosen):
                    break
            else:
                raise RuntimeError(f"synth-eva: could not fill every {kind} density level of the {split} split")
            for d in range(3):
                out[split] += [(tile, a * 3 + d) for tile in chosen[d]]
    return out


def mhist_like(cfg: SynthEvaConfig) -> list[tuple[np.ndarray, str, str]]:
    """``[(tile, label, partition)]`` with label SSA/HP and partition train/test."""
    rng = np.random.default_rng(cfg.seed + 1)
    rows = []
    n_test = int(round(cfg.mhist_tiles * cfg.mhist_test_fraction))
    for part, n in (("train", cfg.mhist_tiles - n_test), ("test", n_test)):
        n_ssa = int(round(n * cfg.mhist_ssa_fraction))
        tiles = sample_tiles(n, "train" if part == "train" else "val", rng)
        labels = np.array(["SSA"] * n_ssa + ["HP"] * (n - n_ssa))
        rng.shuffle(labels)
        ssa = labels == "SSA"
        tiles[ssa] = magnify(tiles[ssa], 1.6)
        rows += [(tiles[i], str(labels[i]), part) for i in range(n)]
    return rows


# -- writing ---------------------------------------------------------------------------------
def _save(path: Path, tile: np.ndarray) -> None:
    from PIL import Image

    img = Image.fromarray(tile)
    if path.suffix == ".tif":
        img.save(path)  # uncompressed, like NCT-CRC-HE-100K (tissue noise hardly compresses)
    else:
        img.save(path, compress_level=1)


def write_synth_eva(out: str | os.PathLike | None = None, config: SynthEvaConfig = SynthEvaConfig(),
                    overwrite: bool = False) -> Path:
    """Write the synthetic CRC, MHIST and nuclei datasets under ``out`` (default
    :func:`default_synth_root`) and return it. An existing tree built with the same config is
    reused; one built otherwise is an error unless ``overwrite``."""
    out = Path(out) if out is not None else default_synth_root()
    manifest = {"version": VERSION, **asdict(config), "dense_renderings": list(config.dense_renderings)}
    if out.exists():
        try:
            existing = json.loads((out / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            existing = None
        if existing == manifest and not overwrite:
            return out
        if not overwrite:
            raise UserError(f"--out {out}: exists and was not built by this synth-eva config; pass --overwrite or another --out")
    if min(config.crc_train_per_class, config.crc_val_per_class) < 1 or config.mhist_tiles < 10:
        raise UserError("synth-eva: need at least 1 CRC tile per class and split, and 10 MHIST tiles")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        crc = crc_like(config)
        for split, folder in (("train", CRC_TRAIN_DIR), ("val", CRC_VAL_DIR)):
            for cls in CRC_CLASSES:
                (tmp / "crc" / folder / cls).mkdir(parents=True)
            for i, (tile, label) in enumerate(crc[split]):
                cls = CRC_CLASSES[label]
                _save(tmp / "crc" / folder / cls / f"{cls}-SYN{split[0].upper()}{i:05d}.tif", tile)
        images = tmp / "mhist" / "images"
        images.mkdir(parents=True)
        with open(tmp / "mhist" / "annotations.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["Image Name", "Majority Vote Label", "Number of Annotators who Selected SSA (Out of 7)",
                             "Partition"])
            for i, (tile, label, part) in enumerate(mhist_like(config)):
                name = f"MHIST_s{i:04d}.png"
                _save(images / name, tile)
                writer.writerow([name, label, 7 if label == "SSA" else 0, part])
        write_synth_dense(tmp / DENSE_DIR, config.dense())
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        mark_synthetic(tmp, "synth-eva", asdict(config), note="CRC- and MHIST-like tasks and a nuclei segmentation "
                       "task from real CC0 H&E tiles; labels from measurable tissue properties, not the real datasets")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
