"""Options shared by several commands (one definition, so every command reads alike)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Model = Annotated[str, typer.Option("--model", "-m", help="Registered name (`pathrobust models list`), pkg.module:factory, file.py:factory, or a `pathrobust distill` output directory.")]
Pooling = Annotated[Optional[str], typer.Option("--pooling", help="Pooling variant: cls, mean or cls+mean (default: the model's; see `pathrobust models show NAME`).")]
Weights = Annotated[Optional[str], typer.Option("--weights", help="Weights file (.safetensors, or .pth/.bin loaded with weights_only) or directory; 'random' for random init.")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")]
Precision = Annotated[str, typer.Option("--precision", help="auto (bf16/fp16 autocast on CUDA per the model, fp32 on CPU), fp32, bf16 or fp16.")]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Tiles per forward pass.")]
Workers = Annotated[int, typer.Option("--workers", "-j", min=0, help="DataLoader worker processes (tile decoding and resizing).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Recompute and replace finished outputs.")]
OutDir = Annotated[Path, typer.Option("--out", "-o", help="Output directory.")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="Hide progress bars.")]
TrustCode = Annotated[bool, typer.Option("--trust-code", help="Let the model folder's files (encoder.json, config.json) name code other than torch/timm layers.")]
Shard = Annotated[Optional[str], typer.Option("--shard", metavar="I/N", help="Job arrays without torchrun: this process does share I of N (0-based) and leaves a marker; the last shard to finish (or `pathrobust merge DIR`) completes the work. 'slurm' reads SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT.")]
