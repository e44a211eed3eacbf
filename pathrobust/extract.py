"""Batched, resumable feature extraction into CLAM/TRIDENT-style h5 files.

``extract_features(encoder, source, out_path)`` reads tiles from any :class:`TileSource`
through a DataLoader (workers do the decoding and resizing, batches stay uint8), runs the
encoder under ``inference_mode`` (bf16/fp16 autocast on CUDA, fp32 on CPU unless asked),
pools, and writes ``out_path``:

* ``features`` float32 ``(N, D)``, ``coords`` int64 ``(N, 2)``, ``tile_ids`` (bytes) when the
  source has ids;
* attributes: model, spec hash and spec JSON, weights sha256, pooling, precision, input size,
  mean/std, source name and fingerprint, pathrobust version, and the source's own
  ``attrs()`` (slides: read level, tile size, µm/px; TRIDENT/CLAM names also on ``coords``).

Resumability: features are written in chunks (a multiple of the batch size) to
``<out>.partial/`` as they complete, each chunk atomically (temporary name, then rename).
A rerun keeps the finished chunks and continues with the same batch boundaries, so the
result is byte-identical to an uninterrupted run. The final h5 is assembled under a temporary
name and renamed; a finished file is never rewritten unless ``overwrite=True``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pathrobust.data.tiles import COORDS_ATTRS, TileSource
from pathrobust.encoders.base import Encoder, prepare_tile
from pathrobust.errors import UserError
from pathrobust.registry import EncoderSpec

DEFAULT_CHUNK_TILES = 2048
WORKERS_MIN_TILES = 256
# Attributes that must agree for an existing file (or partial work) to be reused.
IDENTITY_ATTRS = ("model", "spec_hash", "weights_sha256", "pooling", "precision", "source_fingerprint")


class _PreparedTiles(Dataset):
    """Indices ``[start, stop)`` of a source, prepared for an encoder (runs in workers)."""

    def __init__(self, source: TileSource, spec: EncoderSpec, start: int, stop: int) -> None:
        self.source, self.spec, self.start, self.stop = source, spec, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> torch.Tensor:
        return prepare_tile(self.source.read(self.start + i), self.spec)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device}: not a torch device (cpu, cuda, cuda:1, auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    return dev


def resolve_precision(precision: str, device: torch.device, spec: EncoderSpec) -> str:
    """``auto`` = the spec's recommended precision on CUDA, fp32 on CPU."""
    if precision == "auto":
        return spec.precision if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise UserError(f"--precision {precision}: expected auto, fp32, bf16 or fp16")
    if precision == "fp16" and device.type == "cpu":
        raise UserError("--precision fp16: not supported on CPU; use fp32 or bf16")
    return precision


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def feature_attrs(encoder: Encoder, source: TileSource, precision: str) -> dict[str, Any]:
    from pathrobust import __version__

    attrs = encoder.provenance()
    attrs.update(
        precision=precision,
        source=source.name,
        source_fingerprint=source.fingerprint(),
        n_tiles=len(source),
        spec=json.dumps(encoder.spec.to_dict(), sort_keys=True),
        pathrobust_version=__version__,
    )
    attrs.update(source.attrs())  # how the tiles were made (slides: read level, tile size, µm/px)
    return attrs


@dataclass
class FeatureFile:
    features: np.ndarray
    coords: np.ndarray
    tile_ids: list[str] | None
    attrs: dict[str, Any]


def read_attrs(path: Path) -> dict[str, Any]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return {k: _attr_value(v) for k, v in f.attrs.items()}
    except OSError as exc:
        raise UserError(f"{path}: not a readable feature file ({exc})") from None


def _attr_value(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def load_features(path: str | os.PathLike) -> FeatureFile:
    """Read a feature h5 written by :func:`extract_features` (or any CLAM-style file with
    ``features`` and ``coords``)."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such feature file")
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise UserError(f"{path}: no 'features' dataset")
            feats = np.asarray(f["features"][:], dtype=np.float32)
            coords = np.asarray(f["coords"][:], dtype=np.int64) if "coords" in f else np.zeros((len(feats), 2), np.int64)
            ids = [v.decode() if isinstance(v, bytes) else str(v) for v in f["tile_ids"][:]] if "tile_ids" in f else None
            attrs = {k: _attr_value(v) for k, v in f.attrs.items()}
    except OSError as exc:
        raise UserError(f"{path}: not a readable feature file ({exc})") from None
    return FeatureFile(feats, coords, ids, attrs)


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, array)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_feature_h5(path: Path, features: np.ndarray, coords: np.ndarray, tile_ids: list[str] | None,
                     attrs: dict[str, Any]) -> None:
    """Write a feature file atomically (temporary name, then rename). Deterministic bytes:
    no timestamps, attributes in sorted order."""
    import h5py

    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w", track_order=False) as f:
        f.create_dataset("features", data=features.astype(np.float32, copy=False), track_times=False)
        coords_ds = f.create_dataset("coords", data=coords.astype(np.int64, copy=False), track_times=False)
        for key in COORDS_ATTRS:  # TRIDENT and CLAM read the tiling geometry from the coords dataset
            if key in attrs:
                coords_ds.attrs[key] = attrs[key]
        if tile_ids is not None:
            f.create_dataset("tile_ids", data=np.array([t.encode() for t in tile_ids], dtype="S"), track_times=False)
        for key in sorted(attrs):
            value = attrs[key]
            f.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) and key not in ("mean", "std") else value
    os.replace(tmp, path)


def extract_features(encoder: Encoder, source: TileSource, out_path: str | os.PathLike, *, batch_size: int = 64,
                     num_workers: int = 0, precision: str = "auto", device: str | torch.device | None = None,
                     overwrite: bool = False, progress: bool = True, chunk_tiles: int = DEFAULT_CHUNK_TILES) -> Path:
    """Extract pooled features of every tile of ``source`` into ``out_path`` (see module doc).

    Returns ``out_path``. An existing finished file with the same provenance is reused as-is;
    one with a different provenance is an error unless ``overwrite``."""
    out_path = Path(out_path)
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be >= 1")
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev, encoder.spec)
    attrs = feature_attrs(encoder, source, precision)
    if out_path.exists() and not overwrite:
        existing = read_attrs(out_path)
        diff = [k for k in IDENTITY_ATTRS if str(existing.get(k)) != str(attrs[k])]
        if not diff:
            return out_path
        raise UserError(
            f"{out_path}: already exists with different {', '.join(diff)} "
            f"(file: {existing.get(diff[0])!r}, now: {attrs[diff[0]]!r}); pass --overwrite or another --out"
        )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")
    chunk = max(batch_size, chunk_tiles // batch_size * batch_size)
    done = _resume_state(partial, attrs, chunk, batch_size, overwrite)
    n = len(source)
    n_chunks = (n + chunk - 1) // chunk
    start_chunk = len(done)
    if start_chunk < n_chunks:
        encoder = encoder.to(dev)
        _run_chunks(encoder, source, partial, start_chunk, n_chunks, chunk, batch_size, num_workers, precision, dev, progress)
    parts = [np.load(partial / f"{c:06d}.npy") for c in range(n_chunks)]
    features = np.concatenate(parts) if parts else np.zeros((0, encoder.output_dim), np.float32)
    write_feature_h5(out_path, features, source.coords, source.tile_ids, attrs)
    shutil.rmtree(partial, ignore_errors=True)
    return out_path


def _resume_state(partial: Path, attrs: dict[str, Any], chunk: int, batch_size: int, overwrite: bool) -> list[Path]:
    """Finished chunk files of an earlier interrupted run with the same identity, else []."""
    manifest = {"identity": {k: str(attrs[k]) for k in IDENTITY_ATTRS}, "chunk": chunk, "batch_size": batch_size}
    manifest_file = partial / "manifest.json"
    if partial.is_dir() and not overwrite:
        try:
            if json.loads(manifest_file.read_text()) == manifest:
                done = []
                while (partial / f"{len(done):06d}.npy").is_file():
                    done.append(partial / f"{len(done):06d}.npy")
                return done
        except (OSError, json.JSONDecodeError):
            pass
    shutil.rmtree(partial, ignore_errors=True)  # stale or different work: start over
    partial.mkdir(parents=True)
    tmp = manifest_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, manifest_file)
    return []


def _run_chunks(encoder: Encoder, source: TileSource, partial: Path, start_chunk: int, n_chunks: int, chunk: int,
                batch_size: int, num_workers: int, precision: str, dev: torch.device, progress: bool) -> None:
    from pathrobust.progress import tile_progress

    n = len(source)
    start = start_chunk * chunk
    if n - start < WORKERS_MIN_TILES:
        num_workers = 0  # starting worker processes costs more than decoding a few tiles
    loader = DataLoader(
        _PreparedTiles(source, encoder.spec, start, n), batch_size=batch_size, shuffle=False,
        num_workers=num_workers, pin_memory=dev.type == "cuda", persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )
    buffer: list[np.ndarray] = []
    buffered = 0
    chunk_index = start_chunk
    started = time.perf_counter()
    with tile_progress(f"{encoder.name} · {source.name}", total=n, completed=start, enabled=progress,
                       transient=True) as advance:
        with torch.inference_mode(), autocast(precision, dev):
            for batch in loader:
                feats = encoder(batch.to(dev, non_blocking=True)).float().cpu().numpy()
                buffer.append(feats)
                buffered += len(feats)
                advance(len(feats))
                if buffered >= chunk or start + (chunk_index - start_chunk) * chunk + buffered >= n:
                    _atomic_save_npy(partial / f"{chunk_index:06d}.npy", np.concatenate(buffer))
                    buffer, buffered, chunk_index = [], 0, chunk_index + 1
    encoder.tiles_embedded += n - start
    encoder.seconds_embedding += time.perf_counter() - started
