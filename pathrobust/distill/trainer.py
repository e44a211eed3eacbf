"""The distillation trainer: a frozen teacher encoder, a timm ViT student, DINO + iBOT +
KoLeo (or plain feature regression), one process or many through torch.distributed.

Step ``s`` of ``recipe.total_steps``:

* ``s < heads.warmup_steps`` (``heads.mode = "warmup"``): the teacher's DINO/iBOT heads are
  trained on the frozen teacher's tokens (swapped-view prediction against Sinkhorn-Knopp
  targets of the same heads, as in SwAV); the student does not move.
* afterwards: the teacher's centred head outputs are the targets of the student's heads
  (DINO on CLS of all crops, iBOT at masked positions of the global crops); KoLeo spreads
  the student's global CLS tokens; AdamW with scheduled lr / weight decay, gradient
  clipping, an EMA copy of the student (exported at the end).

Checkpoints (rank 0, atomic) hold everything a resumed run needs to continue exactly: the
student, its EMA, heads and centres, the optimiser, the step (which fixes the data
position: batches are a pure function of the step, see :mod:`pathrobust.distill.data`) and
the RNG states.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pathrobust.distill import dist as D
from pathrobust.distill.data import Batch, StepBatches, open_training_tiles
from pathrobust.distill.export import export_student, save_atomic, student_arch_kwargs
from pathrobust.distill.heads import DINOHead, PrototypeHead, kmeans
from pathrobust.distill.losses import EMACenter, cosine_regression_loss, dino_loss, ibot_loss, koleo_loss, sinkhorn_knopp
from pathrobust.distill.recipe import Recipe
from pathrobust.distill.schedules import cosine, linear_warmup, scaled_lr
from pathrobust.errors import UserError

CHECKPOINT_NAME = "checkpoint.pt"
HISTORY_NAME = "history.json"


# -- models ------------------------------------------------------------------------------
def build_student_backbone(recipe: Recipe) -> nn.Module:
    """The bare timm ViT (``num_classes=0``), seeded by ``recipe.seed``."""
    import timm

    from pathrobust.encoders.base import resolve_layer_kwargs

    torch.manual_seed(recipe.seed)
    kwargs = resolve_layer_kwargs(student_arch_kwargs(recipe))
    try:
        model = timm.create_model(recipe.student.arch, pretrained=False, num_classes=0, **kwargs)
    except Exception as exc:  # timm raises RuntimeError/TypeError for unknown names/kwargs
        raise UserError(f"{recipe.source}: student.arch '{recipe.student.arch}' with {recipe.student.arch_kwargs}: {exc}") from None
    if not hasattr(model, "patch_embed") or not hasattr(model, "num_prefix_tokens"):
        raise UserError(f"{recipe.source}: student.arch '{recipe.student.arch}' is not a timm ViT")
    return model


def patch_grid(backbone: nn.Module, size: int) -> tuple[int, int]:
    p = backbone.patch_embed.patch_size
    return size // p[0], size // p[1]


class Student(nn.Module):
    """Student backbone + its heads (DINO/iBOT) or projections (regression).

    ``forward(globals_, locals_, mask_index)`` with ``globals_`` ``(G*b, 3, S, S)`` and
    ``locals_`` ``(L*b, 3, s, s)`` in [0, 1], ``mask_index`` flat indices into the
    ``(G*b) * N`` global patch tokens, returns a dict: ``cls`` ``(G*b, D)`` pre-head global
    CLS tokens, and ``dino_global`` ``(G*b, K)``, ``dino_local`` ``(L*b, K)``, ``ibot``
    ``(M, K')`` (or ``cls_proj`` ``(G*b, Dt)``, ``patch_proj`` ``(G*b, N, Dt)``)."""

    def __init__(self, backbone: nn.Module, recipe: Recipe, teacher_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.mode = recipe.heads.mode
        self.register_buffer("mean", torch.tensor(recipe.student.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(recipe.student.std).view(1, 3, 1, 1), persistent=False)
        dim = backbone.num_features
        h = recipe.heads
        torch.manual_seed(recipe.seed + 1)
        if self.mode == "regression":
            self.cls_proj = nn.Linear(dim, teacher_dim)
            self.patch_proj = nn.Linear(dim, teacher_dim)
        else:
            self.dino_head = DINOHead(dim, h.dino_prototypes, h.hidden_dim, h.bottleneck_dim)
            self.ibot_head = DINOHead(dim, h.ibot_prototypes, h.hidden_dim, h.bottleneck_dim)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))

    def forward(self, globals_: torch.Tensor, locals_: torch.Tensor | None, mask_index: torch.Tensor) -> dict[str, torch.Tensor]:
        p = self.backbone.num_prefix_tokens
        tok = self.tokens(globals_)
        cls, patches = tok[:, 0], tok[:, p:]
        out = {"cls": cls}
        if self.mode == "regression":
            out["cls_proj"] = self.cls_proj(cls)
            out["patch_proj"] = self.patch_proj(patches)
            return out
        out["dino_global"] = self.dino_head(cls)
        if locals_ is not None and locals_.shape[0] > 0:
            out["dino_local"] = self.dino_head(self.tokens(locals_)[:, 0])
        flat = patches.flatten(0, 1)
        # a rank without masked positions still runs the head (weight 0) so DDP sees every parameter used
        out["ibot"] = self.ibot_head(flat[mask_index] if mask_index.numel() else flat[:1])
        return out


class TeacherHeads(nn.Module):
    """The teacher's DINO and iBOT heads: trainable DINOHeads (``warmup``) or fixed prototypes."""

    def __init__(self, dino: nn.Module, ibot: nn.Module) -> None:
        super().__init__()
        self.dino = dino
        self.ibot = ibot

    def forward(self, cls: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dino(cls), self.ibot(patches)


def align_grid(patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Teacher patch tokens ``(B, h*w, D)`` (square grid) -> ``(B, gh*gw, D)`` on the student's
    grid by bilinear interpolation (identity when the grids agree)."""
    b, n, d = patches.shape
    side = int(round(n ** 0.5))
    if side * side != n:
        raise UserError(f"teacher patch tokens ({n}) do not form a square grid")
    if (side, side) == tuple(grid):
        return patches
    x = patches.transpose(1, 2).reshape(b, d, side, side).float()
    x = F.interpolate(x, size=grid, mode="bilinear", align_corners=False, antialias=side > grid[0])
    return x.flatten(2).transpose(1, 2).to(patches.dtype)


class Teacher:
    """A frozen registered encoder returning CLS ``(B, Dt)`` and grid-aligned patch tokens
    ``(B, gh*gw, Dt)`` in float32."""

    def __init__(self, recipe: Recipe, device: torch.device, grid: tuple[int, int]) -> None:
        from pathrobust.encoders.base import build_encoder

        t = recipe.teacher
        self.encoder = build_encoder(t.model, weights=t.weights, device=device)
        self.name = self.encoder.name
        self.grid = grid
        self.input_size = t.input_size or recipe.crops.global_size
        precision = t.precision if t.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        if self.dtype != torch.float32:
            self.encoder.to(self.dtype)
        with torch.no_grad():
            probe = self(torch.zeros(1, 3, recipe.crops.global_size, recipe.crops.global_size, device=device))
        self.dim = probe[0].shape[-1]
        if probe[1].shape[1] == 0:
            raise UserError(f"--teacher {self.name}: has no patch tokens to distil (iBOT/regression need a token grid)")

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=True)
        tok = self.encoder.forward_tokens(x.to(self.dtype))
        p = self.encoder.num_prefix_tokens
        return tok[:, 0].float(), align_grid(tok[:, p:], self.grid).float()


# -- the trainer -------------------------------------------------------------------------
@dataclass
class StepTimes:
    """Seconds spent per phase in the last step (for benchmarks/distill_step.py)."""

    teacher: float = 0.0
    student: float = 0.0  # student forward + backward (heads included in autograd)
    losses: float = 0.0  # targets (heads, centring), losses, masks gathering
    optimizer: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _identity(x):
    return x


class Distiller:
    """Builds everything from a recipe and runs steps; see the module docstring."""

    def __init__(self, recipe: Recipe, out_dir: Path, data: Path | None = None, device: str = "auto",
                 progress: bool = True, log: Callable[[str], None] | None = None) -> None:
        self.recipe = recipe
        self.out_dir = Path(out_dir)
        self.rank, self.world = D.rank(), D.world_size()
        self.device = self._device(device)
        self.progress = progress and self.rank == 0
        self.log = log or (lambda msg: None)
        r = recipe
        backbone = build_student_backbone(r).to(self.device)
        self.grid = patch_grid(backbone, r.crops.global_size)
        self.teacher = Teacher(r, self.device, self.grid)
        self.student = Student(backbone, r, self.teacher.dim).to(self.device)
        self.ema = copy.deepcopy(backbone).requires_grad_(False).eval()
        self.model: nn.Module = self.student
        if self.world > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.teacher_heads = self._teacher_heads()
        self.heads_model: nn.Module | None = None
        self.heads_optimizer = None
        if r.heads.mode == "warmup":
            self.heads_model = self.teacher_heads
            if self.world > 1:
                self.heads_model = nn.parallel.DistributedDataParallel(
                    self.teacher_heads, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self.heads_optimizer = torch.optim.AdamW(self.teacher_heads.parameters(), lr=r.heads.warmup_lr,
                                                     weight_decay=0.0)
        if self.teacher_heads is not None:
            self.teacher_heads.requires_grad_(r.heads.mode == "warmup")
        k_dino, k_ibot = r.heads.dino_prototypes, r.heads.ibot_prototypes
        self.dino_center = EMACenter(k_dino, r.loss.center_momentum).to(self.device)
        self.ibot_center = EMACenter(k_ibot, r.loss.center_momentum).to(self.device)
        self.optimizer = self._optimizer()
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.times = StepTimes()
        self.grad_norm = 0.0
        self.clock = time.perf_counter  # benchmarks may use time.process_time
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

    def _teacher_heads(self) -> TeacherHeads | None:
        r, dt = self.recipe, self.teacher.dim
        if r.heads.mode == "regression":
            return None
        if r.heads.mode == "warmup":
            torch.manual_seed(r.seed + 2)
            h = r.heads
            return TeacherHeads(DINOHead(dt, h.dino_prototypes, h.hidden_dim, h.bottleneck_dim),
                                DINOHead(dt, h.ibot_prototypes, h.hidden_dim, h.bottleneck_dim)).to(self.device)
        # prototypes: filled by _fit_prototypes (or loaded from a checkpoint)
        scale = r.heads.prototype_scale
        return TeacherHeads(PrototypeHead(torch.zeros(r.heads.dino_prototypes, dt), scale),
                            PrototypeHead(torch.zeros(r.heads.ibot_prototypes, dt), scale)).to(self.device)

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

    @torch.no_grad()
    def _fit_prototypes(self) -> None:
        """heads.mode = prototypes: spherical k-means of teacher CLS and patch tokens over the
        first ``prototype_batches`` steps' global crops (gathered from all ranks)."""
        r = self.recipe
        cls_all, patch_all = [], []
        for step in range(r.heads.prototype_batches):
            batch = self.batches[step]
            cls, patches = self.teacher(batch.globals_.flatten(0, 1).to(self.device))
            cls_all.append(cls)
            patch_all.append(patches.flatten(0, 1))
        cls, patches = _gather(torch.cat(cls_all)), _gather(torch.cat(patch_all))
        for name, feats, k in (("dino", cls, r.heads.dino_prototypes), ("ibot", patches, r.heads.ibot_prototypes)):
            if feats.shape[0] < k:
                raise UserError(f"{r.source}: 'heads.{name}_prototypes' = {k} exceeds the {feats.shape[0]} teacher "
                                f"vectors of heads.prototype_batches = {r.heads.prototype_batches} batches")
            centroids = kmeans(feats, k, seed=r.seed)
            getattr(self.teacher_heads, name).prototypes.copy_(centroids)

    # -- schedules -------------------------------------------------------------------------
    def schedule(self, step: int) -> dict[str, float]:
        r, o = self.recipe, self.recipe.optim
        s = step - (r.heads.warmup_steps if r.heads.mode == "warmup" else 0)
        return {
            "lr": cosine(s, o.steps, self.peak_lr, o.min_lr, o.lr_warmup_steps, 0.0),
            "wd": cosine(s, o.steps, o.weight_decay, o.weight_decay_end),
            "momentum": cosine(s, o.steps, o.ema_momentum, o.ema_momentum_end),
            "teacher_temp": linear_warmup(s, r.loss.teacher_temp_warmup_steps, r.loss.teacher_temp_warmup, r.loss.teacher_temp),
            "student_step": s,
        }

    # -- targets -------------------------------------------------------------------------
    def _center(self, logits: torch.Tensor, temp: float, center: EMACenter, n_samples=None) -> torch.Tensor:
        if self.recipe.loss.centering == "sinkhorn":
            return sinkhorn_knopp(logits, temp, self.recipe.loss.sinkhorn_iterations, n_samples)
        return center.targets(logits, temp)

    # -- steps ---------------------------------------------------------------------------
    def warmup_step(self, batch: Batch) -> dict[str, float]:
        """Train the teacher heads on frozen teacher tokens (swapped prediction, SwAV-style)."""
        r, dev = self.recipe, self.device
        g, b = batch.globals_.shape[:2]
        cls, patches = self.teacher(batch.globals_.flatten(0, 1).to(dev))
        masks = batch.masks.to(dev).reshape(g * b, -1)
        index = masks.flatten().nonzero().squeeze(1)
        selected = patches.flatten(0, 1)[index] if index.numel() else patches.flatten(0, 1)[:1]
        dino_logits, ibot_logits = self.heads_model(cls, selected)
        temp = r.loss.teacher_temp
        with torch.no_grad():
            targets = sinkhorn_knopp(dino_logits.detach(), temp, r.loss.sinkhorn_iterations).view(g, b, -1)
            n_tok = D.all_reduce_sum(torch.tensor(float(index.numel()), device=dev))
            ibot_targets = sinkhorn_knopp(ibot_logits.detach(), temp, r.loss.sinkhorn_iterations, n_tok)
        # dino_loss pairs crop i with the other crops' assignments only: swapped prediction
        dino = dino_loss(dino_logits.view(g, b, -1), None, targets, r.loss.student_temp)
        if index.numel():
            ibot = ibot_loss(ibot_logits, ibot_targets, masks, r.loss.student_temp)
        else:
            ibot = ibot_logits.sum() * 0.0
        loss = dino + ibot
        self.heads_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.heads_optimizer.step()
        return _mean_over_ranks({"loss": loss, "dino": dino, "ibot": ibot}) | {"phase": 0.0}

    def train_step(self, batch: Batch) -> dict[str, float]:
        r, dev = self.recipe, self.device
        sched = self.schedule(batch.step)
        g, b = batch.globals_.shape[:2]
        globals_ = batch.globals_.flatten(0, 1).to(dev, non_blocking=True)
        locals_ = batch.locals_.flatten(0, 1).to(dev, non_blocking=True) if batch.locals_.shape[0] else None
        masks = batch.masks.to(dev).reshape(g * b, -1)
        index = masks.flatten().nonzero().squeeze(1)
        _sync(dev); t0 = self.clock()
        t_cls, t_patches = self.teacher(globals_)
        _sync(dev); t1 = self.clock()
        terms: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            if r.heads.mode != "regression":
                t_dino, t_ibot = self.teacher_heads(t_cls, t_patches.flatten(0, 1)[index])
                temp = sched["teacher_temp"]
                dino_targets = self._center(t_dino, temp, self.dino_center).view(g, b, -1)
                n_tok = D.all_reduce_sum(torch.tensor(float(index.numel()), device=dev))
                ibot_targets = self._center(t_ibot, temp, self.ibot_center, n_tok)
        _sync(dev); t2 = self.clock()
        with self._autocast():
            out = self.model(globals_, locals_ if r.heads.mode != "regression" else None, index)
        _sync(dev); t3 = self.clock()
        if r.heads.mode == "regression":
            terms["cls"] = cosine_regression_loss(out["cls_proj"], t_cls)
            terms["patch"] = cosine_regression_loss(out["patch_proj"], t_patches)
            loss = r.loss.regression_weight * (terms["cls"] + terms["patch"])
        else:
            local = out.get("dino_local")
            terms["dino"] = dino_loss(out["dino_global"].view(g, b, -1),
                                      local.view(-1, b, local.shape[-1]) if local is not None else None,
                                      dino_targets, r.loss.student_temp)
            if index.numel():
                terms["ibot"] = ibot_loss(out["ibot"], ibot_targets, masks, r.loss.student_temp)
            else:
                terms["ibot"] = out["ibot"].sum() * 0.0
            loss = r.loss.dino_weight * terms["dino"] + r.loss.ibot_weight * terms["ibot"]
        if r.loss.koleo_weight > 0:
            # per global crop, over the global batch (gathered with gradients across ranks)
            cls_by_crop = out["cls"].view(g, b, -1)
            terms["koleo"] = sum(koleo_loss(D.all_gather_with_grad(cls_by_crop[i])) for i in range(g))
            loss = loss + r.loss.koleo_weight * terms["koleo"]
        _sync(dev); t4 = self.clock()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _sync(dev); t5 = self.clock()
        self._optimizer_step(sched)
        _sync(dev); t6 = self.clock()
        self.times = StepTimes(teacher=t1 - t0, losses=(t2 - t1) + (t4 - t3), student=(t3 - t2) + (t5 - t4),
                               optimizer=t6 - t5)
        row = _mean_over_ranks({"loss": loss} | terms) | {"grad_norm": self.grad_norm}
        row |= {"lr": sched["lr"], "teacher_temp": sched["teacher_temp"], "phase": 1.0}
        return row

    def _optimizer_step(self, sched: dict[str, float]) -> None:
        r = self.recipe
        max_norm = r.optim.clip_grad if r.optim.clip_grad > 0 else float("inf")
        self.grad_norm = float(nn.utils.clip_grad_norm_(self.student.parameters(), max_norm))
        if r.heads.mode != "regression" and sched["student_step"] < r.heads.freeze_last_layer_steps:
            for head in (self.student.dino_head, self.student.ibot_head):
                for p in head.last_layer_parameters():
                    p.grad = None
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
            "teacher_heads": self.teacher_heads.state_dict() if self.teacher_heads is not None else {},
            "centers": {"dino": self.dino_center.state_dict(), "ibot": self.ibot_center.state_dict()},
            "optimizer": self.optimizer.state_dict(),
            "heads_optimizer": self.heads_optimizer.state_dict() if self.heads_optimizer else {},
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
        if self.teacher_heads is not None:
            self.teacher_heads.load_state_dict(state["teacher_heads"])
        self.dino_center.load_state_dict(state["centers"]["dino"])
        self.ibot_center.load_state_dict(state["centers"]["ibot"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.heads_optimizer is not None and state["heads_optimizer"]:
            self.heads_optimizer.load_state_dict(state["heads_optimizer"])
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
            tmp = self.out_dir / (HISTORY_NAME + ".tmp")
            tmp.write_text(json.dumps(self.history) + "\n")
            os.replace(tmp, self.out_dir / HISTORY_NAME)
        if D.is_distributed():
            dist.barrier()

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
        if self.step == 0 and r.heads.mode == "prototypes":
            self._fit_prototypes()
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
                if r.heads.mode == "warmup" and batch.step < r.heads.warmup_steps:
                    last = self.warmup_step(batch)
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
        if D.is_distributed():
            dist.barrier()
        return summary


def _mean_over_ranks(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """Loss terms for the log: each rank's value is its shard's share, so the mean over
    ranks is the loss of the global batch (what a 1-process run reports)."""
    values = torch.stack([v.detach().float().reshape(()) for v in terms.values()])
    values = D.all_reduce_sum(values) / D.world_size()
    return dict(zip(terms, values.tolist()))


def _gather(x: torch.Tensor) -> torch.Tensor:
    """All-gather rows of different counts (no gradient) -> concatenated in rank order."""
    if not D.is_distributed():
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(n) for _ in range(D.world_size())]
    dist.all_gather(counts, n)
    m = int(max(c.item() for c in counts))
    padded = torch.zeros(m, *x.shape[1:], device=x.device, dtype=x.dtype)
    padded[: x.shape[0]] = x
    out = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(c.item())] for o, c in zip(out, counts)])


def _recipe_key(recipe: Recipe) -> str:
    """What must match for a checkpoint to resume this run (the recipe without its path)."""
    data = recipe.to_dict()
    data.pop("source", None)
    data["data"].pop("workers", None)  # worker count does not change the batches
    return json.dumps(data, sort_keys=True)


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# -- process group ---------------------------------------------------------------------
def init_distributed(device: str = "auto") -> bool:
    """Join the torchrun process group when launched by torchrun (``WORLD_SIZE`` > 1):
    nccl on GPU, gloo on CPU. Returns whether this call created the group."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or D.is_distributed():
        return False
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


def distill(recipe: Recipe, out_dir: Path, data: Path | None = None, device: str = "auto", resume: bool = False,
            stop_after: int | None = None, progress: bool = True, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) a distillation; the Python API behind ``pathrobust distill``.

    Raises a UserError when ``out_dir`` already holds a checkpoint and ``resume`` is False."""
    created = init_distributed(device)
    try:
        out_dir = Path(out_dir)
        if not resume and (out_dir / CHECKPOINT_NAME).exists():
            raise UserError(f"--out {out_dir}: holds a checkpoint already; pass --resume to continue it or choose another --out")
        trainer = Distiller(recipe, out_dir, data=data, device=device, progress=progress, log=log)
        if resume and trainer.resume():
            (log or (lambda m: None))(f"resumed from step {trainer.step} of {recipe.total_steps}")
        summary = trainer.run(stop_after=stop_after)
        summary["world_size"] = trainer.world
        summary["teacher"] = trainer.teacher.name
        summary["last"] = trainer.history[-1] if trainer.history else {}
        return summary
    finally:
        if created:
            dist.destroy_process_group()
