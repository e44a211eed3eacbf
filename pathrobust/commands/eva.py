"""``pathrobust run eva`` and ``pathrobust data synth-eva``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from pathrobust import cli_options as opt
from pathrobust.cli import console, data_app, err_console, run_app


@run_app.command("eva")
def run_eva_command(
    model: opt.Model,
    data: Annotated[Optional[Path], typer.Option("--data", "-d", help="Data root holding bach/, crc/, mhist/, patch_camelyon/, breakhis/ (eva's layouts) or train/+val/ class folders; default: the synthetic CRC/MHIST sets.")] = None,
    tasks: Annotated[Optional[str], typer.Option("--tasks", "-t", help="Comma-separated tasks (bach, crc, mhist, patch_camelyon, breakhis, or a class-folder dataset's name); default: all found.")] = None,
    out: opt.OutDir = Path("runs"),
    pooling: opt.Pooling = None,
    weights: opt.Weights = None,
    batch_size: opt.BatchSize = 64,
    workers: opt.Workers = 0,
    precision: opt.Precision = "auto",
    device: opt.Device = "auto",
    runs: Annotated[Optional[int], typer.Option("--runs", min=1, help="Probe runs per task (protocol: 5).")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="Optimiser steps per run at most (protocol: 12,500).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of run 0; run r uses seed + r (protocol TOML: 42).")] = None,
    overwrite: opt.Overwrite = False,
    as_json: opt.Json = False,
    no_progress: opt.NoProgress = False,
) -> None:
    """EVA: linear-probe tile classification with kaiko-ai eva's protocol (balanced accuracy,
    mean ± std over 5 runs; the average leaves BACH out).

    Embeddings are computed once per split (eva's resize-224 + centre-crop) and cached under
    --out; the probes of a task train together. Protocol values: suites/eva.toml.

    Examples:
      pathrobust run eva --model efficientnet-lite0-imagenet
      pathrobust run eva --model h0-mini --data /data/eva --tasks crc,mhist,patch_camelyon
      pathrobust run eva --model uni --data /data/eva --tasks bach --runs 5 --json
    """
    from pathrobust.suites.eva import run_eva

    summary = run_eva(model, data, tasks.split(",") if tasks else None, out, pooling=pooling, weights=weights,
                      batch_size=batch_size, workers=workers, precision=precision, device=device, n_runs=runs,
                      max_steps=max_steps, seed=seed, overwrite=overwrite, progress=not no_progress)
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
        return
    from rich.table import Table

    table = Table(title=f"EVA · {summary['model']} (balanced accuracy)")
    for col in ("task", "mean", "std", "split", "runs"):
        table.add_column(col)
    for task, r in summary["tasks"].items():
        table.add_row(task + ("" if r["in_average"] else " (not in average)"), f"{r['balanced_accuracy_mean']:.4f}",
                      f"{r['balanced_accuracy_std']:.4f}", r["eval_split"], ", ".join(f"{v:.3f}" for v in r["runs"]))
    if "average" in summary:
        a = summary["average"]
        table.add_row("[bold]average[/]", f"{a['balanced_accuracy_mean']:.4f}", f"{a['balanced_accuracy_std']:.4f}", "",
                      ", ".join(a["tasks"]))
    console.print(table)
    err_console.print(f"[green]✓[/] {summary['run_dir']}")


@data_app.command("synth-eva")
def synth_eva_command(
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output directory (default: $PATHROBUST_CACHE/synth-eva or ~/.cache/pathrobust/synth-eva).")] = None,
    crc_train: Annotated[int, typer.Option("--crc-train", min=1, help="CRC-like training tiles per class (9 classes).")] = 40,
    crc_val: Annotated[int, typer.Option("--crc-val", min=1, help="CRC-like validation tiles per class.")] = 15,
    mhist: Annotated[int, typer.Option("--mhist", min=10, help="MHIST-like tiles in all (30% test).")] = 150,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    overwrite: opt.Overwrite = False,
) -> None:
    """Write small EVA datasets in the CRC (NCT-CRC-HE-100K + CRC-VAL-HE-7K) and MHIST
    (images/ + annotations.csv) layouts, made of real H&E tiles whose labels follow visible
    tissue properties (architecture, nuclear density, magnification).

    Examples:
      pathrobust data synth-eva --out data/synth-eva
      pathrobust run eva --model efficientnet-lite0-imagenet --data data/synth-eva
      pathrobust data synth-eva --out big/ --crc-train 200 --crc-val 50 --mhist 600
    """
    from pathrobust.data.synth_eva import SynthEvaConfig, write_synth_eva

    path = write_synth_eva(out, SynthEvaConfig(crc_train_per_class=crc_train, crc_val_per_class=crc_val,
                                               mhist_tiles=mhist, seed=seed), overwrite=overwrite)
    err_console.print(f"[green]✓[/] {path}  (crc/, mhist/)")
