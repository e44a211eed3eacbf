"""PathoROB k-NN robustness index against its floor, and peak memory, measured in one run.

The floor is the bare GEMM every exact k-NN over n rows must do: all n × n similarities,
``x @ x.T`` (n·n·d multiply-adds), computed here in the same row blocks as the search and
written into one reused block. The measured call is the whole robustness index,
:func:`pathrobust.metrics.pathorob.robustness` (normalisation, blocked GEMM, own-slide
exclusion, top-k, float64 decision of near-ties at the k-th boundary, SO/OS counting).
Timing is A-B-A (floor, RI, floor) and the ratio uses the mean of the two floors, so a
machine that slows down during the run does not flatter the ratio.

Prints the ratio (target <= 1.5) and the peak memory next to the n × n matrix the search
never builds (CUDA: max allocated; CPU: peak RSS growth).

Usage: python benchmarks/pathorob_knn.py [--n 50000] [--d 1536] [--k 61] [--device cpu]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import pandas as pd
import torch

from pathrobust.metrics.knn import default_chunk
from pathrobust.metrics.pathorob import robustness


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def gemm_floor(x: np.ndarray, device: torch.device, chunk: int) -> float:
    """Seconds for all n × n similarities of the unit rows in ``chunk``-row blocks."""
    xt = torch.nn.functional.normalize(torch.from_numpy(x).to(device), dim=1)
    out = torch.empty(chunk, len(x), device=device)
    _sync(device)
    t0 = time.perf_counter()
    for r0 in range(0, len(x), chunk):
        r1 = min(len(x), r0 + chunk)
        torch.matmul(xt[r0:r1], xt.T, out=out[:r1 - r0])
    _sync(device)
    return time.perf_counter() - t0


def make_data(n: int, d: int, per_slide: int, seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    """float32 embeddings with class, centre and slide effects; 2 classes x 4 centres."""
    rng = np.random.default_rng(seed)
    slide = np.arange(n) // per_slide
    n_slides = slide.max() + 1
    slide_class, slide_centre = rng.integers(0, 2, n_slides), rng.integers(0, 4, n_slides)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x += 0.3 * rng.standard_normal((2, d), dtype=np.float32)[slide_class[slide]]
    x += 0.3 * rng.standard_normal((4, d), dtype=np.float32)[slide_centre[slide]]
    x += 0.3 * rng.standard_normal((n_slides, d), dtype=np.float32)[slide]
    table = pd.DataFrame({"row": np.arange(n), "slide_id": slide.astype(str),
                          "biological_class": slide_class[slide].astype(str),
                          "medical_center": slide_centre[slide].astype(str)})
    return x, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000, help="embeddings (rows)")
    ap.add_argument("--d", type=int, default=1536, help="embedding dimension")
    ap.add_argument("--k", type=int, default=61, help="neighbours (TCGA's default k)")
    ap.add_argument("--per-slide", type=int, default=30, help="patches per slide (the excluded group)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--chunk", type=int, default=None, help="query rows per block (default: the search's)")
    args = ap.parse_args()
    device = torch.device(args.device)
    x, table = make_data(args.n, args.d, args.per_slide)
    chunk = args.chunk or default_chunk(args.n, 4, device)
    print(f"n={args.n} d={args.d} k={args.k} device={device} chunk={chunk} threads={torch.get_num_threads()}")
    gemm_floor(x[: min(len(x), 2 * chunk)], device, chunk)  # warm-up (BLAS/cuBLAS init)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    floor_a = gemm_floor(x, device, chunk)
    if device.type == "cuda":
        gemm_peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    result = robustness(x, table, "plain", args.k, device=str(device), chunk=args.chunk)
    _sync(device)
    t_ri = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024)
    floor_b = gemm_floor(x, device, chunk)
    floor = (floor_a + floor_b) / 2
    flops = 2 * args.n * args.n * args.d
    nn_bytes = args.n * args.n * 4
    print(f"GEMM floor: {floor_a:.2f} s, {floor_b:.2f} s ({flops / floor / 1e9:.0f} GFLOP/s)")
    print(f"k-NN RI:    {t_ri:.2f} s  (RI = {result.ri:.4f} at k = {result.k})")
    print(f"ratio RI / GEMM floor: {t_ri / floor:.2f}  (target <= 1.5)")
    label = "CUDA max allocated" if device.type == "cuda" else "peak RSS growth"
    extra = f"; GEMM floor alone {gemm_peak / 2**20:.0f} MiB" if device.type == "cuda" else ""
    print(f"{label}: {peak / 2**20:.0f} MiB{extra}; an n x n float32 matrix would be {nn_bytes / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
