"""The distillation trainer: a frozen teacher encoder, a timm ViT student, DINO + iBOT +
KoLeo (or plain feature regression), one process or many through torch.distributed.

What the student learns is an objective (:mod:`pathrobust.distill.objectives`), picked once
from ``heads.mode``: it makes the teacher's targets and computes the loss. Step ``s`` of
``recipe.total_steps``:

* ``s < objective.head_steps`` (``heads.mode = "warmup"``): only the teacher's heads train,
  on the frozen teacher's tokens; the student does not move.
* afterwards: teacher forward, the objective's targets, student forward, the objective's
  loss plus KoLeo on the student's global CLS tokens, AdamW with scheduled lr / weight
  decay, gradient clipping, an EMA copy of the student (exported at the end).

Checkpoints (rank 0, atomic) hold everything a resumed run needs to continue exactly: the
student, its EMA, the objective's state (heads, centres, head optimiser), the optimiser,
the step (which fixes the data position: batches are a pure function of the step, see
:mod:`pathrobust.distill.data`) and the RNG states.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from pathrobust import atomic
from pathrobust.distill import dist as D
from pathrobust.distill.data import Batch, StepBatches, open_training_tiles
from pathrobust.distill.dist import init_distributed
from pathrobust.distill.export import export_student, save_atomic
from pathrobust.distill.losses import koleo_loss
from pathrobust.distill.models import Teacher, align_grid, build_student_backbone, patch_grid
from pathrobust.distill.objectives import OBJECTIVES, Objective
from pathrobust.distill.recipe import Recipe
from pathrobust.distill.schedules import cosine, linear_warmup, scaled_lr
from pathrobust.distill.timing import NO_TIMER, NoTimer
from pathrobust.errors import UserError

__all__ = ["Distiller", "align_grid", "build_student_backbone", "distill", "init_distributed", "patch_grid"]

CHECKPOINT_NAME = "checkpoint.pt"
HISTORY_NAME = "history.json"


def _identity(x):
    return x


class Distiller:
    """Builds everything from a recipe and runs steps; see the module docstring.

    ``timer``: a :mod:`~pathrobust.distill.timing` hook called at the phase boundaries of a
    student step (default: none)."""

    def __init__(self, recipe: Recipe, out_dir: Path, data: Path | None = None, device: str = "auto",
                 progress: bool = True, log: Callable[[str], None] | None = None, trust_code: bool = False) -> None:
        self.recipe = recipe
        self.out_dir = Path(out_dir)
        self.rank, self.world = D.rank(), D.world_size()
        self.device = self._device(device)
        self.progress = progress and self.rank == 0
        self.log = log or (lambda msg: None)
        self.timer: NoTimer = NO_TIMER
        r = recipe
        backbone = build_student_backbone(r, trust_code=trust_code).to(self.device)
        self.grid = patch_grid(backbone, r.crops.global_size)
        self.teacher = Teacher(r, self.device, self.grid, trust_code=trust_code)
        kind = OBJECTIVES[r.heads.mode]
        self.student = kind.student_class(backbone, r, self.teacher.dim).to(self.device)
        self.ema = copy.deepcopy(backbone).requires_grad_(False).eval()
        self.model: nn.Module = D.wrap_ddp(self.student, self.device)
        self.objective: Objective = kind(r, self.teacher, self.device)
        self.optimizer = self._optimizer()
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.grad_norm = 0.0
        self.source = open_training_tiles(data, r)
        self.batches = StepBatches(self.source, r, self.grid, self.rank, self.world)
        self.peak_lr = scaled_lr(r.optim.base_lr, r.optim.batch_size)

    # -- set-up ----------------------------------------------------------------------
    def _device(self, device: str) -> torch.device:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise UserError("--device cuda: no CUDA device is available")
            index = int(os.environ.get("LOCAL_RANK", dev.index or 0)) if self.world > 1 else (dev.index or 0)
            dev = torch.device("cuda", index)
            torch.cuda.set_device(dev)
        return dev

    def _optimizer(self) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for name, p in self.student.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.endswith(".bias") or "norm" in name else decay).append(p)
        o = self.recipe.optim
        return torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}],
                                 lr=o.base_lr, betas=tuple(o.betas))

    # -- schedules -------------------------------------------------------------------------
    def schedule(self, step: int) -> dict[str, float]:
        r, o = self.recipe, self.recipe.optim
        s = step - self.objective.head_steps
        return {
            "lr": cosine(s, o.steps, self.peak_lr, o.min_lr, o.lr_warmup_steps, 0.0),
            "wd": cosine(s, o.steps, o.weight_decay, o.weight_decay_end),
            "momentum": cosine(s, o.steps, o.ema_momentum, o.ema_momentum_end),
            "teacher_temp": linear_warmup(s, r.loss.teacher_temp_warmup_steps, r.loss.teacher_temp_warmup, r.loss.teacher_temp),
            "student_step": s,
        }

    # -- steps ---------------------------------------------------------------------------
    def train_step(self, batch: Batch) -> dict[str, float]:
        r, dev, timer = self.recipe, self.device, self.timer
        sched = self.schedule(batch.step)
        g, b = batch.globals_.shape[:2]
        globals_ = batch.globals_.flatten(0, 1).to(dev, non_blocking=True)
        locals_ = batch.locals_.flatten(0, 1).to(dev, non_blocking=True) if batch.locals_.shape[0] else None
        masks = batch.masks.to(dev).reshape(g * b, -1)
        index = masks.flatten().nonzero().squeeze(1)
        timer.start(dev)
        t_cls, t_patches = self.teacher(globals_)
        timer.mark("teacher")
        with torch.no_grad():
            targets = self.objective.targets(t_cls, t_patches, index, (g, b), sched["teacher_temp"])
        timer.mark("losses")
        with self._autocast():
            out = self.model(globals_, locals_, index)
        timer.mark("student")
        loss, terms = self.objective.loss(out, targets, masks, (g, b))
        if r.loss.koleo_weight > 0:
            # per global crop, over the global batch (gathered with gradients across ranks)
            cls_by_crop = out["cls"].view(g, b, -1)
            terms["koleo"] = sum(koleo_loss(D.all_gather_with_grad(cls_by_crop[i])) for i in range(g))
            loss = loss + r.loss.koleo_weight * terms["koleo"]
        timer.mark("losses")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        timer.mark("student")
        self._optimizer_step(sched)
        timer.mark("optimizer")
        row = D.mean_over_ranks({"loss": loss} | terms) | {"grad_norm": self.grad_norm}
        row |= {"lr": sched["lr"], "teacher_temp": sched["teacher_temp"], "phase": 1.0}
        return row

    def _optimizer_step(self, sched: dict[str, float]) -> None:
        r = self.recipe
        max_norm = r.optim.clip_grad if r.optim.clip_grad > 0 else float("inf")
        self.grad_norm = float(nn.utils.clip_grad_norm_(self.student.parameters(), max_norm))
        self.objective.before_optimizer_step(self.student, sched["student_step"])
        decay, no_decay = self.optimizer.param_groups
        for group in (decay, no_decay):
            group["lr"] = sched["lr"]
        decay["weight_decay"] = sched["wd"]
        self.optimizer.step()
        with torch.no_grad():
            m = sched["momentum"]
            ema_params = list(self.ema.parameters())
            student_params = list(self.student.backbone.parameters())
            torch._foreach_mul_(ema_params, m)
            torch._foreach_add_(ema_params, student_params, alpha=1 - m)

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        state = {
            "step": self.step,
            "data_position": self.step * self.recipe.optim.batch_size,
            "recipe": _recipe_key(self.recipe),
            "world_size": self.world,
            "student": self.student.state_dict(),
            "ema": self.ema.state_dict(),
            **self.objective.state_dict(),  # teacher_heads, centers, heads_optimizer
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule(self.step),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
                    "python": random.getstate()},
            "history": self.history,
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.student.load_state_dict(state["student"])
        self.ema.load_state_dict(state["ema"])
        self.objective.load_state_dict(state)
        self.optimizer.load_state_dict(state["optimizer"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        n = rng["numpy"]
        np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
        random.setstate(_as_tuple(rng["python"]))
        self.history = list(state["history"])

    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    def save_checkpoint(self) -> None:
        if self.rank == 0:
            save_atomic(self.state_dict(), self.checkpoint_path())
            atomic.write_text(self.out_dir / HISTORY_NAME, json.dumps(self.history) + "\n")
        D.barrier()

    def resume(self) -> bool:
        """Load ``out/checkpoint.pt`` if there is one; returns whether it did."""
        path = self.checkpoint_path()
        if not path.is_file():
            return False
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as exc:
            raise UserError(f"{path}: cannot read the checkpoint ({type(exc).__name__}: {exc})") from None
        if state.get("recipe") != _recipe_key(self.recipe):
            raise UserError(f"{path}: was written with another recipe or teacher; use a fresh --out or the same recipe")
        self.load_state_dict(state)
        return True

    # -- the loop ------------------------------------------------------------------------
    def run(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train until the recipe's last step (or ``stop_after`` more steps), checkpointing
        every ``optim.checkpoint_every`` steps and at the end; export the EMA student when
        finished. Returns a summary."""
        from pathrobust.progress import tile_progress

        r = self.recipe
        total = r.total_steps
        if self.step == 0:
            self.objective.prepare(self.batches)
        end = total if stop_after is None else min(total, self.step + stop_after)
        loader = torch.utils.data.DataLoader(self.batches, batch_size=None, sampler=range(self.step, end),
                                             num_workers=r.data.workers, collate_fn=_identity,
                                             pin_memory=self.device.type == "cuda")
        last: dict[str, float] = {}

        def postfix() -> str:
            keys = [k for k in ("loss", "dino", "ibot", "koleo", "cls", "patch") if k in last]
            phase = "heads warm-up " if last.get("phase") == 0.0 else ""
            return phase + " ".join(f"{k} {last[k]:.3f}" for k in keys)

        started = time.perf_counter()
        first = self.step
        with tile_progress(f"distill {r.name}", total=total, completed=self.step, unit="it",
                           enabled=self.progress, postfix=postfix) as advance:
            for batch in loader:
                if batch.step < self.objective.head_steps:
                    last = self.objective.head_step(batch)
                else:
                    last = self.train_step(batch)
                last["step"] = batch.step
                if not np.isfinite(last["loss"]):
                    raise UserError(f"{r.source}: the loss became {last['loss']} at step {batch.step}; "
                                    "lower optim.base_lr or raise the temperatures")
                self.history.append(dict(last))
                self.step = batch.step + 1
                advance(1)
                if self.step % r.optim.checkpoint_every == 0 and self.step < end:
                    self.save_checkpoint()
        elapsed = time.perf_counter() - started
        self.save_checkpoint()
        summary = {"steps_done": self.step, "total_steps": total, "finished": self.step >= total,
                   "seconds": elapsed, "it_per_s": (self.step - first) / elapsed if elapsed > 0 else 0.0}
        if self.step >= total and self.rank == 0:
            spec = export_student(self.ema, r, self.out_dir, self.teacher.name)
            summary["model_dir"] = str(self.out_dir)
            summary["spec"] = spec.name
        D.barrier()
        return summary


def _recipe_key(recipe: Recipe) -> str:
    """What must match for a checkpoint to resume this run (the recipe without its path)."""
    data = recipe.to_dict()
    data.pop("source", None)
    data["data"].pop("workers", None)  # worker count does not change the batches
    return json.dumps(data, sort_keys=True)


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def distill(recipe: Recipe, out_dir: Path, data: Path | None = None, device: str = "auto", resume: bool = False,
            stop_after: int | None = None, progress: bool = True, log: Callable[[str], None] | None = None,
            trust_code: bool = False) -> dict[str, Any]:
    """Run (or resume) a distillation; the Python API behind ``pathrobust distill``.

    ``trust_code``: let the recipe and the teacher's files name layer classes and builders
    other than torch's, timm's and pathrobust's own (see :mod:`pathrobust.trust`).
    Raises a UserError when ``out_dir`` already holds a checkpoint and ``resume`` is False."""
    created = init_distributed(device)
    try:
        out_dir = Path(out_dir)
        if not resume and (out_dir / CHECKPOINT_NAME).exists():
            raise UserError(f"--out {out_dir}: holds a checkpoint already; pass --resume to continue it or choose another --out")
        trainer = Distiller(recipe, out_dir, data=data, device=device, progress=progress, log=log,
                            trust_code=trust_code)
        if resume and trainer.resume():
            (log or (lambda m: None))(f"resumed from step {trainer.step} of {recipe.total_steps}")
        summary = trainer.run(stop_after=stop_after)
        summary["world_size"] = trainer.world
        summary["teacher"] = trainer.teacher.name
        summary["last"] = trainer.history[-1] if trainer.history else {}
        return summary
    finally:
        if created:
            D.destroy()
