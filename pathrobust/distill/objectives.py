"""What the student learns from the teacher, one objective per ``heads.mode``.

An objective makes the teacher's targets and computes the student's loss; it owns the heads
on both sides and their state (teacher heads, centres, a head optimiser). The trainer picks
one from :data:`OBJECTIVES` once and never asks the mode again.

* :class:`RegressionObjective` (``regression``): the student's CLS and patch tokens,
  linearly projected, regress the teacher's tokens by cosine distance.
* :class:`DinoIbotObjective`: the teacher's head outputs, centred (Sinkhorn-Knopp or an EMA
  centre), are the targets of the student's DINO head (CLS of all crops) and iBOT head
  (masked positions of the global crops). Its teacher heads come in two variants:

  - :class:`WarmupDinoIbotObjective` (``warmup``): trainable DINO heads on the frozen
    teacher, trained alone for ``heads.warmup_steps`` steps first (swapped-view prediction
    against Sinkhorn-Knopp targets of the same heads, as in SwAV);
  - :class:`PrototypeDinoIbotObjective` (``prototypes``): fixed prototypes, the spherical
    k-means centroids of the teacher's tokens over the first ``heads.prototype_batches``
    batches.

Each objective's :attr:`~Objective.student_class` is the :class:`Student` with its heads.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from pathrobust.distill import dist as D
from pathrobust.distill.data import Batch, StepBatches
from pathrobust.distill.heads import DINOHead, PrototypeHead, kmeans
from pathrobust.distill.losses import EMACenter, cosine_regression_loss, dino_loss, ibot_loss, sinkhorn_knopp
from pathrobust.distill.models import Student, Teacher, TeacherHeads
from pathrobust.distill.recipe import Recipe
from pathrobust.errors import UserError

Tensors = dict[str, torch.Tensor]


# -- students ------------------------------------------------------------------------------
class RegressionStudent(Student):
    """Projections of the CLS token ``cls_proj`` ``(G*b, Dt)`` and of the patch tokens
    ``patch_proj`` ``(G*b, N, Dt)`` onto the teacher's width. Local crops are not used."""

    def __init__(self, backbone: nn.Module, recipe: Recipe, teacher_dim: int) -> None:
        super().__init__(backbone, recipe)
        dim = backbone.num_features
        self.cls_proj = nn.Linear(dim, teacher_dim)
        self.patch_proj = nn.Linear(dim, teacher_dim)

    def forward(self, globals_: torch.Tensor, locals_: torch.Tensor | None, mask_index: torch.Tensor) -> Tensors:
        tok = self.tokens(globals_)
        cls, patches = tok[:, 0], tok[:, self.backbone.num_prefix_tokens:]
        return {"cls": cls, "cls_proj": self.cls_proj(cls), "patch_proj": self.patch_proj(patches)}


class DinoIbotStudent(Student):
    """DINO head logits of the global crops ``dino_global`` ``(G*b, K)`` and local crops
    ``dino_local`` ``(L*b, K)``, iBOT head logits at the masked positions ``ibot`` ``(M, K')``."""

    def __init__(self, backbone: nn.Module, recipe: Recipe, teacher_dim: int) -> None:
        super().__init__(backbone, recipe)
        dim, h = backbone.num_features, recipe.heads
        self.dino_head = DINOHead(dim, h.dino_prototypes, h.hidden_dim, h.bottleneck_dim)
        self.ibot_head = DINOHead(dim, h.ibot_prototypes, h.hidden_dim, h.bottleneck_dim)

    def forward(self, globals_: torch.Tensor, locals_: torch.Tensor | None, mask_index: torch.Tensor) -> Tensors:
        tok = self.tokens(globals_)
        cls, patches = tok[:, 0], tok[:, self.backbone.num_prefix_tokens:]
        out = {"cls": cls, "dino_global": self.dino_head(cls)}
        if locals_ is not None and locals_.shape[0] > 0:
            out["dino_local"] = self.dino_head(self.tokens(locals_)[:, 0])
        flat = patches.flatten(0, 1)
        # a rank without masked positions still runs the head (weight 0) so DDP sees every parameter used
        out["ibot"] = self.ibot_head(flat[mask_index] if mask_index.numel() else flat[:1])
        return out


# -- objectives ----------------------------------------------------------------------------
class Objective:
    """Teacher targets and the student's loss of one ``heads.mode`` (see the module doc).

    A step: ``targets(...)`` (no gradient) from the teacher's tokens, the student's forward,
    ``loss(...)``, backward, ``before_optimizer_step(...)``, the optimiser."""

    student_class: ClassVar[type[Student]]
    head_steps: int = 0  # steps that train only the teacher heads, before the student moves

    def __init__(self, recipe: Recipe, teacher: Teacher, device: torch.device) -> None:
        self.recipe = recipe
        self.teacher = teacher
        self.device = device

    def prepare(self, batches: StepBatches) -> None:
        """Once, before the first step of a fresh run."""

    def head_step(self, batch: Batch) -> dict[str, float]:
        """One of the first ``head_steps`` steps (teacher heads only); returns the log row."""
        raise NotImplementedError

    def targets(self, t_cls: torch.Tensor, t_patches: torch.Tensor, index: torch.Tensor,
                geometry: tuple[int, int], teacher_temp: float) -> Tensors:
        """Teacher CLS ``(G*b, Dt)``, grid-aligned patch tokens ``(G*b, N, Dt)``, the flat
        masked ``index`` and ``(G, b)`` -> the tensors :meth:`loss` compares the student with."""
        raise NotImplementedError

    def loss(self, out: Tensors, targets: Tensors, masks: torch.Tensor,
             geometry: tuple[int, int]) -> tuple[torch.Tensor, Tensors]:
        """The student's outputs against the targets -> (weighted loss, its named terms)."""
        raise NotImplementedError

    def before_optimizer_step(self, student: Student, student_step: int) -> None:
        """After gradient clipping, before the optimiser (e.g. freeze a layer's gradients)."""

    def state_dict(self) -> dict[str, Any]:
        return {"teacher_heads": {}, "centers": {}, "heads_optimizer": {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class RegressionObjective(Objective):
    """Cosine regression of the teacher's CLS and patch tokens (no heads on the teacher)."""

    student_class = RegressionStudent

    def targets(self, t_cls, t_patches, index, geometry, teacher_temp) -> Tensors:
        return {"cls": t_cls, "patch": t_patches}

    def loss(self, out, targets, masks, geometry):
        terms = {"cls": cosine_regression_loss(out["cls_proj"], targets["cls"]),
                 "patch": cosine_regression_loss(out["patch_proj"], targets["patch"])}
        return self.recipe.loss.regression_weight * (terms["cls"] + terms["patch"]), terms


class DinoIbotObjective(Objective):
    """DINO on CLS tokens + iBOT on masked patch tokens against centred teacher head outputs.

    Subclasses provide the teacher heads (:meth:`make_teacher_heads`)."""

    student_class = DinoIbotStudent

    def __init__(self, recipe: Recipe, teacher: Teacher, device: torch.device) -> None:
        super().__init__(recipe, teacher, device)
        h = recipe.heads
        self.teacher_heads = self.make_teacher_heads(teacher.dim).to(device)
        self.teacher_heads.requires_grad_(False)
        self.dino_center = EMACenter(h.dino_prototypes, recipe.loss.center_momentum).to(device)
        self.ibot_center = EMACenter(h.ibot_prototypes, recipe.loss.center_momentum).to(device)
        self._center = self._sinkhorn if recipe.loss.centering == "sinkhorn" else self._ema

    def make_teacher_heads(self, teacher_dim: int) -> TeacherHeads:
        raise NotImplementedError

    def _sinkhorn(self, logits: torch.Tensor, temp: float, center: EMACenter, n_samples=None) -> torch.Tensor:
        return sinkhorn_knopp(logits, temp, self.recipe.loss.sinkhorn_iterations, n_samples)

    @staticmethod
    def _ema(logits: torch.Tensor, temp: float, center: EMACenter, n_samples=None) -> torch.Tensor:
        return center.targets(logits, temp)

    def targets(self, t_cls, t_patches, index, geometry, teacher_temp) -> Tensors:
        g, b = geometry
        t_dino, t_ibot = self.teacher_heads(t_cls, t_patches.flatten(0, 1)[index])
        dino = self._center(t_dino, teacher_temp, self.dino_center).view(g, b, -1)
        n_tok = D.all_reduce_sum(torch.tensor(float(index.numel()), device=self.device))
        return {"dino": dino, "ibot": self._center(t_ibot, teacher_temp, self.ibot_center, n_tok)}

    def loss(self, out, targets, masks, geometry):
        g, b = geometry
        lo = self.recipe.loss
        local = out.get("dino_local")
        terms = {"dino": dino_loss(out["dino_global"].view(g, b, -1),
                                   local.view(-1, b, local.shape[-1]) if local is not None else None,
                                   targets["dino"], lo.student_temp)}
        if masks.any():
            terms["ibot"] = ibot_loss(out["ibot"], targets["ibot"], masks, lo.student_temp)
        else:
            terms["ibot"] = out["ibot"].sum() * 0.0
        return lo.dino_weight * terms["dino"] + lo.ibot_weight * terms["ibot"], terms

    def before_optimizer_step(self, student: DinoIbotStudent, student_step: int) -> None:
        if student_step < self.recipe.heads.freeze_last_layer_steps:
            for head in (student.dino_head, student.ibot_head):
                for p in head.last_layer_parameters():
                    p.grad = None

    def state_dict(self) -> dict[str, Any]:
        return {"teacher_heads": self.teacher_heads.state_dict(), "heads_optimizer": {},
                "centers": {"dino": self.dino_center.state_dict(), "ibot": self.ibot_center.state_dict()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher_heads.load_state_dict(state["teacher_heads"])
        self.dino_center.load_state_dict(state["centers"]["dino"])
        self.ibot_center.load_state_dict(state["centers"]["ibot"])


class WarmupDinoIbotObjective(DinoIbotObjective):
    """Trainable teacher heads (DINOHeads on the teacher's width), trained alone for the
    first ``heads.warmup_steps`` steps, frozen afterwards."""

    def __init__(self, recipe: Recipe, teacher: Teacher, device: torch.device) -> None:
        super().__init__(recipe, teacher, device)
        self.head_steps = recipe.heads.warmup_steps
        self.teacher_heads.requires_grad_(True)
        self.heads_model = D.wrap_ddp(self.teacher_heads, device)
        self.heads_optimizer = torch.optim.AdamW(self.teacher_heads.parameters(), lr=recipe.heads.warmup_lr,
                                                 weight_decay=0.0)

    def make_teacher_heads(self, teacher_dim: int) -> TeacherHeads:
        h = self.recipe.heads
        torch.manual_seed(self.recipe.seed + 2)
        return TeacherHeads(DINOHead(teacher_dim, h.dino_prototypes, h.hidden_dim, h.bottleneck_dim),
                            DINOHead(teacher_dim, h.ibot_prototypes, h.hidden_dim, h.bottleneck_dim))

    def head_step(self, batch: Batch) -> dict[str, float]:
        """Train the teacher heads on frozen teacher tokens (swapped prediction, SwAV-style)."""
        lo = self.recipe.loss
        g, b = batch.globals_.shape[:2]
        cls, patches = self.teacher(batch.globals_.flatten(0, 1).to(self.device))
        masks = batch.masks.to(self.device).reshape(g * b, -1)
        index = masks.flatten().nonzero().squeeze(1)
        selected = patches.flatten(0, 1)[index] if index.numel() else patches.flatten(0, 1)[:1]
        dino_logits, ibot_logits = self.heads_model(cls, selected)
        with torch.no_grad():
            targets = sinkhorn_knopp(dino_logits.detach(), lo.teacher_temp, lo.sinkhorn_iterations).view(g, b, -1)
            n_tok = D.all_reduce_sum(torch.tensor(float(index.numel()), device=self.device))
            ibot_targets = sinkhorn_knopp(ibot_logits.detach(), lo.teacher_temp, lo.sinkhorn_iterations, n_tok)
        # dino_loss pairs crop i with the other crops' assignments only: swapped prediction
        dino = dino_loss(dino_logits.view(g, b, -1), None, targets, lo.student_temp)
        if index.numel():
            ibot = ibot_loss(ibot_logits, ibot_targets, masks, lo.student_temp)
        else:
            ibot = ibot_logits.sum() * 0.0
        loss = dino + ibot
        self.heads_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.heads_optimizer.step()
        return D.mean_over_ranks({"loss": loss, "dino": dino, "ibot": ibot}) | {"phase": 0.0}

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"heads_optimizer": self.heads_optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state["heads_optimizer"]:
            self.heads_optimizer.load_state_dict(state["heads_optimizer"])


class PrototypeDinoIbotObjective(DinoIbotObjective):
    """Fixed teacher heads: k-means prototypes of the teacher's CLS and patch tokens."""

    def make_teacher_heads(self, teacher_dim: int) -> TeacherHeads:
        h = self.recipe.heads  # zeros until prepare() (or a checkpoint) fills them
        return TeacherHeads(PrototypeHead(torch.zeros(h.dino_prototypes, teacher_dim), h.prototype_scale),
                            PrototypeHead(torch.zeros(h.ibot_prototypes, teacher_dim), h.prototype_scale))

    @torch.no_grad()
    def prepare(self, batches: StepBatches) -> None:
        """Spherical k-means of teacher CLS and patch tokens over the first
        ``prototype_batches`` steps' global crops (gathered from all ranks)."""
        r = self.recipe
        cls_all, patch_all = [], []
        for step in range(r.heads.prototype_batches):
            batch = batches[step]
            cls, patches = self.teacher(batch.globals_.flatten(0, 1).to(self.device))
            cls_all.append(cls)
            patch_all.append(patches.flatten(0, 1))
        cls, patches = D.gather_rows(torch.cat(cls_all)), D.gather_rows(torch.cat(patch_all))
        for name, feats, k in (("dino", cls, r.heads.dino_prototypes), ("ibot", patches, r.heads.ibot_prototypes)):
            if feats.shape[0] < k:
                raise UserError(f"{r.source}: 'heads.{name}_prototypes' = {k} exceeds the {feats.shape[0]} teacher "
                                f"vectors of heads.prototype_batches = {r.heads.prototype_batches} batches")
            centroids = kmeans(feats, k, seed=r.seed)
            getattr(self.teacher_heads, name).prototypes.copy_(centroids)


OBJECTIVES: dict[str, type[Objective]] = {
    "regression": RegressionObjective,
    "warmup": WarmupDinoIbotObjective,
    "prototypes": PrototypeDinoIbotObjective,
}
