"""Batched ABMIL runs vs the straightforward one-run-at-a-time loop (eva's slide protocol).

Times ``--runs`` ABMIL runs (eva: 20) once with ``train_abmil_runs`` (all runs in one set of
kernels) and once with ``train_abmil_reference`` called per run (eva's ``nn.Module``,
autograd, ``torch.optim.AdamW``, ``ConstantLR``), same seeds, same threads, and prints batched
time / one-at-a-time time (target <= 0.33).

Shapes (``--shape``):

* ``demo`` (default): the slide suite on the synthetic slides: 12 training and 4 validation
  bags of 8-12 tiles, 1280-dim features (the demo's teacher), the full protocol (<= 100 epochs,
  early stopping with patience 20), bags that separate moderately so runs stop at different
  epochs;
* ``camelyon16-small``: eva's shape: 216 training / 54 validation bags padded to 1,000 tiles,
  ``--dim`` features (384 by default), ``--epochs`` epochs each (early stopping off): both sides
  do the same work per epoch, so the ratio is the per-epoch one.

Each of ``--repeat`` pairs times half the one-at-a-time runs, the batched call, then the other
half (A-B-A: a slow spell of a shared machine weighs on both sides); the median of the
per-pair ratios is the result.

    python benchmarks/mil_runs.py [--shape demo] [--runs 20] [--repeat 3] [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np
import torch

from pathrobust.probes.abmil import ABMILConfig, train_abmil_reference, train_abmil_runs


def _timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def make_bags(n: int, dim: int, lengths: tuple[int, int], signal: float, rng: np.random.Generator):
    """``n`` bags of ``lengths`` tiles; in positive bags a third of the tiles carry ``signal``
    along a random direction. Returns (list of (N_i, dim) float32, labels)."""
    direction = rng.normal(size=dim).astype(np.float32)
    direction /= np.linalg.norm(direction)
    bags, labels = [], []
    for i in range(n):
        y = i % 2
        length = int(rng.integers(lengths[0], lengths[1] + 1))
        x = rng.normal(size=(length, dim)).astype(np.float32)
        if y:
            x[: max(1, length // 3)] += signal * direction
        bags.append(x)
        labels.append(y)
    return bags, np.array(labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=("demo", "camelyon16-small"), default="demo")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--dim", type=int, default=None, help="feature dim (demo 1280, camelyon16-small 384)")
    ap.add_argument("--epochs", type=int, default=2, help="camelyon16-small: epochs per run")
    ap.add_argument("--repeat", type=int, default=3, help="timed pairs; the median ratio is reported")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads, both sides")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    if args.shape == "demo":
        dim = args.dim or 1280
        train, ty = make_bags(12, dim, (8, 12), 1.5, rng)
        val, vy = make_bags(4, dim, (8, 12), 1.5, rng)
        cfg = ABMILConfig(n_runs=args.runs)
    else:
        dim = args.dim or 384
        train, ty = make_bags(216, dim, (600, 1000), 0.5, rng)
        val, vy = make_bags(54, dim, (600, 1000), 0.5, rng)
        train = [np.pad(b, ((0, 1000 - len(b)), (0, 0)), constant_values=-np.inf) for b in train]  # eva pads to N
        val = [np.pad(b, ((0, 1000 - len(b)), (0, 0)), constant_values=-np.inf) for b in val]
        train, val = np.stack(train), np.stack(val)
        cfg = ABMILConfig(n_runs=args.runs, max_epochs=args.epochs, patience=10**9)
    print(f"{args.shape}: {args.runs} runs, {len(ty)} train / {len(vy)} val bags, dim {dim}, "
          f"{args.threads} threads")
    warm = dataclasses.replace(cfg, max_epochs=1, n_runs=2)  # first calls pay one-off library start-up
    train_abmil_runs(train, ty, val, vy, 2, warm)
    train_abmil_reference(train, ty, val, vy, 2, warm)

    def one_at_a_time(runs):
        return [train_abmil_reference(train, ty, val, vy, 2, cfg, run=r)[2] for r in runs]  # best epochs

    ratios = []
    for pair in range(1, args.repeat + 1):
        first = (args.runs + 1) // 2
        epochs_a, t_before = _timed(lambda: one_at_a_time(range(first)))
        batched, t_batched = _timed(lambda: train_abmil_runs(train, ty, val, vy, 2, cfg))
        epochs_b, t_after = _timed(lambda: one_at_a_time(range(first, args.runs)))
        t_loop = t_before + t_after
        same = list(batched.best_epoch) == epochs_a + epochs_b
        ratios.append(t_batched / t_loop)
        print(f"pair {pair}: batched {t_batched:7.2f} s   one at a time {t_loop:7.2f} s   ratio {ratios[-1]:.3f}   "
              f"same best epochs: {same}   epochs trained {int(batched.epochs.sum())}")
    print(f"ratio batched / one-at-a-time (median of {len(ratios)}): {statistics.median(ratios):.3f}  (target <= 0.33)")


if __name__ == "__main__":
    main()
