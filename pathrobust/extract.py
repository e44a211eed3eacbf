"""Batched, resumable feature extraction into CLAM/TRIDENT-style h5 files, over any number
of processes.

``extract_features(encoder, source, out_path)`` reads tiles from any :class:`TileSource`
through a DataLoader (workers do the decoding and resizing — slide regions are read there
too — batches stay uint8 in pinned memory), runs the encoder under ``inference_mode``
(bf16/fp16 autocast on CUDA, fp32 on CPU unless asked), pools, and writes ``out_path``:

* ``features`` float32 ``(N, D)``, ``coords`` int64 ``(N, 2)``, ``tile_ids`` (bytes) when the
  source has ids;
* attributes: model, spec hash and spec JSON, weights sha256, pooling, precision, input size,
  mean/std, source name and fingerprint, pathrobust version, and the source's own
  ``attrs()`` (slides: read level, tile size, µm/px; TRIDENT/CLAM names also on ``coords``).

Work items are *chunks*: runs of tiles (a multiple of the batch size) of one output file,
written to ``<out>.partial/NNNNNN.npy`` atomically as they complete. ``manifest.json`` there
fixes the chunk and batch size of the file; every process that works on it adopts them, so
batch boundaries — and the bytes of the result — never depend on who computed what. Each
chunk is taken under a lock file (``NNNNNN.lock``, :mod:`pathrobust.locks`: a dead owner's
lock is taken over), so ranks of a torchrun launch, shards of a job array and unrelated
concurrent launches over the same outputs never compute a chunk twice. Whoever finds every
chunk of a file present assembles the h5 (under ``<out>.lock``, temporary name then rename)
and removes the partial folder. A rerun keeps the finished chunks; the result is
byte-identical to an uninterrupted one-process run (on a device where the forward pass is
deterministic for a given batch). A finished file is never rewritten unless ``overwrite``.

:func:`extract_many` shares the chunks of many files among a :class:`~pathrobust.dist.Team`:
each rank or shard takes a contiguous block of the global chunk list (balanced in tiles,
whatever the file sizes), then — ranks and single processes — finishes or waits for the
rest. On CUDA the next batch is copied on a side stream while the current one runs, and
features stay on the device until their chunk is complete (one synchronisation per chunk).
"""

from __future__ import annotations

import json
import logging
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

# tiles per resumable chunk (rounded to the batch size); PATHROBUST_CHUNK_TILES sets it (tests, tiny files)
DEFAULT_CHUNK_TILES = int(os.environ.get("PATHROBUST_CHUNK_TILES", "2048"))
WORKERS_MIN_TILES = 256
# Attributes that must agree for an existing file (or partial work) to be reused.
IDENTITY_ATTRS = ("model", "spec_hash", "weights_sha256", "pooling", "precision", "source_fingerprint")

logger = logging.getLogger("pathrobust.extract")


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


# -- one output file: its chunks -------------------------------------------------------------------
@dataclass
class FileJob:
    """One output file of an extraction: its source, where it goes, and its chunks
    (``chunk`` tiles each, the last one shorter; ``chunk`` is a multiple of ``batch_size``)."""

    source: TileSource
    out: Path
    attrs: dict[str, Any]
    batch_size: int
    chunk: int
    dim: int

    @property
    def partial(self) -> Path:
        return self.out.with_name(self.out.name + ".partial")

    @property
    def file_lock(self) -> Path:
        return self.out.with_name(self.out.name + ".lock")

    @property
    def n(self) -> int:
        return len(self.source)

    @property
    def n_chunks(self) -> int:
        return (self.n + self.chunk - 1) // self.chunk

    def bounds(self, c: int) -> tuple[int, int]:
        return c * self.chunk, min(self.n, (c + 1) * self.chunk)

    def chunk_file(self, c: int) -> Path:
        return self.partial / f"{c:06d}.npy"

    def chunk_lock(self, c: int) -> Path:
        return self.partial / f"{c:06d}.lock"

    @property
    def finished(self) -> bool:
        return self.out.is_file()

    def chunk_done(self, c: int) -> bool:
        return self.chunk_file(c).is_file()

    def done_chunks(self) -> set[int]:
        try:
            names = os.listdir(self.partial)
        except OSError:
            return set()
        return {int(n[:-4]) for n in names if n.endswith(".npy") and n[:-4].isdigit()}

    def identity(self) -> dict[str, str]:
        return {k: str(self.attrs[k]) for k in IDENTITY_ATTRS}


def _ceil_to(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def plan_file(encoder: Encoder, source: TileSource, out_path: str | os.PathLike, *, batch_size: int = 64,
              precision: str = "fp32", overwrite: bool = False, chunk_tiles: int | None = None,
              pieces: int = 1) -> FileJob | None:
    """The job of writing ``out_path`` from ``source``; None when the file is already there
    with the same provenance (another provenance is an error unless ``overwrite``, which
    removes the file and its partial work: call it with ``overwrite`` from one process only).

    The chunk and batch size come from the file's manifest when partial work exists (so
    every process agrees), else ``chunk_tiles`` rounded to the batch size, made smaller when
    the file should be split into at least ``pieces`` chunks (ranks sharing one file)."""
    out_path = Path(out_path)
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be >= 1")
    attrs = feature_attrs(encoder, source, precision)
    job = FileJob(source, out_path, attrs, batch_size, 0, encoder.output_dim)
    if overwrite:
        out_path.unlink(missing_ok=True)
        shutil.rmtree(job.partial, ignore_errors=True)
    elif out_path.exists():
        existing = read_attrs(out_path)
        diff = [k for k in IDENTITY_ATTRS if str(existing.get(k)) != str(attrs[k])]
        if not diff:
            return None
        raise UserError(
            f"{out_path}: already exists with different {', '.join(diff)} "
            f"(file: {existing.get(diff[0])!r}, now: {attrs[diff[0]]!r}); pass --overwrite or another --out"
        )
    chunk_tiles = DEFAULT_CHUNK_TILES if chunk_tiles is None else chunk_tiles
    chunk = max(batch_size, chunk_tiles // batch_size * batch_size)
    if pieces > 1 and len(source) > 0:
        chunk = min(chunk, _ceil_to(-(-len(source) // pieces), batch_size))
    job.batch_size, job.chunk = _open_partial(job, chunk, batch_size)
    if out_path.exists():  # assembled by another process while we looked: our fresh manifest is not needed
        if job.done_chunks() == set():
            shutil.rmtree(job.partial, ignore_errors=True)
        return plan_file(encoder, source, out_path, batch_size=batch_size, precision=precision,
                         chunk_tiles=chunk_tiles, pieces=pieces)
    return job


def _live_locks(partial: Path) -> list[dict]:
    from pathrobust import locks

    owners = []
    for lock in partial.glob("*.lock"):
        owner = locks.owner(lock)
        if owner is not None and not locks.is_stale(owner, locks.ITEM_STALE_AFTER_S):
            owners.append(owner)
    return owners


def _create_exclusive(path: Path, text: str) -> bool:
    """Write ``path`` whole, only if it does not exist (link of a finished temporary file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _read_manifest(partial: Path) -> dict | None:
    try:
        return json.loads((partial / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _open_partial(job: FileJob, chunk: int, batch_size: int) -> tuple[int, int]:
    """Agree on the file's (batch size, chunk) through its manifest: adopt an existing one for
    the same work (the same batch size, or anyone's, while someone is working on it), else
    start over (under the file's lock) and write ours — exclusively, so concurrent processes
    end up with one manifest."""
    from pathrobust import locks

    identity = job.identity()
    for _ in range(100):
        have = _read_manifest(job.partial)
        if have is not None:
            live = _live_locks(job.partial)
            if have.get("identity") == identity and (have.get("batch_size") == batch_size or live):
                return int(have["batch_size"]), int(have["chunk"])
            if live:
                raise UserError(f"{job.out}: another process (pid {live[0].get('pid')} on {live[0].get('host')}) "
                                "is extracting it with a different model or settings; wait for it or choose "
                                "another --out")
            if locks.try_acquire(job.file_lock, locks.ITEM_STALE_AFTER_S):
                try:
                    if _read_manifest(job.partial) == have:
                        shutil.rmtree(job.partial, ignore_errors=True)  # stale or different work: start over
                finally:
                    locks.release(job.file_lock)
            else:
                time.sleep(0.05)
            continue
        job.partial.mkdir(parents=True, exist_ok=True)
        manifest = {"identity": identity, "chunk": chunk, "batch_size": batch_size}
        if _create_exclusive(job.partial / "manifest.json", json.dumps(manifest)):
            return batch_size, chunk
    raise UserError(f"{job.partial}: could not agree on its manifest with the other processes; remove it and rerun")


# -- many files, many processes ---------------------------------------------------------------------
class _Extractor:
    """Computes chunks of jobs in this process: claims them under their locks, runs the
    encoder over contiguous runs of claimed chunks (one DataLoader per run), saves and
    releases each chunk as it completes, assembles files whose chunks are all present."""

    POLL_MIN, POLL_MAX = 0.05, 2.0
    MAX_RUN = 8  # chunks claimed at once: one DataLoader for the run, little held back from others

    def __init__(self, encoder: Encoder, *, num_workers: int, precision: str, device: torch.device,
                 label: str = "", log: logging.Logger | None = None, heartbeat=None) -> None:
        self.encoder, self.num_workers, self.precision, self.device = encoder, num_workers, precision, device
        self.label = label
        self.log = log or logger
        self.heartbeat = heartbeat
        self.inflight = 0        # tiles computed here whose chunk is not saved yet (progress)
        self.computed = 0        # chunks computed by this process
        self._on_device = False

    # claiming and computing ---------------------------------------------------------------------
    def work(self, items: list[tuple[FileJob, int]]) -> list[tuple[FileJob, int]]:
        """Compute the items nobody else holds; return those held by live processes."""
        from pathrobust import locks

        busy: list[tuple[FileJob, int]] = []
        i = 0
        while i < len(items):
            job = items[i][0]
            run: list[int] = []
            while (i < len(items) and items[i][0] is job and len(run) < self.MAX_RUN
                   and (not run or items[i][1] == run[-1] + 1)):
                c = items[i][1]
                i += 1
                if job.finished or job.chunk_done(c):
                    if run:
                        break
                    continue
                lock = job.chunk_lock(c)
                if not locks.try_acquire(lock, locks.ITEM_STALE_AFTER_S):
                    busy.append((job, c))
                    if run:
                        break
                    continue
                if job.finished or job.chunk_done(c):  # finished between the look and the lock
                    locks.release(lock)
                    _rmdir_if_empty(job.partial)
                    if run:
                        break
                    continue
                if self.heartbeat is not None:
                    self.heartbeat.add(lock)
                run.append(c)
            if run:
                self._compute(job, run)
                self.assemble_if_complete(job)
        return busy

    def _release(self, job: FileJob, c: int) -> None:
        from pathrobust import locks

        if self.heartbeat is not None:
            self.heartbeat.discard(job.chunk_lock(c))
        locks.release(job.chunk_lock(c))

    def _compute(self, job: FileJob, chunks: list[int]) -> None:
        """Run the encoder over the claimed consecutive ``chunks`` of ``job``. Features stay
        on the device until their chunk is complete; on CUDA the chunk then goes to pinned
        host memory asynchronously and a saver thread writes it (waiting for the copy), so
        the host keeps queuing batches and the GPU never waits for a disk."""
        from concurrent.futures import ThreadPoolExecutor

        dev = self.device
        if not self._on_device:
            self.encoder.to(dev)
            self._on_device = True
        start, stop = job.bounds(chunks[0])[0], job.bounds(chunks[-1])[1]
        workers = self.num_workers if stop - start >= WORKERS_MIN_TILES else 0  # worker start-up > decoding a few
        loader = DataLoader(
            _PreparedTiles(job.source, self.encoder.spec, start, stop), batch_size=job.batch_size, shuffle=False,
            num_workers=workers, pin_memory=dev.type == "cuda", persistent_workers=False,
            prefetch_factor=4 if workers > 0 else None,
        )
        pending = list(chunks)
        outs: list[torch.Tensor] = []
        filled = 0
        started = time.perf_counter()
        saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pathrobust-chunk-saver") \
            if dev.type == "cuda" else None
        saving = []
        try:
            with torch.inference_mode(), autocast(self.precision, dev):
                for batch in _on_device(_worker_errors_as_one_line(loader), dev):
                    outs.append(self.encoder(batch))  # stays on the device until its chunk is complete
                    filled += len(batch)
                    self.inflight += len(batch)
                    a, b = job.bounds(pending[0])
                    if filled < b - a:
                        continue
                    if filled != b - a:  # batches never straddle chunks (chunk = k * batch size)
                        raise RuntimeError(f"{job.out}: batch boundaries do not match its chunks")
                    c = pending.pop(0)
                    feats = torch.cat(outs).float()
                    outs, filled = [], 0
                    if saver is None:
                        self._save(job, c, feats.numpy())
                        continue
                    host = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True)
                    host.copy_(feats, non_blocking=True)
                    copied = torch.cuda.Event()
                    copied.record()
                    saving.append(saver.submit(self._save_when_copied, job, c, host, copied))
        finally:
            for c in pending:  # interrupted: give back what was claimed and not saved
                self._release(job, c)
            if saver is not None:
                saver.shutdown(wait=True)
            self.inflight = 0
        for future in saving:
            future.result()  # a failed save (disk full, ...) is raised here
        self.encoder.tiles_embedded += stop - start
        self.encoder.seconds_embedding += time.perf_counter() - started

    def _save_when_copied(self, job: FileJob, c: int, host: torch.Tensor, copied) -> None:
        copied.synchronize()
        self._save(job, c, host.numpy())

    def _save(self, job: FileJob, c: int, feats: np.ndarray) -> None:
        """Write chunk ``c`` (atomically, fsynced) and release its lock — also when the write
        fails, so another process can do it."""
        try:
            have = _read_manifest(job.partial)
            if have is None or have.get("identity") != job.identity() or int(have.get("chunk", -1)) != job.chunk:
                raise UserError(f"{job.out}: its partial work was replaced by another process with different "
                                "settings; rerun once that process is done")
            atomic.save_npy(job.chunk_file(c), feats, fsync=True)
        finally:
            self._release(job, c)
        self.inflight = 0
        self.computed += 1
        a, b = job.bounds(c)
        self.log.info("chunk %s %d/%d tiles %d-%d", job.out.name, c, job.n_chunks, a, b)

    # assembling ---------------------------------------------------------------------------------
    def assemble_if_complete(self, job: FileJob) -> bool | None:
        """Assemble ``job`` when all its chunks are present. True: the file is there; False:
        another process is assembling it; None: chunks are still missing."""
        if job.finished:
            return True
        if len(job.done_chunks()) < job.n_chunks:
            return None
        return self._assemble(job)

    def _assemble(self, job: FileJob) -> bool:
        from pathrobust import locks

        if not locks.try_acquire(job.file_lock, locks.ITEM_STALE_AFTER_S):
            return False
        try:
            if job.finished:
                return True
            parts = [np.load(job.chunk_file(c)) for c in range(job.n_chunks)]
            features = np.concatenate(parts) if parts else np.zeros((0, job.dim), np.float32)
            write_feature_h5(job.out, features, job.source.coords, job.source.tile_ids, job.attrs)
            shutil.rmtree(job.partial, ignore_errors=True)
            self.log.info("file %s assembled from %d chunk(s), %d tiles", job.out.name, job.n_chunks, job.n)
            return True
        finally:
            locks.release(job.file_lock)

    # waiting for the others ---------------------------------------------------------------------
    def settle(self, jobs: list[FileJob], items: list[tuple[FileJob, int]], *, whole: bool) -> None:
        """Finish ``items`` (computing those nobody holds, waiting for those a live process
        holds, taking over those of dead ones); with ``whole``, also see every job's file
        assembled (waiting if another process is assembling it)."""
        delay = self.POLL_MIN
        # what is left, last files first (chunks in order within a file): a member that finished
        # its block early meets the slower ones in the middle instead of racing them for their next chunks
        order = {id(j): k for k, j in enumerate(jobs)}
        items = sorted(items, key=lambda jc: (-order.get(id(jc[0]), 0), jc[1]))
        while True:
            missing = [(j, c) for j, c in items if not j.finished and not j.chunk_done(c)]
            busy = self.work(missing) if missing else []
            waiting = bool(busy)
            for job in jobs:
                state = self.assemble_if_complete(job)
                if whole and state is not True:
                    waiting = True
            if not waiting:
                return
            if len(busy) == len(missing):  # nothing to do here but wait for the others
                time.sleep(delay)
                delay = min(self.POLL_MAX, delay * 2)
            else:
                delay = self.POLL_MIN


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def _on_device(batches, dev: torch.device):
    """Batches on ``dev``; on CUDA each one is copied on a side stream (pinned memory,
    non-blocking) and the next is fetched from the loader only after the consumer has queued
    its work on the current one, so the GPU computes batch k while batch k+1 is read and
    copied."""
    if dev.type != "cuda":
        yield from batches
        return
    stream = torch.cuda.Stream(dev)
    iterator = iter(batches)

    def copy():
        batch = next(iterator, None)
        if batch is None:
            return None
        with torch.cuda.stream(stream):
            return batch.to(dev, non_blocking=True)

    batch = copy()
    while batch is not None:
        current = torch.cuda.current_stream(dev)
        current.wait_stream(stream)
        batch.record_stream(current)
        yield batch  # the consumer queues its forward pass on the current stream
        batch = copy()


def extract_many(encoder: Encoder, jobs: list[FileJob | None], *, team=None, whole: bool = True,
                 num_workers: int = 0, precision: str = "fp32", device: torch.device | str | None = None,
                 progress: bool = True, log: logging.Logger | None = None, description: str | None = None) -> None:
    """Compute the chunks of ``jobs`` (None entries: finished files) as member ``team.index``
    of ``team.size`` (default: one process alone): first its contiguous block of the global
    chunk list, then — ``whole`` — every chunk still missing (dead or absent members' work,
    waiting for chunks live processes hold) until every file is assembled; without ``whole``
    (a job-array shard) only its block, assembling the files it completes.

    Rank 0 (or the single process) shows a bar of the tiles done by everyone (counted from
    the chunk files) and their total rate."""
    from pathrobust import locks
    from pathrobust.dist import Team, share
    from pathrobust.progress import polled_progress

    team = team or Team()
    jobs = [j for j in jobs if j is not None]
    dev = resolve_device(device)
    items = [(j, c) for j in jobs for c in range(j.n_chunks)]
    mine = [items[k] for k in share(len(items), team.index, team.size)]
    total = sum(j.n for j in jobs)

    with locks.Heartbeat() as heartbeat:
        ex = _Extractor(encoder, num_workers=num_workers, precision=precision, device=dev, label=team.label(),
                        log=log, heartbeat=heartbeat)
        finished: set[int] = set()

        def tiles_done() -> int:
            done = ex.inflight
            for k, job in enumerate(jobs):
                if k in finished or job.finished:
                    finished.add(k)
                    done += job.n
                else:
                    done += sum(job.bounds(c)[1] - job.bounds(c)[0] for c in job.done_chunks() if c < job.n_chunks)
            return done

        what = description or (f"{encoder.name} · {jobs[0].source.name}" if len(jobs) == 1
                               else f"{encoder.name} · {len(jobs)} files")
        with polled_progress(what, total, tiles_done, enabled=progress and team.lead and bool(jobs),
                             transient=len(jobs) == 1):
            ex.work(mine)
            ex.settle(jobs, items if whole else mine, whole=whole)


def extract_features(encoder: Encoder | str, source: TileSource | str | os.PathLike, out_path: str | os.PathLike, *,
                     batch_size: int = 64, num_workers: int = 0, precision: str = "auto",
                     device: str | torch.device | None = None, overwrite: bool = False, progress: bool = True,
                     chunk_tiles: int | None = None, log: logging.Logger | None = None) -> Path:
    """Extract pooled features of every tile of ``source`` into ``out_path`` (see module doc).

    Args:
        encoder: an :class:`Encoder`, or anything :func:`pathrobust.build_encoder` takes
            (a registered name, ``module:factory``, a distilled model folder, a spec, a module).
        source: a :class:`~pathrobust.data.tiles.TileSource`, or a path: a folder of tiles, an
            h5 of tiles or one slide file (a folder of several slides: loop over
            :func:`pathrobust.data.sources.open_tile_sources`).
        out_path: the h5 file to write.

    Returns ``out_path``. An existing finished file with the same provenance is reused as-is;
    one with a different provenance is an error unless ``overwrite``. Another process working
    on the same file at the same time shares its chunks (each computed once)."""
    out_path = Path(out_path)
    dev = resolve_device(device)
    if not isinstance(encoder, Encoder):
        from pathrobust.encoders.base import build_encoder

        encoder = build_encoder(encoder, device=dev)
    if not isinstance(source, TileSource):
        from pathrobust.data.sources import open_tile_sources

        sources = open_tile_sources(Path(source))
        if len(sources) != 1:
            raise UserError(f"{source}: holds {len(sources)} tile sources (slides); extract each one "
                            "(pathrobust.data.sources.open_tile_sources) or use `pathrobust extract`")
        source = sources[0]
    precision = resolve_precision(precision, dev, encoder.spec.precision)
    job = plan_file(encoder, source, out_path, batch_size=batch_size, precision=precision, overwrite=overwrite,
                    chunk_tiles=chunk_tiles)
    extract_many(encoder, [job], num_workers=num_workers, precision=precision, device=dev, progress=progress, log=log)
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
    is recomputed, never trusted.

    With a :class:`~pathrobust.dist.Team` of torchrun ranks, rank 0 runs the suite and every
    :meth:`embed` it calls is computed by all ranks together (each takes its block of the
    file's chunks; the others wait in ``team.serve()``): every suite is split across ranks
    without code of its own."""

    def __init__(self, root: str | os.PathLike, encoder: Encoder, precision: str, device: torch.device, *,
                 batch_size: int = 64, workers: int = 0, progress: bool = True, team=None,
                 log: logging.Logger | None = None, chunk_tiles: int | None = None) -> None:
        import hashlib

        from pathrobust.dist import Team

        ident = json.dumps([encoder.spec.hash, encoder.weights_sha256 or "", encoder.pooling, precision])
        key = hashlib.sha256(ident.encode()).hexdigest()[:8]
        self.dir = Path(root) / f"{encoder.pooling.replace('+', '_')}-{precision}-{key}"
        self.encoder, self.precision, self.device = encoder, precision, device
        self.batch_size, self.workers, self.progress = batch_size, workers, progress
        self.chunk_tiles, self.log = chunk_tiles, log
        self.team = team or Team()
        self.team.handlers["feature-cache.embed"] = self._embed_together

    def path(self, name: str) -> Path:
        """Where the features of the source called ``name`` go (``a/b`` makes sub-folders)."""
        from pathrobust.store import safe_name

        parts = [safe_name(p) for p in str(name).split("/") if p]
        return self.dir.joinpath(*parts[:-1], parts[-1] + ".h5")

    def _outdated(self, source: TileSource, path: Path) -> bool:
        """The file exists but was computed from other input (its source fingerprint differs)."""
        if not path.is_file():
            return False
        return str(read_attrs(path).get("source_fingerprint")) != str(source.fingerprint())

    def plan(self, source: TileSource, name: str | None = None, overwrite: bool = False,
             pieces: int = 1) -> FileJob | None:
        """The job of embedding ``source`` (None: its file is there)."""
        path = self.path(name or source.name)
        overwrite = overwrite or self._outdated(source, path)
        return plan_file(self.encoder, source, path, batch_size=self.batch_size, precision=self.precision,
                         overwrite=overwrite, chunk_tiles=self.chunk_tiles, pieces=pieces)

    def embed(self, source: TileSource, name: str | None = None, overwrite: bool = False) -> Path:
        """The feature file of ``source`` (extracting what is missing)."""
        path = self.path(name or source.name)
        if not overwrite and path.is_file() and not self._outdated(source, path) and self.plan(source, name) is None:
            return path  # finished: no need to call the other ranks
        return self.team.together("feature-cache.embed", source, name, overwrite)

    def _embed_together(self, team, source: TileSource, name: str | None, overwrite: bool) -> Path:
        """Every rank at once (one process alone: just this one): rank 0 plans (and removes
        what ``overwrite`` replaces), then all take their block of the file's chunks."""
        job = self.plan(source, name, overwrite, pieces=team.size) if team.is_main else None
        team.barrier()
        if not team.is_main:
            job = self.plan(source, name, pieces=team.size)
        extract_many(self.encoder, [job], team=team, num_workers=self.workers, precision=self.precision,
                     device=self.device, progress=self.progress, log=self.log)
        return self.path(name or source.name)

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


# -- a whole dataset: the `pathrobust extract` command ------------------------------------------------
EXTRACT_LOG = "extract.log"


def extract_dataset(model: Any, data: str | os.PathLike, out: str | os.PathLike = "features", *,
                    pooling: str | None = None, weights: str | None = None, batch_size: int = 64, workers: int = 2,
                    precision: str = "auto", device: str = "auto", overwrite: bool = False, slides: bool = False,
                    target_mpp: float = 0.5, tile_size: int = 224, slide_mpp: float | None = None, fmt: str = "h5",
                    trust_code: bool = False, progress: bool = True, shard: str | tuple[int, int] | None = None,
                    say=None, merge_into: str | os.PathLike | None = None) -> list[Path]:
    """Extract every tile source of ``data`` (slides, tile folders, h5s, PLISM) into
    ``<out>/<model>/<source>.h5`` — alone, as one rank of a torchrun launch, or as job-array
    shard ``shard`` (``"i/n"`` or ``"slurm"``). Returns the files written (on rank 0 / the
    process that completes the work; other ranks and unfinished shards: [])."""
    from pathrobust import shards
    from pathrobust.data.sources import open_tile_sources
    from pathrobust.dist import join, local_device, parse_shard
    from pathrobust.encoders.base import build_encoder
    from pathrobust.store import safe_name

    say = say or (lambda message: None)
    if fmt not in ("h5", "plismbench"):
        raise UserError(f"--format {fmt}: expected h5 or plismbench")
    if overwrite and (parse_shard(shard) if isinstance(shard, str) else shard):
        raise UserError("--overwrite with --shard: each shard would remove the others' work; remove the outputs "
                        "first, then start the shards")
    team = join(shard, device)
    opened: list[logging.Logger] = []
    try:
        if not team.lead:
            progress = False
        sources = open_tile_sources(Path(data), slides, target_mpp, tile_size, slide_mpp)
        dev = resolve_device(local_device(device))
        encoder = build_encoder(model, pooling=pooling, weights=weights, device=dev, trust_code=trust_code)
        precision = resolve_precision(precision, dev, encoder.spec.precision)
        out_dir = Path(out) / safe_name(encoder.name)
        if merge_into is not None and Path(merge_into).resolve() != out_dir.resolve():
            raise UserError(f"merge {merge_into}: this launch now writes {out_dir}; run the shards again")
        out_dir.mkdir(parents=True, exist_ok=True)
        log = _file_logger(out_dir / EXTRACT_LOG, team.label())
        opened.append(log)
        paths = [out_dir / f"{s.name}.h5" for s in sources]
        if team.lead:
            shards.write_launch(out_dir, {
                "command": "extract", "model": model if isinstance(model, str) else str(model), "data": str(data),
                "out": str(out), "pooling": pooling, "weights": weights, "batch_size": batch_size, "workers": workers,
                "precision": precision, "device": device, "slides": slides, "target_mpp": target_mpp,
                "tile_size": tile_size, "slide_mpp": slide_mpp, "fmt": fmt, "trust_code": trust_code})
        pieces = max(1, -(-team.size // max(1, len(sources))))
        kw = dict(batch_size=batch_size, precision=precision, pieces=pieces)
        if overwrite and team.is_main:  # one process removes; the others plan after it
            jobs = [plan_file(encoder, s, p, overwrite=True, **kw) for s, p in zip(sources, paths)]
        team.barrier()
        if not (overwrite and team.is_main):
            jobs = [plan_file(encoder, s, p, **kw) for s, p in zip(sources, paths)]
        extract_many(encoder, jobs, team=team, whole=team.kind != "shard", num_workers=workers,
                     precision=precision, device=dev, progress=progress, log=log,
                     description=f"{encoder.name} · {len(sources)} source(s)")
        if team.kind == "shard":
            identity = {k: str(encoder.provenance().get(k, "")) for k in ("spec_hash", "weights_sha256", "pooling")}
            plan = shards.plan_digest([(s.name, p.name, s) for s, p in zip(sources, paths)],
                                      {**identity, "precision": precision})
            shards.write_marker(out_dir, team.index, team.size, plan)
            log.info("shard %d/%d finished its share", team.index, team.size)
            missing = shards.check_markers(out_dir)
            if missing:
                say(f"shard {team.index}/{team.size} done; waiting for shard(s) "
                    f"{', '.join(f'{i}/{team.size}' for i in missing)}: the last one completes the extraction, or "
                    f"`pathrobust merge {out_dir}`")
                return []
            # the last shard: complete whatever is left (files whose last chunk another shard wrote)
            extract_many(encoder, jobs, whole=True, num_workers=workers, precision=precision, device=dev,
                         progress=progress, log=log)
        team.barrier()
        if not team.lead:
            return []
        written = []
        for source, path in zip(sources, paths):
            if fmt == "plismbench":
                from pathrobust.data.plism import export_h5_to_plismbench

                path = export_h5_to_plismbench(path, out_dir, source.name, source.coords)
            written.append(path)
            say(f"✓ {path}  ({len(source)} tiles, {encoder.output_dim}-d, {encoder.pooling})")
        return written
    finally:
        for log in opened:
            for handler in list(log.handlers):
                handler.close()
                log.removeHandler(handler)
        team.close()


def _file_logger(path: Path, label: str) -> logging.Logger:
    """A logger appending to ``path`` (every process of a launch appends its own lines)."""
    log = logging.getLogger(f"pathrobust.extract.{os.getpid()}.{path.resolve()}")
    log.setLevel(logging.INFO)
    for handler in list(log.handlers):
        handler.close()
        log.removeHandler(handler)
    handler = logging.FileHandler(path)
    tag = f"[{label}] " if label else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {tag}%(message)s"))
    log.addHandler(handler)
    return log
