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

from pathrobust import atomic
from pathrobust.data.tiles import COORDS_ATTRS, TileSource
from pathrobust.devices import autocast, resolve_device, resolve_precision
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


def write_feature_h5(path: Path, features: np.ndarray, coords: np.ndarray, tile_ids: list[str] | None,
                     attrs: dict[str, Any]) -> None:
    """Write a feature file atomically (temporary name, then rename). Deterministic bytes:
    no timestamps, attributes in sorted order."""
    import h5py

    if len(coords) != len(features) or (tile_ids is not None and len(tile_ids) != len(features)):
        raise UserError(f"{path}: {len(features)} feature rows but {len(coords)} coords"
                        + (f" and {len(tile_ids)} tile ids" if tile_ids is not None else "") + "; they must match")
    with atomic.atomic_path(path) as tmp:
        with h5py.File(tmp, "w", track_order=False) as f:
            f.create_dataset("features", data=features.astype(np.float32, copy=False), track_times=False)
            coords_ds = f.create_dataset("coords", data=coords.astype(np.int64, copy=False), track_times=False)
            for key in COORDS_ATTRS:  # TRIDENT and CLAM read the tiling geometry from the coords dataset
                if key in attrs:
                    coords_ds.attrs[key] = attrs[key]
            if tile_ids is not None:
                f.create_dataset("tile_ids", data=np.array([t.encode() for t in tile_ids], dtype="S"),
                                 track_times=False)
            for key in sorted(attrs):
                value = attrs[key]
                f.attrs[key] = (json.dumps(value) if isinstance(value, (dict, list)) and key not in ("mean", "std")
                                else value)


def extract_features(encoder: Encoder | str, source: TileSource | str | os.PathLike, out_path: str | os.PathLike, *,
                     batch_size: int = 64, num_workers: int = 0, precision: str = "auto",
                     device: str | torch.device | None = None, overwrite: bool = False, progress: bool = True,
                     chunk_tiles: int = DEFAULT_CHUNK_TILES) -> Path:
    """Extract pooled features of every tile of ``source`` into ``out_path`` (see module doc).

    Args:
        encoder: an :class:`Encoder`, or anything :func:`pathrobust.build_encoder` takes
            (a registered name, ``module:factory``, a distilled model folder, a spec, a module).
        source: a :class:`~pathrobust.data.tiles.TileSource`, or a path: a folder of tiles, an
            h5 of tiles or one slide file (a folder of several slides: loop over
            :func:`pathrobust.data.sources.open_tile_sources`).
        out_path: the h5 file to write.

    Returns ``out_path``. An existing finished file with the same provenance is reused as-is;
    one with a different provenance is an error unless ``overwrite``."""
    out_path = Path(out_path)
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be >= 1")
    if not isinstance(encoder, Encoder):
        from pathrobust.encoders.base import build_encoder

        encoder = build_encoder(encoder, device=resolve_device(device))
    if not isinstance(source, TileSource):
        from pathrobust.data.sources import open_tile_sources

        sources = open_tile_sources(Path(source))
        if len(sources) != 1:
            raise UserError(f"{source}: holds {len(sources)} tile sources (slides); extract each one "
                            "(pathrobust.data.sources.open_tile_sources) or use `pathrobust extract`")
        source = sources[0]
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev, encoder.spec.precision)
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


def _worker_errors_as_one_line(loader):
    """Iterate a DataLoader; a UserError raised in a worker arrives wrapped in a multi-line
    message holding the worker's traceback: keep the error's own last line."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except UserError as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            if len(lines) <= 1:
                raise
            prefix = f"{UserError.__module__}.{UserError.__qualname__}:"
            last = lines[-1]
            raise UserError(last[len(prefix):].strip() if last.startswith(prefix) else last) from None
        yield batch


class FeatureCache:
    """The one feature cache of a suite run: ``<root>/<pooling>-<precision>-<key>/<name>.h5``.

    ``key`` hashes the encoder's identity (spec hash, weights sha256, pooling, precision), so
    another model, checkpoint, pooling or precision never reads these files. Each file is
    made by :func:`extract_features` (batched, resumable, provenance in its attributes); a
    file whose recorded source fingerprint no longer matches its source (the input changed)
    is recomputed, never trusted."""

    def __init__(self, root: str | os.PathLike, encoder: Encoder, precision: str, device: torch.device, *,
                 batch_size: int = 64, workers: int = 0, progress: bool = True) -> None:
        import hashlib

        ident = json.dumps([encoder.spec.hash, encoder.weights_sha256 or "", encoder.pooling, precision])
        key = hashlib.sha256(ident.encode()).hexdigest()[:8]
        self.dir = Path(root) / f"{encoder.pooling.replace('+', '_')}-{precision}-{key}"
        self.encoder, self.precision, self.device = encoder, precision, device
        self.batch_size, self.workers, self.progress = batch_size, workers, progress

    def path(self, name: str) -> Path:
        """Where the features of the source called ``name`` go (``a/b`` makes sub-folders)."""
        from pathrobust.store import safe_name

        parts = [safe_name(p) for p in str(name).split("/") if p]
        return self.dir.joinpath(*parts[:-1], parts[-1] + ".h5")

    def embed(self, source: TileSource, name: str | None = None, overwrite: bool = False) -> Path:
        """The feature file of ``source`` (extracting what is missing)."""
        path = self.path(name or source.name)
        if path.is_file() and not overwrite:
            have = read_attrs(path).get("source_fingerprint")
            overwrite = str(have) != str(source.fingerprint())
        return extract_features(self.encoder, source, path, batch_size=self.batch_size, num_workers=self.workers,
                                precision=self.precision, device=self.device, overwrite=overwrite,
                                progress=self.progress)

    def load(self, source: TileSource, name: str | None = None) -> FeatureFile:
        return load_features(self.embed(source, name))

    def grids(self, source: TileSource, name: str | None = None, dtype: str = "float16") -> Path:
        """The patch-token grid file of ``source`` (``<name>.grids.h5``, made by
        :func:`pathrobust.encoders.grid.embed_token_grids` under this cache's precision), kept
        while model, weights, source fingerprint and dtype agree, else recomputed."""
        from pathrobust.encoders.grid import embed_token_grids, grid_file_current
        from pathrobust.progress import tile_progress

        path = self.path(name or source.name)
        path = path.with_name(path.name[:-len(".h5")] + ".grids.h5")
        if grid_file_current(path, self.encoder, source, dtype):
            return path
        with tile_progress(f"{self.encoder.name} · {name or source.name} · token grids", total=len(source),
                           enabled=self.progress, transient=True) as advance, autocast(self.precision, self.device):
            return embed_token_grids(self.encoder, source, path, batch_size=self.batch_size, dtype=dtype,
                                     device=self.device, overwrite=True, progress=advance)


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
    atomic.write_text(manifest_file, json.dumps(manifest))
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
            for batch in _worker_errors_as_one_line(loader):
                feats = encoder(batch.to(dev, non_blocking=True)).float().cpu().numpy()
                buffer.append(feats)
                buffered += len(feats)
                advance(len(feats))
                if buffered >= chunk or start + (chunk_index - start_chunk) * chunk + buffered >= n:
                    atomic.save_npy(partial / f"{chunk_index:06d}.npy", np.concatenate(buffer), fsync=True)
                    buffer, buffered, chunk_index = [], 0, chunk_index + 1
    encoder.tiles_embedded += n - start
    encoder.seconds_embedding += time.perf_counter() - started
