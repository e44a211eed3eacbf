"""Export a trained student as a pathrobust encoder directory: ``model.safetensors`` plus
``encoder.json``, so the directory works as ``--model DIR`` in every suite and in
``pathrobust models show DIR``.

The same tensors always give the same ``model.safetensors`` bytes (so its sha256, which run
ids are built from, is stable), and files are written with the user's umask."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from pathrobust import atomic
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


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors file of ``tensors`` with ``metadata``, byte for byte reproducible.

    safetensors writes ``__metadata__`` from a hash map whose order changes from run to run;
    without metadata its header is deterministic (tensors sorted by dtype, then name). So
    the file is serialised without metadata and its JSON header rewritten with the metadata
    first, keys sorted, padded with spaces to a multiple of 8 bytes as the format asks
    (data offsets are relative to the end of the header, so the data is unchanged)."""
    from safetensors.torch import save

    blob = save(tensors)
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    header = {"__metadata__": {str(k): str(metadata[k]) for k in sorted(metadata)}, **header}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + blob[8 + n:]


def export_student(backbone: nn.Module, recipe: Recipe, out_dir: Path, teacher: str) -> EncoderSpec:
    """Write ``out_dir/model.safetensors`` and ``out_dir/encoder.json`` atomically."""
    weights = out_dir / WEIGHTS_NAME
    state = {k: v.detach().float().cpu().contiguous() for k, v in backbone.state_dict().items()}
    atomic.write_bytes(weights, safetensors_bytes(state, {"format": "pt", "recipe": recipe.name, "teacher": teacher}))
    spec = student_spec(recipe, backbone, weights, teacher)
    save_spec_dir(spec, out_dir)
    return spec


def save_atomic(obj, path: Path) -> None:
    """``torch.save`` to a temporary name, then rename (never a half-written checkpoint; a full
    disk leaves no temporary file and ends as one line)."""
    with atomic.atomic_path(path) as tmp:
        torch.save(obj, tmp)
