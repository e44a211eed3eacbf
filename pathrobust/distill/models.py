"""The networks of a distillation: the student backbone and its wrapper, the frozen teacher.

The student is a timm ViT wrapped in :class:`Student` (its own normalisation); each
objective (:mod:`pathrobust.distill.objectives`) subclasses it with the heads it trains.
The teacher is any registered encoder, frozen, whose patch tokens are resampled onto the
student's patch grid.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from pathrobust import trust
from pathrobust.distill.export import student_arch_kwargs
from pathrobust.distill.recipe import Recipe
from pathrobust.encoders.base import build_encoder
from pathrobust.errors import UserError


def build_student_backbone(recipe: Recipe, trust_code: bool = False) -> nn.Module:
    """The bare timm ViT (``num_classes=0``), seeded by ``recipe.seed``.

    The recipe is a file: the layer classes its ``student.arch_kwargs`` name must be
    torch/timm layers unless ``trust_code`` (see :mod:`pathrobust.trust`)."""
    trust.check_layer_kwargs(recipe.student.arch_kwargs, recipe.source, "student.arch_kwargs.", trust_code)
    torch.manual_seed(recipe.seed)
    kwargs = trust.resolve_layer_kwargs(student_arch_kwargs(recipe), f"{recipe.source}: student.arch_kwargs")
    try:
        model = timm.create_model(recipe.student.arch, pretrained=False, num_classes=0, **kwargs)
    except Exception as exc:  # timm raises RuntimeError/TypeError for unknown names/kwargs
        raise UserError(f"{recipe.source}: student.arch '{recipe.student.arch}' with {recipe.student.arch_kwargs}: {exc}") from None
    if not hasattr(model, "patch_embed") or not hasattr(model, "num_prefix_tokens"):
        raise UserError(f"{recipe.source}: student.arch '{recipe.student.arch}' is not a timm ViT")
    patch = max(model.patch_embed.patch_size)
    sizes = {"crops.global_size": recipe.crops.global_size}
    if recipe.crops.n_local:
        sizes["crops.local_size"] = recipe.crops.local_size
    for key, size in sizes.items():
        if size < patch:
            raise UserError(f"{recipe.source}: '{key}' = {size} is smaller than the student's {patch} px patch")
    return model


def patch_grid(backbone: nn.Module, size: int) -> tuple[int, int]:
    p = backbone.patch_embed.patch_size
    return size // p[0], size // p[1]


class Student(nn.Module):
    """Student backbone + the heads of an objective (subclasses add them and ``forward``).

    ``forward(globals_, locals_, mask_index)`` with ``globals_`` ``(G*b, 3, S, S)`` and
    ``locals_`` ``(L*b, 3, s, s)`` in [0, 1] (or None), ``mask_index`` flat indices into the
    ``(G*b) * N`` global patch tokens, returns a dict holding at least ``cls`` ``(G*b, D)``,
    the pre-head global CLS tokens."""

    def __init__(self, backbone: nn.Module, recipe: Recipe) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(recipe.student.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(recipe.student.std).view(1, 3, 1, 1), persistent=False)
        torch.manual_seed(recipe.seed + 1)  # the subclass's heads initialise from here

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))


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

    def __init__(self, recipe: Recipe, device: torch.device, grid: tuple[int, int], trust_code: bool = False) -> None:
        t = recipe.teacher
        self.encoder = build_encoder(t.model, weights=t.weights, device=device, trust_code=trust_code)
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
