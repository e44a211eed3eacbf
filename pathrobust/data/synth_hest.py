"""A small HEST-Benchmark in the exact hest-bench layout, from real H&E of the bundled slide.

Spots are real 224 px tissue tiles (≈0.5 µm/px) of the bundled CC0 slide. Each spot's
expression is driven by morphology measured on its tile before staining variation is
applied:

* haematoxylin density and eosin density (mean stain concentrations after colour
  deconvolution),
* nuclear fraction (area of strongly haematoxylin-stained pixels),
* nuclear count (connected haematoxylin blobs of nucleus size: cellularity),
* fine texture (mean gradient magnitude of the grey image).

Gene ``g`` of spot ``s`` in sample ``p``: ``log rate = base_g + loadings_g · morphology_s +
sample_effect_{p,g} + noise``, counts ~ Poisson(rate). Most genes load on the spatial
features (count, fraction, texture) that a colour histogram cannot see; some load on stain
density, which it can. Each sample (patient) also gets its own staining: stain
concentrations scaled per sample, as between labs — it changes the pixels, not the biology.
So a good encoder should reach clearly positive Pearson and a colour histogram less.

Protocol knobs (sizes, noise, seeds) are in ``configs/suites/hest.toml`` ``[synthetic]``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FEATURES = ("h_density", "e_density", "nuclear_fraction", "nuclear_count", "texture")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SynthHestConfig:
    tasks: tuple[str, ...] = ("SYNTH_A", "SYNTH_B")
    samples_per_task: int = 4
    folds: int = 2
    spots_per_sample: int = 70
    genes: int = 50
    tile_size: int = 224
    noise: float = 0.25
    sample_effect: float = 0.15
    stain_jitter: float = 0.12
    base_log_rate: float = 1.8
    seed: int = 0

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> SynthHestConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "tasks" in known:
            known["tasks"] = tuple(known["tasks"])
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def morphology(tiles: np.ndarray, nucleus_threshold: float) -> np.ndarray:
    """Morphology of tiles ``(N, S, S, 3)`` uint8 -> ``(N, len(FEATURES))`` (see module doc)."""
    import torch
    from scipy import ndimage

    from pathrobust.stain import rgb_to_hed

    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0
    hed = rgb_to_hed(x).numpy()
    h, e = hed[:, 0], hed[:, 1]
    grey = tiles.astype(np.float64).mean(axis=-1) / 255.0
    gy, gx = np.gradient(grey, axis=(1, 2))
    texture = np.sqrt(gx ** 2 + gy ** 2).mean(axis=(1, 2))
    out = np.zeros((len(tiles), len(FEATURES)))
    for i in range(len(tiles)):
        mask = ndimage.binary_opening(h[i] > nucleus_threshold, iterations=1)
        labels, n = ndimage.label(mask)
        sizes = np.bincount(labels.ravel())[1:] if n else np.zeros(0)
        nuclei = int(((sizes >= 12) & (sizes <= 400)).sum())  # ≈ 2-10 µm nuclei at 0.5 µm/px
        out[i] = (h[i].mean(), e[i].mean(), mask.mean(), nuclei, texture[i])
    return out


def _nucleus_threshold(tiles: np.ndarray) -> float:
    """The 80th percentile of haematoxylin concentration over (up to 64 of) the tiles."""
    import torch

    from pathrobust.stain import rgb_to_hed

    x = torch.from_numpy(tiles[:64]).permute(0, 3, 1, 2).float() / 255.0
    return float(np.quantile(rgb_to_hed(x)[:, 0].numpy(), 0.8))


def _restain(tiles: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Scale H, E (and D) stain concentrations by ``scale`` (3,), back to uint8 RGB."""
    import torch

    from pathrobust.stain import hed_to_rgb, rgb_to_hed

    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0
    hed = rgb_to_hed(x) * torch.as_tensor(scale, dtype=torch.float32).view(1, 3, 1, 1)
    rgb = hed_to_rgb(hed).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return np.round(rgb * 255).astype(np.uint8)


def _gene_loadings(rng: np.random.Generator, n_genes: int) -> np.ndarray:
    """``(n_genes, len(FEATURES))`` loadings: ~70 % of genes follow spatial features
    (nuclear count/fraction, texture), ~30 % stain densities; every gene has a main driver
    plus smaller contributions of the others."""
    W = rng.normal(0.0, 0.08, size=(n_genes, len(FEATURES)))
    spatial = [FEATURES.index(f) for f in ("nuclear_fraction", "nuclear_count", "texture")]
    density = [FEATURES.index(f) for f in ("h_density", "e_density")]
    for g in range(n_genes):
        main = spatial[g % 3] if g % 10 < 7 else density[g % 2]
        W[g, main] = rng.choice([-1.0, 1.0]) * rng.uniform(0.35, 0.6)
    return W


def build_synth_hest(out: str | os.PathLike, config: SynthHestConfig = SynthHestConfig(),
                     overwrite: bool = False) -> Path:
    """Write the benchmark to ``out`` (one folder per task; see module doc) and return it.

    Built under a temporary name and renamed, so ``out`` is either complete or absent. An
    existing ``out`` built with the same config is kept as-is unless ``overwrite``."""
    import anndata
    import h5py
    import pandas as pd

    from pathrobust.data.he import sample_he_tiles
    from pathrobust.errors import UserError

    out = Path(out)
    stamp = {"format": FORMAT_VERSION, "config": config.to_dict()}
    marker = out / "synth_hest.json"
    if out.exists() and not overwrite:
        if marker.is_file() and json.loads(marker.read_text()) == stamp:
            return out
        raise UserError(f"--out {out}: already exists (and is not this synthetic benchmark); pass --overwrite")
    if config.samples_per_task < 2 or config.folds < 1 or config.samples_per_task % config.folds:
        raise UserError("synth-hest: samples_per_task must be >= 2 and a multiple of folds")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng(config.seed)
    genes = [f"GENE{g:02d}" for g in range(config.genes)]
    loadings = _gene_loadings(rng, config.genes)
    base = config.base_log_rate + rng.normal(0.0, 0.4, size=config.genes)
    n_per, n_samples = config.spots_per_sample, config.samples_per_task
    per_task = n_per * n_samples
    all_tiles, all_coords = sample_he_tiles(per_task * len(config.tasks), config.tile_size, seed=config.seed,
                                            return_coords=True)
    for t, task in enumerate(config.tasks):
        tiles, coords = all_tiles[t * per_task:(t + 1) * per_task], all_coords[t * per_task:(t + 1) * per_task]
        tiles = np.stack([np.rot90(tile, k=int(k)) for tile, k in zip(tiles, rng.integers(0, 4, len(tiles)))])
        if t == 0:  # one nucleus threshold and one feature scaling for every task
            threshold = _nucleus_threshold(tiles)
            morph = morphology(tiles, threshold)
            centre, spread = morph.mean(0), morph.std(0).clip(1e-12)
        else:
            morph = morphology(tiles, threshold)
        z = (morph - centre) / spread
        task_dir = tmp / task
        for sub in ("patches", "adata", "splits"):
            (task_dir / sub).mkdir(parents=True, exist_ok=True)
        sample_ids = [f"{task}_P{p}" for p in range(n_samples)]
        for p, sid in enumerate(sample_ids):
            sl = slice(p * n_per, (p + 1) * n_per)
            scale = np.exp(rng.normal(0.0, config.stain_jitter, size=3))
            patches = _restain(tiles[sl], scale)
            barcodes = [f"{sid}-{i:04d}" for i in range(n_per)]
            log_rate = (base + z[sl] @ loadings.T + rng.normal(0.0, config.sample_effect, size=config.genes)
                        + rng.normal(0.0, config.noise, size=(n_per, config.genes)))
            counts = rng.poisson(np.exp(log_rate)).astype(np.float32)
            with h5py.File(task_dir / "patches" / f"{sid}.h5", "w") as f:
                f.create_dataset("img", data=patches)
                f.create_dataset("barcode", data=np.array([b.encode() for b in barcodes], dtype="S").reshape(-1, 1))
                f.create_dataset("coords", data=coords[sl].astype(np.int64))
            obs = pd.DataFrame(index=pd.Index(barcodes, name="barcode"))
            var = pd.DataFrame(index=pd.Index(genes, name="gene"))
            anndata.AnnData(X=counts, obs=obs, var=var).write_h5ad(task_dir / "adata" / f"{sid}.h5ad")
        per_fold = n_samples // config.folds
        for k in range(config.folds):
            test = sample_ids[k * per_fold:(k + 1) * per_fold]
            train = [s for s in sample_ids if s not in test]
            for kind, ids in (("train", train), ("test", test)):
                pd.DataFrame({"sample_id": ids, "patches_path": [f"patches/{s}.h5" for s in ids],
                              "expr_path": [f"adata/{s}.h5ad" for s in ids]}).to_csv(
                    task_dir / "splits" / f"{kind}_{k}.csv", index=False)
        (task_dir / "var_50genes.json").write_text(json.dumps({"genes": genes}))
    (tmp / "synth_hest.json").write_text(json.dumps(stamp))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def default_synth_dir() -> Path:
    """``$PATHROBUST_CACHE/synth-hest`` (default ``~/.cache/pathrobust/synth-hest``)."""
    return Path(os.environ.get("PATHROBUST_CACHE", Path.home() / ".cache" / "pathrobust")) / "synth-hest"
