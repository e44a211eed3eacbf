"""Where a distillation step spends its time (not a test).

Splits a training step of a recipe (default: the CPU demo) into teacher forward, student
backbone forward/backward, losses + heads + masking (teacher/student heads, centring,
DINO/iBOT/KoLeo, their backward share, iBOT mask sampling) and the optimiser (AdamW, EMA),
and prints the share of each. Target for the demo recipe: losses + heads + masking
<= 15 % of the step. Data loading/augmentation runs in DataLoader workers and is reported
separately.

    PYTHONPATH=. python benchmarks/distill_step.py [--recipe demo] [--steps 5] [--batch 16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    from pathrobust.distill.masking import sample_masks
    from pathrobust.distill.recipe import load_recipe
    from pathrobust.distill.trainer import Distiller

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="demo")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after 1 untimed)")
    ap.add_argument("--batch", type=int, default=None, help="override optim.batch_size")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    r = load_recipe(args.recipe)
    if args.batch:
        r.optim.batch_size = args.batch
    r.heads.warmup_steps = 0  # time student steps only
    r.data.synthetic_tiles = min(r.data.synthetic_tiles, 4 * r.optim.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        d = Distiller(r, Path(tmp), device=args.device, progress=False)
        t0 = time.perf_counter()
        batches = [d.batches[s] for s in range(args.steps + 1)]
        data_s = (time.perf_counter() - t0) / len(batches)
        g, b = batches[0].globals_.shape[:2]
        t0 = time.perf_counter()
        for s in range(len(batches)):
            sample_masks(r.crops.n_global * r.optim.batch_size, d.grid, np.random.default_rng([r.seed, 2, s]),
                         r.masking.sample_probability, r.masking.min_ratio, r.masking.max_ratio)
        mask_s = (time.perf_counter() - t0) / len(batches)
        rows = []
        for i, batch in enumerate(batches):
            t0 = time.perf_counter()
            d.train_step(batch)
            total = time.perf_counter() - t0
            # the student backbone alone (forward + backward), same inputs
            x_g = batch.globals_.flatten(0, 1).to(d.device)
            x_l = batch.locals_.flatten(0, 1).to(d.device)
            if d.device.type == "cuda":
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            with d._autocast():
                out = d.student.tokens(x_g).float().sum() + (d.student.tokens(x_l).float().sum() if x_l.numel() else 0)
            out.backward()
            d.student.zero_grad(set_to_none=True)
            if d.device.type == "cuda":
                torch.cuda.synchronize()
            backbone = time.perf_counter() - t1
            if i == 0:
                continue  # warm-up
            t = d.times
            heads = max(t.student - backbone, 0.0)
            rows.append({"total": total + mask_s, "teacher": t.teacher, "backbone": min(backbone, t.student),
                         "losses_heads_masking": t.losses + heads + mask_s, "optimizer": t.optimizer})
    med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
    total = med["total"]
    print(f"recipe {r.name}: batch {r.optim.batch_size} x ({r.crops.n_global} x {r.crops.global_size}px + "
          f"{r.crops.n_local} x {r.crops.local_size}px), teacher {d.teacher.name}, student {r.student.arch} "
          f"{r.student.arch_kwargs}, device {d.device}, {torch.get_num_threads()} threads")
    print(f"step (median of {len(rows)}): {total * 1000:.0f} ms")
    for key, label in (("teacher", "teacher forward"), ("backbone", "student forward/backward"),
                       ("losses_heads_masking", "losses + heads + masking"), ("optimizer", "optimizer + EMA")):
        print(f"  {label:<26} {med[key] * 1000:8.1f} ms  {100 * med[key] / total:5.1f} %")
    other = total - sum(med[k] for k in ("teacher", "backbone", "losses_heads_masking", "optimizer"))
    print(f"  {'other (sync, copies)':<26} {other * 1000:8.1f} ms  {100 * other / total:5.1f} %")
    share = med["losses_heads_masking"] / total
    print(f"losses + heads + masking share: {share:.3f} (target <= 0.15: {'met' if share <= 0.15 else 'NOT met'})")
    print(f"data (crops for one step, in workers): {data_s * 1000:.0f} ms; iBOT masks: {mask_s * 1000:.1f} ms")


if __name__ == "__main__":
    main()
