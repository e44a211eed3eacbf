"""Distillation recipes: a TOML file -> a validated, typed :class:`Recipe`.

Each TOML table maps to one dataclass below, loaded by :mod:`pathrobust.config` (the loader
suite protocols use too); unknown keys and bad values raise a :class:`UserError` naming
``<file>: '<table>.<key>'``; :func:`validate` adds the cross-field and range checks. The recipe says *what* is trained
(teacher, student, heads, losses, crops, optimiser); the trainer says *how*."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pathrobust.config import from_dict, read_toml
from pathrobust.errors import UserError

RECIPE_DIR = Path(__file__).resolve().parent.parent / "configs" / "distill"
HEAD_MODES = ("warmup", "prototypes", "regression")
CENTERINGS = ("sinkhorn", "ema")


@dataclass
class TeacherConfig:
    model: str = "efficientnet-lite0-imagenet"
    weights: str | None = None  # a file/dir, "random", or None for the registry's search
    input_size: int = 0  # 0: the teacher sees the global crops at their own size
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU


@dataclass
class StudentConfig:
    arch: str = "vit_small_patch14_reg4_dinov2"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    name: str = "student"


@dataclass
class HeadsConfig:
    mode: str = "warmup"  # warmup | prototypes | regression
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    dino_prototypes: int = 65536
    ibot_prototypes: int = 65536
    warmup_steps: int = 100  # mode=warmup: head-only steps on the frozen teacher
    warmup_lr: float = 1e-3
    prototype_batches: int = 8  # mode=prototypes: batches of teacher features for k-means
    prototype_scale: float = 1.0  # logits = scale x cosine; 1 matches the DINO head's cosine logits
    freeze_last_layer_steps: int = 0


@dataclass
class LossConfig:
    centering: str = "sinkhorn"  # sinkhorn | ema
    sinkhorn_iterations: int = 3
    center_momentum: float = 0.9
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    teacher_temp_warmup: float = 0.04
    teacher_temp_warmup_steps: int = 0
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    regression_weight: float = 1.0


@dataclass
class MaskingConfig:
    sample_probability: float = 0.5
    min_ratio: float = 0.1
    max_ratio: float = 0.5


@dataclass
class CropsConfig:
    global_size: int = 224
    local_size: int = 98
    n_global: int = 2
    n_local: int = 8
    global_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])


@dataclass
class AugmentConfig:
    flip_p: float = 0.5
    rot90: bool = True
    color_jitter_p: float = 0.8
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.1
    hue: float = 0.02
    hed_p: float = 0.5
    hed_sigma: float = 0.05  # stain concentrations scaled by U(1-s, 1+s)
    hed_bias: float = 0.01  # and shifted by U(-b, b)
    blur_p: list[float] = field(default_factory=lambda: [1.0, 0.1])  # per global crop
    blur_p_local: float = 0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])  # at 224 px; scaled with crop size


@dataclass
class OptimConfig:
    batch_size: int = 256  # global batch (all ranks)
    steps: int = 1000
    base_lr: float = 4e-3  # lr = base_lr * sqrt(batch / 1024)
    min_lr: float = 1e-6
    lr_warmup_steps: int = 100
    weight_decay: float = 0.04
    weight_decay_end: float = 0.2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    clip_grad: float = 3.0
    ema_momentum: float = 0.994
    ema_momentum_end: float = 1.0
    checkpoint_every: int = 500


@dataclass
class DataConfig:
    tile_size: int = 224  # slides: tile side in px at target_mpp
    target_mpp: float = 0.5
    min_tissue: float = 0.5
    synthetic_tiles: int = 512  # no --data: tiles from the bundled H&E slide
    workers: int = 0


@dataclass
class Recipe:
    name: str = "distill"
    description: str = ""
    seed: int = 0
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    source: str = "<dict>"

    @property
    def total_steps(self) -> int:
        """Head warm-up steps (mode=warmup) plus student steps."""
        return (self.heads.warmup_steps if self.heads.mode == "warmup" else 0) + self.optim.steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "Recipe":
        return dataclasses.replace(self, **changes)


# -- loading and validation ----------------------------------------------------------------
def _numbers(obj: Any, prefix: str = ""):
    """``(key, value)`` of every float in a recipe (lists included), depth first."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _numbers(value, f"{prefix}{f.name}.")
        elif isinstance(value, float):
            yield f"{prefix}{f.name}", value
        elif isinstance(value, list):
            for v in value:
                if isinstance(v, float):
                    yield f"{prefix}{f.name}", v


def student_patch_size(r: Recipe) -> int | None:
    """The student's patch side when the recipe says it (``arch_kwargs.patch_size`` or the
    ``patchN`` of a timm name); None otherwise (the trainer checks the built model)."""
    patch = r.student.arch_kwargs.get("patch_size")
    if isinstance(patch, (list, tuple)) and patch:
        patch = max(patch)
    if isinstance(patch, int) and not isinstance(patch, bool):
        return patch
    found = re.search(r"patch(\d+)", r.student.arch)
    return int(found.group(1)) if found else None


def validate(r: Recipe) -> Recipe:
    src = r.source

    def bad(key: str, what: str) -> UserError:
        return UserError(f"{src}: '{key}' {what}")

    for key, value in _numbers(r):  # TOML allows nan and inf, which slip past every range check
        if not math.isfinite(value):
            raise bad(key, f"must be a finite number, got {value}")
    if not r.name or any(c.isspace() for c in r.name):
        raise bad("name", "must be a non-empty word")
    if not r.student.name or any(c.isspace() for c in r.student.name):
        raise bad("student.name", "must be a non-empty word (it names the exported encoder)")
    if not r.teacher.model.strip():
        raise bad("teacher.model", "must name an encoder")
    if r.seed < 0:
        raise bad("seed", f"must be >= 0, got {r.seed}")
    if r.heads.mode not in HEAD_MODES:
        raise bad("heads.mode", f"must be one of {', '.join(HEAD_MODES)}, got '{r.heads.mode}'")
    if r.loss.centering not in CENTERINGS:
        raise bad("loss.centering", f"must be one of {', '.join(CENTERINGS)}, got '{r.loss.centering}'")
    if r.teacher.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise bad("teacher.precision", "must be auto, fp32, bf16 or fp16")
    positive = {
        "heads.hidden_dim": r.heads.hidden_dim, "heads.bottleneck_dim": r.heads.bottleneck_dim,
        "heads.dino_prototypes": r.heads.dino_prototypes, "heads.ibot_prototypes": r.heads.ibot_prototypes,
        "heads.prototype_batches": r.heads.prototype_batches, "loss.sinkhorn_iterations": r.loss.sinkhorn_iterations,
        "loss.student_temp": r.loss.student_temp, "loss.teacher_temp": r.loss.teacher_temp,
        "loss.teacher_temp_warmup": r.loss.teacher_temp_warmup, "crops.global_size": r.crops.global_size,
        "crops.local_size": r.crops.local_size, "optim.batch_size": r.optim.batch_size, "optim.steps": r.optim.steps,
        "optim.base_lr": r.optim.base_lr, "optim.checkpoint_every": r.optim.checkpoint_every,
        "data.tile_size": r.data.tile_size, "data.target_mpp": r.data.target_mpp,
        "data.synthetic_tiles": r.data.synthetic_tiles, "heads.warmup_lr": r.heads.warmup_lr,
        "heads.prototype_scale": r.heads.prototype_scale,
    }
    for key, value in positive.items():
        if value <= 0:
            raise bad(key, f"must be > 0, got {value}")
    non_negative = {
        "heads.warmup_steps": r.heads.warmup_steps, "heads.freeze_last_layer_steps": r.heads.freeze_last_layer_steps,
        "loss.teacher_temp_warmup_steps": r.loss.teacher_temp_warmup_steps, "loss.dino_weight": r.loss.dino_weight,
        "loss.ibot_weight": r.loss.ibot_weight, "loss.koleo_weight": r.loss.koleo_weight,
        "loss.regression_weight": r.loss.regression_weight, "crops.n_local": r.crops.n_local,
        "optim.lr_warmup_steps": r.optim.lr_warmup_steps, "optim.min_lr": r.optim.min_lr,
        "optim.weight_decay": r.optim.weight_decay, "optim.weight_decay_end": r.optim.weight_decay_end,
        "optim.clip_grad": r.optim.clip_grad, "teacher.input_size": r.teacher.input_size,
        "data.workers": r.data.workers, "augment.hed_sigma": r.augment.hed_sigma, "augment.hed_bias": r.augment.hed_bias,
        "augment.brightness": r.augment.brightness, "augment.contrast": r.augment.contrast,
        "augment.saturation": r.augment.saturation, "augment.hue": r.augment.hue,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise bad(key, f"must be >= 0, got {value}")
    probabilities = {
        "masking.sample_probability": r.masking.sample_probability, "masking.min_ratio": r.masking.min_ratio,
        "masking.max_ratio": r.masking.max_ratio, "loss.center_momentum": r.loss.center_momentum,
        "optim.ema_momentum": r.optim.ema_momentum, "optim.ema_momentum_end": r.optim.ema_momentum_end,
        "augment.flip_p": r.augment.flip_p, "augment.color_jitter_p": r.augment.color_jitter_p,
        "augment.hed_p": r.augment.hed_p, "augment.blur_p_local": r.augment.blur_p_local,
        "data.min_tissue": r.data.min_tissue,
    }
    for key, value in probabilities.items():
        if not 0 <= value <= 1:
            raise bad(key, f"must be in [0, 1], got {value}")
    if r.augment.hue > 0.5:  # a hue rotation of more than half the colour circle (torchvision's limit)
        raise bad("augment.hue", f"must be in [0, 0.5], got {r.augment.hue}")
    if r.augment.hed_sigma > 1:  # stain concentrations are scaled by U(1 - s, 1 + s): no negative scales
        raise bad("augment.hed_sigma", f"must be in [0, 1], got {r.augment.hed_sigma}")
    if r.masking.min_ratio > r.masking.max_ratio:
        raise bad("masking.min_ratio", "must be <= masking.max_ratio")
    if r.crops.n_global < 2:
        raise bad("crops.n_global", f"must be >= 2 (DINO pairs each global crop with another), got {r.crops.n_global}")
    for key, pair in (("crops.global_scale", r.crops.global_scale), ("crops.local_scale", r.crops.local_scale),
                      ("augment.blur_sigma", r.augment.blur_sigma)):
        if len(pair) != 2 or not 0 < pair[0] <= pair[1] or (key.startswith("crops") and pair[1] > 1):
            raise bad(key, f"must be [low, high] with 0 < low <= high{' <= 1' if key.startswith('crops') else ''}, got {pair}")
    if len(r.optim.betas) != 2 or not all(0 <= beta < 1 for beta in r.optim.betas):
        raise bad("optim.betas", f"must be [beta1, beta2], each in [0, 1), got {r.optim.betas}")
    patch = student_patch_size(r)
    if patch is not None:
        sizes = {"crops.global_size": r.crops.global_size}
        if r.crops.n_local:
            sizes["crops.local_size"] = r.crops.local_size
        for key, size in sizes.items():
            if size < patch:
                raise bad(key, f"= {size} is smaller than the student's {patch} px patch")
    if len(r.augment.blur_p) != r.crops.n_global or not all(0 <= p <= 1 for p in r.augment.blur_p):
        raise bad("augment.blur_p", f"needs one probability in [0, 1] per global crop ({r.crops.n_global})")
    if len(r.student.mean) != 3 or len(r.student.std) != 3 or min(r.student.std) <= 0:
        raise bad("student.mean", "student.mean and student.std need 3 channels, std > 0")
    return r


def recipe_from_dict(data: dict[str, Any], source: str = "<dict>") -> Recipe:
    if "source" in data:
        raise UserError(f"{source}: unknown key 'source'")
    recipe = from_dict(Recipe, data, source)
    recipe.source = source
    return validate(recipe)


def find_recipe(name_or_path: str | Path) -> Path:
    """A path, or the name of a bundled recipe (``demo``, ``h0-mini``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = RECIPE_DIR / f"{path.stem if path.suffix == '.toml' else path.name}.toml"
    if bundled.is_file() and len(path.parts) == 1:
        return bundled
    known = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.toml")))
    raise UserError(f"--recipe {name_or_path}: no such file (bundled recipes: {known})")


def load_recipe(name_or_path: str | Path) -> Recipe:
    path = find_recipe(name_or_path)
    return recipe_from_dict(read_toml(path), str(path))
