"""One short check of pathrobust on a GPU machine (under 8 minutes on an H100/H200).

Prints:

1. extraction throughput (tiles/s) of a ViT-B/14 (h0-mini's architecture) and a ViT-g/14
   (H-optimus-0's), random weights, bf16 autocast: the whole pipeline (tiles read in
   DataLoader workers from an h5 or PNG files, uint8 pinned batches, side-stream copies,
   chunked atomic writes) against the bare forward pass on a batch already on the GPU;
2. PLISM pair metrics on CUDA at the leaderboard's size, 91 slides x 8,139 tiles x 1,536
   dims (H-optimus-0's width), timed on a subset of the 4,095 pairs and 91 slides and
   projected, against the GEMM floor (one n x n x d float32 GEMM per pair and per slide);
3. one distillation step of ``distill/h0-mini.toml``'s shape (ViT-g/14 teacher, ViT-B/14
   SwiGLU student, 2 x 224 + 8 x 98 crops, 65,536 prototypes, bf16 autocast) at a per-GPU
   batch (``--distill-batch``), with its time and peak GPU memory.

``--cpu-smoke`` runs the same code at tiny sizes on the CPU (fp32), so that it is tested to
start; its numbers mean nothing.

    python benchmarks/gpu_check.py              # on the GPU machine
    python benchmarks/gpu_check.py --cpu-smoke  # anywhere
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pathrobust.data.tiles import TileSource  # noqa: E402


class RepeatedTiles(TileSource):
    """``n`` tiles cycling through ``m`` real ones stored in an h5 (read per tile, in the
    DataLoader workers) or as PNG files (decoded per tile)."""

    def __init__(self, folder: Path, m: int, n: int, kind: str) -> None:
        self.folder, self.m, self.n, self.kind = Path(folder), m, n, kind
        self.name = f"repeated-{kind}"
        self.coords = np.stack([np.arange(n), np.zeros(n)], 1).astype(np.int64)
        self.tile_ids = None
        self._file = None

    def __len__(self) -> int:
        return self.n

    def __getstate__(self):
        return {**self.__dict__, "_file": None}

    def read(self, index: int) -> np.ndarray:
        i = index % self.m
        if self.kind == "png":
            from pathrobust.data.tiles import read_image

            return read_image(self.folder / f"tile_{i:05d}.png")
        if self._file is None:
            import h5py

            self._file = h5py.File(self.folder / "tiles.h5", "r")
        return self._file["img"][i]


def write_tiles(folder: Path, m: int, size: int, kind: str) -> None:
    from PIL import Image

    from pathrobust.data.he import sample_he_tiles

    tiles = sample_he_tiles(m, size=size, seed=0)
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "png":
        for i, t in enumerate(tiles):
            Image.fromarray(t).save(folder / f"tile_{i:05d}.png")
    else:
        import h5py

        with h5py.File(folder / "tiles.h5", "w") as f:
            f["img"] = tiles


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def encoder_for(name: str, dev: torch.device, smoke: bool):
    """The registry's architecture of ``name`` with random weights (tiny in the smoke run)."""
    from pathrobust.encoders.base import build_encoder
    from pathrobust.registry import get_spec

    spec = get_spec(name)
    if smoke:
        dim = 96  # SwiGLU (h0-mini) needs an even hidden width: 96 x 5.33334 -> 512
        spec = spec.replace(name=f"{name}-smoke", arch_kwargs={**spec.arch_kwargs, "img_size": 56, "embed_dim": dim,
                                                                "depth": 1, "num_heads": 2},
                            input_size=56, resize_size=None, poolings={"cls": dim, "cls+mean": 2 * dim, "mean": dim},
                            params=None)
    if dev.type == "cuda":  # build straight on the GPU: a ViT-g initialised on the CPU costs tens of seconds
        try:
            with torch.device(dev):
                return build_encoder(spec, weights="random", device=dev)
        except Exception as exc:  # noqa: BLE001 - then the slow way
            print(f"(building {name} on the GPU failed: {type(exc).__name__}: {exc}; building on the CPU)")
    return build_encoder(spec, weights="random", device=dev)


def check_extraction(args, dev: torch.device, precision: str) -> None:
    from pathrobust.devices import autocast
    from pathrobust.extract import extract_features

    print(f"\n== 1. extraction, {precision}, tiles read by {args.workers} DataLoader workers from {args.source} ==")
    plan = [("ViT-B/14 (h0-mini arch)", "h0-mini", args.tiles_b, args.batch_b),
            ("ViT-g/14 (H-optimus-0 arch)", "h-optimus-0", args.tiles_g, args.batch_g)]
    with tempfile.TemporaryDirectory() as tmp:
        for label, name, n, batch_size in plan:
            encoder = encoder_for(name, dev, args.cpu_smoke)
            size = encoder.input_size
            folder = Path(tmp) / f"tiles{size}"
            if not folder.exists():
                write_tiles(folder, args.unique_tiles, size, args.source)
            source = RepeatedTiles(folder, args.unique_tiles, n, args.source)
            batch = torch.from_numpy(np.stack([source.read(i) for i in range(batch_size)])).permute(0, 3, 1, 2)
            batch = batch.contiguous().to(dev)
            with torch.inference_mode(), autocast(precision, dev):
                for _ in range(2):
                    encoder(batch)
                sync(dev)
                steps = max(2, n // batch_size)
                t0 = time.perf_counter()
                for _ in range(steps):
                    encoder(batch)
                sync(dev)
                bare = steps * batch_size / (time.perf_counter() - t0)
            out = Path(tmp) / f"{name}.h5"
            warm = RepeatedTiles(folder, args.unique_tiles, 2 * batch_size, args.source)
            extract_features(encoder, warm, Path(tmp) / f"{name}-warm.h5", batch_size=batch_size, num_workers=args.workers,
                             precision=precision, device=dev, progress=False)  # cudnn/allocator warm-up
            t0 = time.perf_counter()
            extract_features(encoder, source, out, batch_size=batch_size, num_workers=args.workers,
                             precision=precision, device=dev, progress=False)
            pipeline = n / (time.perf_counter() - t0)
            print(f"{label:<30} batch {batch_size:4d}: bare forward {bare:10.1f} tiles/s   pipeline "
                  f"{pipeline:10.1f} tiles/s   pipeline/bare {pipeline / bare:.3f}   ({n} tiles)")
            del encoder, batch
            if dev.type == "cuda":
                torch.cuda.empty_cache()


def check_plism(args, dev: torch.device) -> None:
    from pathrobust.metrics import plism as pm

    s, n, d = args.plism_slides, args.plism_tiles, args.plism_dim
    n_pairs = s * (s - 1) // 2
    topk = (1, 3, 5, 10)
    print(f"\n== 2. PLISM pair metrics, fp32, {s} slides x {n} tiles x {d} dims, {n_pairs} pairs ==")
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference definition is float32
    g = torch.Generator(device=dev).manual_seed(0)
    rank = max(4, d // 16)  # low intrinsic dimension: retrieval neither trivial nor hopeless
    basis = torch.randn(rank, d, device=dev, generator=g)
    content = torch.randn(n, rank, device=dev, generator=g)

    def slide(i: int) -> torch.Tensor:
        gi = torch.Generator(device=dev).manual_seed(1000 + i)
        shift = 0.3 * torch.randn(1, rank, device=dev, generator=gi)
        x = (content + shift) @ basis + 0.5 * torch.randn(n, d, device=dev, generator=gi)
        return pm.normalize_rows(x, torch.float32, dev)

    topk_kwargs = {"indices": True} if "indices" in inspect.signature(pm.slide_topk).parameters else {}
    measured = min(s, args.plism_measured_slides)
    xs = [slide(i) for i in range(measured)]
    sync(dev)
    t0 = time.perf_counter()
    tops = [pm.slide_topk(x, max(topk), **topk_kwargs) for x in xs]
    sync(dev)
    per_slide = (time.perf_counter() - t0) / measured

    partners = min(args.plism_partners, measured - 1)
    pairs = list(itertools.combinations(range(measured), 2))[: args.plism_pairs]
    pm.pair_metrics_batch(xs[0], torch.stack(xs[1:2]), tops[0], _stack_tops(tops[1:2]), topk)  # warm-up
    sync(dev)
    t0 = time.perf_counter()
    done = 0
    for a, group in itertools.groupby(pairs, key=lambda p: p[0]):
        bs = [b for _, b in group]
        for i in range(0, len(bs), partners):
            chunk = bs[i:i + partners]
            pm.pair_metrics_batch(xs[a], torch.stack([xs[b] for b in chunk]), tops[a],
                                  _stack_tops([tops[b] for b in chunk]), topk)
            done += len(chunk)
    sync(dev)
    per_pair = (time.perf_counter() - t0) / done

    a, b = xs[0], xs[1]
    a @ b.T
    sync(dev)
    reps = 5
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b.T
    sync(dev)
    gemm = (time.perf_counter() - t0) / reps
    projected = s * per_slide + n_pairs * per_pair
    floor = (s + n_pairs) * gemm
    tflops = 2 * n * n * d / gemm / 1e12
    print(f"within-slide top-k {per_slide * 1e3:8.1f} ms/slide ({measured} slides timed); pairs "
          f"{per_pair * 1e3:8.1f} ms/pair ({done} pairs timed, {partners} partners per call)")
    print(f"GEMM {n}x{n}x{d} fp32: {gemm * 1e3:.2f} ms ({tflops:.1f} TFLOP/s)")
    print(f"projected: {projected:8.1f} s for {s} slides + {n_pairs} pairs; GEMM floor {floor:8.1f} s; "
          f"metrics/floor {projected / floor:.2f}")
    del xs, tops
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _stack_tops(tops):
    first = tops[0]
    if torch.is_tensor(first):
        return torch.stack(tops)
    return type(first)(*(torch.stack([getattr(t, f) for t in tops]) for f in first._fields))


def check_distill(args, dev: torch.device) -> None:
    from pathrobust.distill.recipe import load_recipe
    from pathrobust.distill.trainer import Distiller

    r = load_recipe("demo" if args.cpu_smoke else "h0-mini")
    r.optim.batch_size = args.distill_batch
    r.heads.warmup_steps = 0  # time a student step (the head warm-up is another, cheaper step)
    r.teacher.weights = "random"
    r.data.synthetic_tiles = min(r.data.synthetic_tiles, 4 * args.distill_batch)
    r.data.workers = 0
    if args.cpu_smoke:  # the CPU demo recipe, smaller still: k-means prototypes from two batches
        r.heads.prototype_batches, r.heads.dino_prototypes, r.heads.ibot_prototypes = 2, 8, 8
    print(f"\n== 3. one distillation step, recipe {r.name} ({'fp32 CPU' if dev.type == 'cpu' else 'bf16 autocast'}),"
          f" batch {args.distill_batch} x ({r.crops.n_global} x {r.crops.global_size} px + {r.crops.n_local} x "
          f"{r.crops.local_size} px) ==")
    with tempfile.TemporaryDirectory() as tmp:
        d = Distiller(r, Path(tmp), device=str(dev), progress=False)
        d.objective.prepare(d.batches)
        timed = 1 if args.cpu_smoke else 2
        batches = [d.batches[s] for s in range(timed + (0 if args.cpu_smoke else 1))]
        if not args.cpu_smoke:
            d.train_step(batches.pop(0))  # warm-up (kernels, allocator)
            sync(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        times = []
        for batch in batches:
            t0 = time.perf_counter()
            d.train_step(batch)
            sync(dev)
            times.append(time.perf_counter() - t0)
        step = min(times)
        params = sum(p.numel() for p in d.student.parameters()) / 1e6
        print(f"teacher {d.teacher.name}, student {params:.1f} M parameters with heads: step {step * 1e3:.0f} ms "
              f"({args.distill_batch / step:.1f} images/s)")
        if dev.type == "cuda":
            peak = torch.cuda.max_memory_allocated(dev) / 2**30
            total = torch.cuda.get_device_properties(dev).total_memory / 2**30
            print(f"peak GPU memory {peak:.1f} GiB of {total:.0f} GiB at batch {args.distill_batch}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (tests that it starts)")
    ap.add_argument("--only", choices=("extract", "plism", "distill"), action="append", help="run only these parts")
    ap.add_argument("--source", choices=("h5", "png"), default="h5", help="where the workers read the tiles")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: 12 on GPU, 0 smoke)")
    ap.add_argument("--unique-tiles", type=int, default=512)
    ap.add_argument("--tiles-b", type=int, default=16384)
    ap.add_argument("--batch-b", type=int, default=512)
    ap.add_argument("--tiles-g", type=int, default=4096)
    ap.add_argument("--batch-g", type=int, default=256)
    ap.add_argument("--plism-slides", type=int, default=91)
    ap.add_argument("--plism-tiles", type=int, default=8139)
    ap.add_argument("--plism-dim", type=int, default=1536)
    ap.add_argument("--plism-measured-slides", type=int, default=12, help="slides built and timed (projected to all)")
    ap.add_argument("--plism-pairs", type=int, default=48, help="pairs timed (projected to all)")
    ap.add_argument("--plism-partners", type=int, default=4, help="partner slides per batched call")
    ap.add_argument("--distill-batch", type=int, default=32, help="images per GPU in the distillation step")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        dev, precision = torch.device("cpu"), "fp32"
        for key, value in dict(unique_tiles=8, tiles_b=24, batch_b=8, tiles_g=16, batch_g=8, plism_slides=5,
                               plism_tiles=48, plism_dim=32, plism_measured_slides=4, plism_pairs=4,
                               plism_partners=2, distill_batch=4).items():
            setattr(args, key, value)
        args.workers = 0 if args.workers is None else args.workers
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --cpu-smoke for the tiny CPU version")
        dev, precision = torch.device("cuda", 0), "bf16"
        args.workers = min(12, os.cpu_count() or 1) if args.workers is None else args.workers
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (smoke: numbers mean nothing)"
    print(f"pathrobust gpu_check on {name}; torch {torch.__version__}")
    started = time.perf_counter()
    parts = args.only or ["extract", "plism", "distill"]
    if "extract" in parts:
        check_extraction(args, dev, precision)
    if "plism" in parts:
        check_plism(args, dev)
    if "distill" in parts:
        check_distill(args, dev)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
