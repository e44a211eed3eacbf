"""Extraction pipeline throughput ÷ bare model throughput, measured in one run.

The pipeline (PNG decode in DataLoader workers or inline, uint8 batches, normalisation on
device, pooling, chunked atomic writes under lock files, h5 assembly) should keep the model
busy: a ratio near 1.0 means tile I/O and bookkeeping are hidden behind compute.

``--nproc N`` runs it under torchrun (gloo, one thread per rank): the bare rate is the sum
over ranks of a forward-only loop run by all ranks at once, the pipeline rate is all tiles
of several tile folders extracted by the ranks together (each takes its block of the
chunks), divided by the wall time of the slowest rank. Several ``--repeats`` alternate the
two and print each ratio and their median (the machine may be shared). With ``--workers 0``
the CPU-time ratio is printed too (tiles per CPU-second of the ranks, pipeline ÷ bare): on a
shared machine it is steadier than wall time, which other processes' load moves.

As the ``pathrobust`` command does, each process keeps freed memory in its heap
(:mod:`pathrobust.cpu_memory`), so CPU forward passes do not page-fault every batch.

    python benchmarks/extract_throughput.py --model efficientnet-lite0-imagenet --tiles 256 --workers 2
    python benchmarks/extract_throughput.py --nproc 2 --workers 0 --tiles 192 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def write_tiles(root: Path, n: int, size: int, folders: int) -> list[Path]:
    """``n`` real H&E tiles as PNGs in ``folders`` folders (several output files)."""
    from pathrobust.data.he import sample_he_tiles

    tiles = sample_he_tiles(n, size=size, seed=0)
    dirs = []
    for k in range(folders):
        d = root / f"source{k}"
        d.mkdir(parents=True, exist_ok=True)
        dirs.append(d)
    for i, tile in enumerate(tiles):
        Image.fromarray(tile).save(dirs[i % folders] / f"tile_{i:05d}.png")
    return dirs


def single(args) -> None:
    from pathrobust.cpu_memory import keep_freed_memory
    from pathrobust.data.tiles import FolderTiles
    from pathrobust.devices import resolve_device
    from pathrobust.encoders.base import build_encoder
    from pathrobust.extract import extract_features

    keep_freed_memory()
    encoder = build_encoder(args.model, weights=args.weights)
    dev = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        (folder,) = write_tiles(Path(tmp), args.tiles, encoder.input_size, 1)
        source = FolderTiles(folder)
        encoder = encoder.to(dev)
        tiles = np.stack([source.read(i) for i in range(args.batch_size)])
        batch = torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous().to(dev)
        ratios = []
        for r in range(args.repeats):
            bare = bare_rate(encoder, batch, max(1, args.tiles // args.batch_size), dev)
            t0 = time.perf_counter()
            extract_features(encoder, source, Path(tmp) / f"out{r}.h5", batch_size=args.batch_size,
                             num_workers=args.workers, device=dev, progress=False)
            pipeline = len(source) / (time.perf_counter() - t0)
            ratios.append(pipeline / bare)
            print(f"repeat {r}: bare model {bare:.1f} tiles/s   pipeline {pipeline:.1f} tiles/s   "
                  f"ratio {pipeline / bare:.3f}")
    print(f"model={args.model} device={dev} tiles={args.tiles} batch={args.batch_size} workers={args.workers}")
    print(f"pipeline / bare = {statistics.median(ratios):.3f} (median of {len(ratios)})")


def bare_rate(encoder, batch: torch.Tensor, n_batches: int, dev: torch.device) -> float:
    with torch.inference_mode():
        encoder(batch)  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n_batches):
            encoder(batch)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return n_batches * len(batch) / (time.perf_counter() - t0)


def rank_main(args) -> None:
    """One torchrun rank: bare loop and pipeline, timed between barriers."""
    from pathrobust.cpu_memory import keep_freed_memory
    from pathrobust.data.tiles import FolderTiles
    from pathrobust.devices import resolve_device
    from pathrobust.dist import join, local_device
    from pathrobust.encoders.base import build_encoder
    from pathrobust.extract import extract_many, plan_file

    keep_freed_memory()
    torch.set_num_threads(1)
    team = join(None, args.device)
    dev = resolve_device(local_device(args.device))
    encoder = build_encoder(args.model, weights=args.weights).to(dev)
    sources = [FolderTiles(d) for d in sorted(Path(args.data).iterdir()) if d.is_dir()]
    total = sum(len(s) for s in sources)
    tiles = np.stack([sources[0].read(i) for i in range(args.batch_size)])
    batch = torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous().to(dev)
    n_batches = max(1, total // team.size // args.batch_size)
    ratios, cpu_ratios = [], []
    for r in range(-args.warmup, args.repeats):
        team.barrier()
        c0 = time.process_time()
        rate = bare_rate(encoder, batch, n_batches, dev)
        cpu = time.process_time() - c0
        bare, bare_cpu_s = team.all_sum([rate, cpu])
        out = Path(args.data).parent / f"out{r + args.warmup}"
        team.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        jobs = [plan_file(encoder, s, out / f"{s.name}.h5", batch_size=args.batch_size) for s in sources]
        extract_many(encoder, jobs, team=team, num_workers=args.workers, device=dev, progress=False)
        cpu = time.process_time() - c0
        team.barrier()
        pipeline = total / (time.perf_counter() - t0)
        (pipe_cpu_s,) = team.all_sum([cpu])
        # tiles per CPU-second (the bare loop's CPU time includes its untimed warm-up batch)
        cpu_ratio = (total / pipe_cpu_s) / ((n_batches + 1) * args.batch_size * team.size / bare_cpu_s)
        if r >= 0:
            ratios.append(pipeline / bare)
            cpu_ratios.append(cpu_ratio)
        if team.is_main:
            cpu_text = f"   CPU-time ratio {cpu_ratio:.3f}" if args.workers == 0 else ""
            print(f"{'warm-up' if r < 0 else f'repeat {r}'}: bare model {bare:.1f} tiles/s   pipeline {pipeline:.1f} tiles/s   "
                  f"ratio {pipeline / bare:.3f}{cpu_text}", flush=True)
    if team.is_main:
        print(f"model={args.model} device={dev} ranks={team.size} tiles={total} batch={args.batch_size} "
              f"workers={args.workers} threads/rank=1")
        print(f"pipeline / bare = {statistics.median(ratios):.3f} (median of {len(ratios)}; each: "
              f"{', '.join(f'{x:.3f}' for x in ratios)})")
        if args.workers == 0:
            print(f"CPU-time pipeline / bare = {statistics.median(cpu_ratios):.3f} (median; each: "
                  f"{', '.join(f'{x:.3f}' for x in cpu_ratios)})")
    team.close()


def launch(args) -> None:
    """Write the tiles once, then run this script under torchrun with ``--nproc`` ranks."""
    from pathrobust.encoders.base import build_encoder

    size = build_encoder(args.model, weights=args.weights).input_size
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "tiles"
        write_tiles(data, args.tiles, size, args.folders)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(args.port), str(Path(__file__).resolve()),
               "--rank-worker", "--data", str(data), "--model", args.model, "--batch-size", str(args.batch_size),
               "--workers", str(args.workers), "--device", args.device, "--repeats", str(args.repeats),
               "--warmup", str(args.warmup)]
        if args.weights:
            cmd += ["--weights", args.weights]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PATHROBUST_NO_PROGRESS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
        sys.exit(subprocess.call(cmd, env=env))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet-lite0-imagenet")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--tiles", type=int, default=256, help="tiles in all (over all ranks)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (per rank)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1, help="--nproc: rounds run first and not counted")
    ap.add_argument("--nproc", type=int, default=1, help="ranks under torchrun (gloo on CPU, 1 thread each)")
    ap.add_argument("--folders", type=int, default=4, help="--nproc: tile folders (output files)")
    ap.add_argument("--port", type=int, default=29561)
    ap.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_worker:
        rank_main(args)
    elif args.nproc > 1:
        launch(args)
    else:
        single(args)


if __name__ == "__main__":
    main()
