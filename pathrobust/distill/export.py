"""Export a trained student as a pathrobust encoder directory: ``model.safetensors`` plus
``encoder.json``, so the directory works as ``--model DIR`` in every suite and in
``pathrobust models show DIR``."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from pathrobust.distill.recipe import Recipe
from pathrobust.registry import EncoderSpec, save_spec_dir

WEIGHTS_NAME = "model.safetensors"


def student_arch_kwargs(recipe: Recipe) -> dict:
    """The timm kwargs that rebuild the student (JSON-friendly; layer classes as strings)."""
    kwargs = dict(recipe.student.arch_kwargs)
    kwargs.setdefault("img_size", recipe.crops.global_size)
    kwargs["dynamic_img_size"] = True  # local crops are smaller than global ones
    return kwargs


def student_spec(recipe: Recipe, backbone: nn.Module, weights_path: Path, teacher: str) -> EncoderSpec:
    dim = backbone.num_features
    return EncoderSpec(
        name=recipe.student.name,
        family="distilled",
        arch=recipe.student.arch,
        arch_kwargs=student_arch_kwargs(recipe),
        weights_format="timm",
        input_size=recipe.crops.global_size,
        mean=tuple(recipe.student.mean),
        std=tuple(recipe.student.std),
        poolings={"cls": dim, "cls+mean": 2 * dim, "mean": dim},
        default_pooling="cls",
        num_prefix_tokens=int(backbone.num_prefix_tokens),
        params=sum(p.numel() for p in backbone.parameters()),
        precision="bf16",
        mpp=recipe.data.target_mpp,
        license="unknown",
        pretrained=True,
        weights_path=str(weights_path),
        description=f"EMA student distilled from {teacher} with recipe '{recipe.name}' (pathrobust distill)",
    )


def export_student(backbone: nn.Module, recipe: Recipe, out_dir: Path, teacher: str) -> EncoderSpec:
    """Write ``out_dir/model.safetensors`` and ``out_dir/encoder.json`` atomically."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS_NAME
    tmp = weights.with_suffix(".safetensors.tmp")
    state = {k: v.detach().float().cpu().contiguous() for k, v in backbone.state_dict().items()}
    save_file(state, str(tmp), metadata={"format": "pt", "recipe": recipe.name, "teacher": teacher})
    os.replace(tmp, weights)
    spec = student_spec(recipe, backbone, weights, teacher)
    save_spec_dir(spec, out_dir)
    return spec


def save_atomic(obj, path: Path) -> None:
    """``torch.save`` to a temporary name, then rename (never a half-written checkpoint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
