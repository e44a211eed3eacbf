"""Slide feature bags: one ``(N, D)`` matrix of tile features per slide, for MIL heads.

Where bags come from:

* :func:`build_bags` — tiles every slide on eva's foreground grid
  (:class:`~pathrobust.data.slides.SlideTiles`) and embeds them with the shared resumable
  extractor into ``<out_dir>/<slide_id>.h5`` (``features``, ``coords`` at level 0, geometry
  attributes in TRIDENT/CLAM names);
* :func:`read_feature_bag` — any such file, or one written by TRIDENT
  (``features_<encoder>/<slide>.h5``: ``features`` ``(N, D)``, ``coords`` ``(N, 2)`` whose
  attributes hold ``patch_size``, ``patch_size_level0``, magnifications) or CLAM
  (``h5_files/<slide>.h5`` with ``features`` and ``coords`` carrying ``patch_level`` and
  ``patch_size``, or ``pt_files/<slide>.pt``, a tensor ``(N, D)``).

Bags are capped once, when they are read (:func:`cap_bag`: a seeded subset, as eva's sampler
caps at build time), and never resampled per epoch; :func:`pad_bags` stacks them into one
array padded with ``-inf`` rows, eva's padding value, which the ABMIL head masks out.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pathrobust.data.slides import Tiling
from pathrobust.errors import UserError

H5_SUFFIXES = (".h5", ".hdf5")
PT_SUFFIXES = (".pt", ".pth")
PAD_VALUE = float("-inf")  # eva's Pad2DTensor / ABMIL pad_value


@dataclass
class FeatureBag:
    """One slide's tile features.

    ``features`` float32 ``(N, D)``; ``coords`` int64 ``(N, 2)`` (level-0 x, y; zeros when the
    file has none); ``attrs``: the file's attributes merged with those of its ``coords``
    dataset (where TRIDENT and CLAM keep the tiling geometry)."""

    slide_id: str
    features: np.ndarray
    coords: np.ndarray
    path: Path
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def __len__(self) -> int:
        return len(self.features)


def _attr_value(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_feature_bag(path: str | os.PathLike, slide_id: str | None = None) -> FeatureBag:
    """Read one slide's bag (pathrobust, TRIDENT or CLAM h5; CLAM ``.pt``); see the module doc.

    Bad files raise a one-line :class:`UserError` naming the file: unreadable, no ``features``,
    not ``(N, D)``, empty, non-finite values, coordinates of another length."""
    path = Path(path)
    slide_id = slide_id or path.stem
    if not path.is_file():
        raise UserError(f"{path}: no such feature file (slide {slide_id})")
    suffix = path.suffix.lower()
    if suffix in H5_SUFFIXES:
        features, coords, attrs = _read_h5(path)
    elif suffix in PT_SUFFIXES:
        features, coords, attrs = _read_pt(path)
    else:
        raise UserError(f"{path}: not a feature file (expected {', '.join(H5_SUFFIXES + PT_SUFFIXES)})")
    if features.ndim == 3 and features.shape[0] == 1:  # (1, N, D), as some exporters write
        features = features[0]
    if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise UserError(f"{path}: features have shape {tuple(features.shape)}; expected (N, D) with N, D >= 1")
    features = np.ascontiguousarray(features, dtype=np.float32)
    if not np.isfinite(features).all():
        raise UserError(f"{path}: features hold NaN or infinite values")
    if coords is None:
        coords = np.zeros((len(features), 2), np.int64)
    coords = np.asarray(coords)
    if coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    if coords.shape != (len(features), 2):
        raise UserError(f"{path}: coords have shape {tuple(coords.shape)}; expected ({len(features)}, 2)")
    return FeatureBag(slide_id, features, coords.astype(np.int64), path, attrs)


def _read_h5(path: Path):
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise UserError(f"{path}: no 'features' dataset (keys: {', '.join(sorted(f.keys())) or 'none'})")
            features = np.asarray(f["features"][:])
            coords = np.asarray(f["coords"][:]) if "coords" in f else None
            attrs = {k: _attr_value(v) for k, v in f.attrs.items()}
            for key in ("features", "coords"):
                if key in f:
                    attrs.update({k: _attr_value(v) for k, v in f[key].attrs.items() if k not in attrs})
    except OSError as exc:
        raise UserError(f"{path}: not a readable h5 file ({exc})") from None
    return features, coords, attrs


def _read_pt(path: Path):
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign or corrupt files
        raise UserError(f"{path}: not a readable torch file ({type(exc).__name__}: {exc})") from None
    coords = None
    if isinstance(obj, dict):
        key = next((k for k in ("features", "feats", "embeddings") if k in obj), None)
        if key is None:
            raise UserError(f"{path}: a dict without 'features' (keys: {', '.join(map(str, obj))})")
        coords = obj.get("coords")
        obj = obj[key]
        coords = None if coords is None else np.asarray(torch.as_tensor(coords))
    if isinstance(obj, (list, tuple)):  # eva's embeddings writer may store a list of (D,) tensors
        obj = torch.stack([torch.as_tensor(t) for t in obj])
    if not isinstance(obj, torch.Tensor):
        raise UserError(f"{path}: holds a {type(obj).__name__}; expected a tensor (N, D)")
    return obj.float().numpy(), coords, {}


def find_feature_file(root: str | os.PathLike, slide_id: str) -> Path | None:
    """The feature file of ``slide_id`` under ``root`` in pathrobust's, TRIDENT's or CLAM's
    layout: ``<root>/<id>.h5``, ``<root>/h5_files/<id>.h5``, ``<root>/<id>.pt``,
    ``<root>/pt_files/<id>.pt`` (first found), else ``None``."""
    root = Path(root)
    for folder in (root, root / "h5_files", root / "pt_files"):
        for suffix in H5_SUFFIXES + PT_SUFFIXES:
            candidate = folder / f"{slide_id}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def cap_bag(bag: FeatureBag, max_tiles: int | None, seed: int = 42) -> FeatureBag:
    """At most ``max_tiles`` instances: a seeded subset (``default_rng(seed).permutation``,
    the first ``max_tiles`` kept in file order). Bags already small enough are returned as-is.

    Bags built by :func:`build_bags` are capped by eva's sampler already; this caps bags made
    elsewhere (TRIDENT/CLAM keep every tile) once, so no epoch ever sees another subset."""
    if max_tiles is None or len(bag) <= max_tiles:
        return bag
    keep = np.sort(np.random.default_rng(seed).permutation(len(bag))[:max_tiles])
    return FeatureBag(bag.slide_id, bag.features[keep], bag.coords[keep], bag.path,
                      {**bag.attrs, "capped_from": len(bag), "cap_seed": seed})


def check_same_dim(bags: list[FeatureBag]) -> int:
    """The common feature dimension ``D``; bags of different dims raise a one-line UserError."""
    if not bags:
        raise UserError("no feature bags")
    dim = bags[0].dim
    for bag in bags[1:]:
        if bag.dim != dim:
            raise UserError(f"{bag.path}: features have dim {bag.dim}, but {bags[0].path} has {dim}; "
                            "all bags must come from one encoder and pooling")
    return dim


def load_bags(paths: Mapping[str, str | os.PathLike], max_tiles: int | None = None, seed: int = 42) -> list[FeatureBag]:
    """Read ``{slide_id: feature file}`` in that order, cap each once, and check one ``D``."""
    bags = [cap_bag(read_feature_bag(p, sid), max_tiles, seed) for sid, p in paths.items()]
    check_same_dim(bags)
    return bags


def pad_bags(bags: list[FeatureBag] | list[np.ndarray], pad_size: int | None = None,
             pad_value: float = PAD_VALUE) -> np.ndarray:
    """Stack bags into float32 ``(B, P, D)``, shorter bags padded with ``pad_value`` rows.

    ``P`` = ``pad_size`` (eva pads to the tile cap N) or the longest bag. Padding rows
    contribute nothing to an ABMIL head (zero-filled, masked from the attention softmax), so
    any ``P`` >= the longest bag gives the same outputs up to float rounding. A bag longer
    than ``pad_size`` is an error, as in eva: cap bags first."""
    feats = [b.features if isinstance(b, FeatureBag) else np.asarray(b, dtype=np.float32) for b in bags]
    if not feats:
        raise UserError("no feature bags to pad")
    dims = {f.shape[1] for f in feats}
    if len(dims) != 1:
        raise UserError(f"bags of different feature dims {sorted(dims)}")
    longest = max(len(f) for f in feats)
    size = longest if pad_size is None else int(pad_size)
    if longest > size:
        raise UserError(f"a bag has {longest} instances, more than the pad size {size}; cap bags first")
    out = np.full((len(feats), size, feats[0].shape[1]), pad_value, dtype=np.float32)
    for i, f in enumerate(feats):
        out[i, :len(f)] = f
    return out


def build_bags(slides: Mapping[str, str | os.PathLike], encoder, out_dir: str | os.PathLike, tiling: Tiling = Tiling(),
               *, slide_mpp_default: float | None = None, batch_size: int = 64, num_workers: int = 0,
               precision: str = "auto", device=None, progress: bool = True, overwrite: bool = False) -> dict[str, Path]:
    """Tile and embed every slide into ``<out_dir>/<slide_id>.h5``; returns ``{slide_id: path}``.

    Every slide is opened and tiled first, so a file OpenSlide cannot open or a slide without
    tissue stops the run (one-line UserError naming the file) before any extraction. Each
    feature file is written atomically and reused when it exists with the same provenance
    (see :func:`pathrobust.extract.extract_features`), so an interrupted run resumes."""
    from pathrobust.data.slides import SlideTiles
    from pathrobust.extract import extract_features

    out_dir = Path(out_dir)
    sources = {sid: SlideTiles.from_tiling(path, tiling, name=sid, slide_mpp_default=slide_mpp_default)
               for sid, path in slides.items()}
    written = {}
    for sid, source in sources.items():
        written[sid] = extract_features(encoder, source, out_dir / f"{sid}.h5", batch_size=batch_size,
                                        num_workers=num_workers, precision=precision, device=device,
                                        overwrite=overwrite, progress=progress)
    return written
