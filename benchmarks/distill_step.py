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
    from pathrobust.distill.timing import StepTimer
    from pathrobust.distill.trainer import Distiller

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="demo")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after 1 untimed)")
    ap.add_argument("--batch", type=int, default=None, help="override optim.batch_size")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; with 1 thread, CPU time is a contention-proof measure of the work")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="cpu: process CPU time (robust on a shared machine, CPU device only); wall: elapsed time")
    ap.add_argument("--teacher-weights", default=None, help="'random' to time a teacher whose weights are not here")
    ap.add_argument("--teacher-depth", type=int, default=None, help="reduce a ViT teacher's depth (GPU memory)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    r = load_recipe(args.recipe)
    if args.batch:
        r.optim.batch_size = args.batch
    r.heads.warmup_steps = 0  # time student steps only
    if args.teacher_weights:
        r.teacher.weights = args.teacher_weights
    if args.teacher_depth:
        from pathrobust.registry import resolve_spec

        spec = resolve_spec(r.teacher.model)
        r.teacher.model = spec.replace(name=f"{spec.name}-depth{args.teacher_depth}",
                                       arch_kwargs={**spec.arch_kwargs, "depth": args.teacher_depth})
    r.data.synthetic_tiles = min(r.data.synthetic_tiles, 4 * r.optim.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        d = Distiller(r, Path(tmp), device=args.device, progress=False)
        d.timer = StepTimer(clock)
        d.objective.prepare(d.batches)  # e.g. k-means prototypes, so the timed targets are the real ones
        t0 = clock()
        batches = [d.batches[s] for s in range(args.steps + 1)]
        data_s = (clock() - t0) / len(batches)
        g, b = batches[0].globals_.shape[:2]
        t0 = clock()
        for s in range(len(batches)):
            sample_masks(r.crops.n_global * r.optim.batch_size, d.grid, np.random.default_rng([r.seed, 2, s]),
                         r.masking.sample_probability, r.masking.min_ratio, r.masking.max_ratio)
        mask_s = (clock() - t0) / len(batches)
        rows = []
        for i, batch in enumerate(batches):
            t0 = clock()
            d.train_step(batch)
            total = clock() - t0
            # the student backbone alone (forward + backward), same inputs
            x_g = batch.globals_.flatten(0, 1).to(d.device)
            x_l = batch.locals_.flatten(0, 1).to(d.device)
            if d.device.type == "cuda":
                torch.cuda.synchronize()
            t1 = clock()
            with d._autocast():
                out = d.student.tokens(x_g).float().sum() + (d.student.tokens(x_l).float().sum() if x_l.numel() else 0)
            out.backward()
            d.student.zero_grad(set_to_none=True)
            if d.device.type == "cuda":
                torch.cuda.synchronize()
            backbone = clock() - t1
            if i == 0:
                continue  # warm-up
            t = d.timer.times
            heads = max(t.student - backbone, 0.0)
            rows.append({"total": total + mask_s, "teacher": t.teacher, "backbone": min(backbone, t.student),
                         "losses_heads_masking": t.losses + heads + mask_s, "optimizer": t.optimizer})
    med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
    total = med["total"]
    print(f"recipe {r.name}: batch {r.optim.batch_size} x ({r.crops.n_global} x {r.crops.global_size}px + "
          f"{r.crops.n_local} x {r.crops.local_size}px), teacher {d.teacher.name}, student {r.student.arch} "
          f"{r.student.arch_kwargs}, device {d.device}, {torch.get_num_threads()} threads")
    print(f"step (median of {len(rows)}, {args.clock} time): {total * 1000:.0f} ms")
    for key, label in (("teacher", "teacher forward"), ("backbone", "student forward/backward"),
                       ("losses_heads_masking", "losses + heads + masking"), ("optimizer", "optimizer + EMA")):
        print(f"  {label:<26} {med[key] * 1000:8.1f} ms  {100 * med[key] / total:5.1f} %")
    other = total - sum(med[k] for k in ("teacher", "backbone", "losses_heads_masking", "optimizer"))
    print(f"  {'other (sync, copies)':<26} {other * 1000:8.1f} ms  {100 * other / total:5.1f} %")
    share = med["losses_heads_masking"] / total
    print(f"losses + heads + masking share: {share:.3f} (target <= 0.15: {'met' if share <= 0.15 else 'NOT met'})")
    if d.device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(d.device) / 2**30:.2f} GiB")
    print(f"data (crops for one step, in workers): {data_s * 1000:.0f} ms; iBOT masks: {mask_s * 1000:.1f} ms")


if __name__ == "__main__":
    main()
