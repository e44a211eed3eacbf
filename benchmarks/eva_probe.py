"""Batched EVA probes vs the straightforward one-run-at-a-time loop.

Times 5 runs x 12,500 steps (batch 256, validation every epoch, early stopping disabled so
every run trains all its steps) on 10,000 x 768 cached embeddings (9 classes, 2,000
validation embeddings), once with ``train_linear_probes`` (all runs batched) and once with
``train_probe_reference`` called per run (nn.Linear + autograd + torch.optim.AdamW), both
single-threaded, and prints batched time / straightforward time (target <= 0.33).

    python benchmarks/eva_probe.py [--steps 12500] [--runs 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from pathrobust.suites.eva_probe import ProbeConfig, train_linear_probes, train_probe_reference


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12_500)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=768)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    classes = 9
    centres = rng.normal(size=(classes, args.dim)).astype(np.float32) * 0.2
    y = rng.integers(0, classes, args.n)
    x = centres[y] + rng.normal(size=(args.n, args.dim)).astype(np.float32)
    vy = rng.integers(0, classes, 2000)
    vx = centres[vy] + rng.normal(size=(2000, args.dim)).astype(np.float32)
    cfg = ProbeConfig(max_steps=args.steps, n_runs=args.runs, patience=10**9)

    t0 = time.perf_counter()
    batched = train_linear_probes(x, y, vx, vy, classes, cfg)
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = [train_probe_reference(x, y, vx, vy, classes, cfg, run=r)[1] for r in range(args.runs)]
    t_loop = time.perf_counter() - t0
    same = np.allclose(scores, batched.val_balanced_accuracy, atol=1e-3)
    print(f"{args.runs} runs x {args.steps} steps on {args.n} x {args.dim} embeddings (1 thread)")
    print(f"batched:         {t_batched:8.2f} s")
    print(f"one at a time:   {t_loop:8.2f} s")
    print(f"best val balanced accuracy agrees: {same}")
    print(f"ratio batched / one-at-a-time: {t_batched / t_loop:.3f}  (target <= 0.33)")


if __name__ == "__main__":
    main()
