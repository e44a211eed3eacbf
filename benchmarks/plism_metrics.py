"""PLISM pair-evaluation throughput against its floor, and peak memory, measured in one run.

The floor of one pair is one n×n×d GEMM (the cross block A·Bᵀ); the within-slide blocks are
computed once per slide and amortised over the slide's pairs. This prints:

* pairs/s of :func:`pathrobust.metrics.plism.pair_metrics` and of the bare GEMM, and their
  ratio (1.0 = at the floor);
* pairs/s of the reference algorithm (2n×2n matrix + argpartition, as plismbench) for scale;
* peak memory (CUDA: max allocated; CPU: peak RSS growth) next to the 2n×2n matrix it avoids.

Usage: python benchmarks/plism_metrics.py [--n 2048] [--d 512] [--slides 6] [--device cpu]
"""

from __future__ import annotations

import argparse
import itertools
import resource
import time

import numpy as np
import torch

from pathrobust.metrics import plism as pm


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reference_pair(a: np.ndarray, b: np.ndarray, kmax: int = 10) -> None:
    m = np.concatenate([a, b])
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    cos = (m @ m.T) / (norms * norms.T)
    np.argpartition(-cos, range(1, kmax + 1), axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048, help="tiles per slide")
    ap.add_argument("--d", type=int, default=512, help="feature dim")
    ap.add_argument("--slides", type=int, default=6)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="fp32", choices=list(pm.DTYPES))
    ap.add_argument("--chunk", type=int, default=pm.DEFAULT_CHUNK)
    ap.add_argument("--reference-pairs", type=int, default=2, help="pairs timed with the 2n×2n reference (0: skip)")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = pm.DTYPES[args.precision]
    rng = np.random.default_rng(0)
    base = rng.normal(size=(args.n, args.d)).astype(np.float32)
    raw = [base + rng.normal(size=base.shape).astype(np.float32) for _ in range(args.slides)]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    slides = [pm.normalize_rows(x, dtype, device) for x in raw]
    t0 = time.perf_counter()
    tops = [pm.slide_topk(x, 10, args.chunk) for x in slides]
    _sync(device)
    per_slide = time.perf_counter() - t0
    pairs = list(itertools.combinations(range(args.slides), 2))
    pm.pair_metrics(slides[0], slides[1], tops[0], tops[1], chunk=args.chunk)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for i, j in pairs:
        pm.pair_metrics(slides[i], slides[j], tops[i], tops[j], chunk=args.chunk)
    _sync(device)
    pair_time = (time.perf_counter() - t0) / len(pairs)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else \
        (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    (slides[0] @ slides[1].T)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for i, j in pairs:
        _ = slides[i] @ slides[j].T
    _sync(device)
    gemm_time = (time.perf_counter() - t0) / len(pairs)
    ref_time = float("nan")
    if args.reference_pairs:
        t0 = time.perf_counter()
        for i, j in pairs[: args.reference_pairs]:
            _reference_pair(raw[i], raw[j])
        ref_time = (time.perf_counter() - t0) / min(args.reference_pairs, len(pairs))
    gflop = 2 * args.n * args.n * args.d / 1e9
    dense_bytes = (2 * args.n) ** 2 * 4
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"{args.precision}, n={args.n} tiles, d={args.d}, {args.slides} slides, {len(pairs)} pairs")
    print(f"per-slide top-k (once per slide, amortised): {per_slide / args.slides * 1e3:.1f} ms/slide")
    print(f"pair evaluation : {1 / pair_time:10.2f} pairs/s  ({pair_time * 1e3:.1f} ms/pair)")
    print(f"GEMM floor      : {1 / gemm_time:10.2f} pairs/s  ({gemm_time * 1e3:.1f} ms/pair, {gflop / gemm_time:.1f} GFLOP/s)")
    print(f"throughput / floor = {gemm_time / pair_time:.3f}")
    if args.reference_pairs:
        print(f"reference 2n x 2n + argpartition: {1 / ref_time:.2f} pairs/s (speed-up {ref_time / pair_time:.1f}x)")
    print(f"peak memory: {peak / 2**20:.1f} MiB (features of {args.slides} slides "
          f"{sum(x.numel() * x.element_size() for x in slides) / 2**20:.1f} MiB; one 2n x 2n float32 matrix "
          f"{dense_bytes / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
