"""``pathrobust run plism`` and ``pathrobust data synth-plism``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from pathrobust import cli_options as opt
from pathrobust.cli import console, data_app, err_console, run_app
from pathrobust.errors import UserError


def _parse_topk(value: str | None) -> tuple[int, ...] | None:
    if not value:
        return None
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise UserError(f"--topk {value}: expected comma-separated integers such as 1,3,5,10") from None


@run_app.command("plism")
def run_plism_command(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Encoder (registered name, module:factory, file.py:factory or distilled dir). With --features: the name to record (default: the folder name).")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", "-d", help="PLISM tiles: folder of owkin/plism-dataset-tiles parquet shards or of owkin/plism-dataset <slide_id>.h5 files. Default: synthetic PLISM data (built once into the cache).")] = None,
    features: Annotated[Optional[Path], typer.Option("--features", help="Precomputed features in plismbench's layout: DIR/<slide_id>/features.npy, float32 (n, 3+d).")] = None,
    out: opt.OutDir = Path("runs"),
    pooling: opt.Pooling = None,
    weights: opt.Weights = None,
    device: opt.Device = "auto",
    precision: opt.Precision = "auto",
    batch_size: opt.BatchSize = 64,
    workers: opt.Workers = 2,
    tile_subset: Annotated[Optional[Path], typer.Option("--tile-subset", help="plismbench tile subset (.npy of int64 indices into the (x, y)-sorted tiles), e.g. tiles_subset_8139.npy.")] = None,
    n_tiles: Annotated[Optional[int], typer.Option("--n-tiles", help="Use N evenly spaced tiles of the (x, y)-sorted tiles (deterministic). Default: all tiles.")] = None,
    topk: Annotated[Optional[str], typer.Option("--topk", help="Comma-separated k values of the top-k accuracies (default 1,3,5,10; the leaderboard needs 10).")] = None,
    bootstrap: Annotated[Optional[int], typer.Option("--bootstrap", min=0, help="Tile bootstrap replicates for the leaderboard metric's 95% interval (default from suites/plism.toml; 0 = off).")] = None,
    no_probes: Annotated[bool, typer.Option("--no-probes", help="Skip the scanner-ID / staining-ID leakage probes.")] = False,
    metric_precision: Annotated[Optional[str], typer.Option("--metric-precision", help="Similarity precision of the pair metrics: fp32 (default, the reference definition), fp64, bf16 or fp16 (GPU).")] = None,
    overwrite: opt.Overwrite = False,
    as_json: opt.Json = False,
    no_progress: opt.NoProgress = False,
) -> None:
    """PLISM stain/scanner robustness (plismbench protocol): cosine similarity and top-k
    retrieval of the same tile across 91 stainings x scanners, per pair and per group, the
    leaderboard metric (mean of 4 medians), plus heatmaps, leakage probes and a bootstrap CI.

    Writes <out>/plism/<model>/<run-id>/ (metrics.csv, results.csv, summary.json, heatmaps)
    and a row in <out>/results.sqlite. Interrupted? Rerun the same command: extraction and
    finished pairs are reused.

    Examples:
      pathrobust run plism --model efficientnet-lite0-imagenet
      pathrobust run plism --model h0-mini --data plism-dataset-tiles/ --tile-subset tiles_subset_8139.npy --device cuda
      pathrobust run plism --features features/h0_mini/ --out runs/
      pathrobust run plism --model rgb-histogram --n-tiles 32 --bootstrap 0 --no-probes
    """
    from pathrobust.suites.plism import run_plism

    summary = run_plism(model=model, out=out, data=data, features_dir=features, pooling=pooling, weights=weights,
                        device=device, precision=precision, batch_size=batch_size, workers=workers,
                        tile_subset=tile_subset, n_tiles=n_tiles, topk=_parse_topk(topk), bootstrap=bootstrap,
                        probes=False if no_probes else None, metric_precision=metric_precision,
                        overwrite=overwrite, progress=not no_progress)
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
        return
    _print_summary(summary)


def _print_summary(summary: dict) -> None:
    from rich.table import Table

    run_dir = Path(summary["run_dir"])
    results = run_dir / "results.csv"
    if results.is_file():
        import pandas as pd

        df = pd.read_csv(results, index_col=0)
        table = Table(title=f"PLISM robustness — median over {summary.get('n_pairs', '?')} pairs, "
                            f"{summary.get('n_tiles', '?')} tiles per slide")
        table.add_column("group", no_wrap=True)
        short = {"cosine_similarity": "cosine"}
        for col in df.columns:
            table.add_column(short.get(col, col.replace("_accuracy", "").replace("top_", "top-")), no_wrap=True)
        for group, row in df.iterrows():
            table.add_row(str(group).replace("inter-scanner, inter-staining", "both differ"),
                          *[str(v).split(" ; ")[-1].split(" ")[0] for v in row])
        console.print(table)
    lb = summary.get("leaderboard")
    if lb is not None:
        ci = summary.get("leaderboard_bootstrap") or {}
        ci_txt = f"  95% CI [{ci['low']:.3f}, {ci['high']:.3f}]" if ci.get("low") is not None else ""
        console.print(f"leaderboard metric: [bold]{lb:.4f}[/] (unrounded {summary['leaderboard_unrounded']:.4f}){ci_txt}")
    probes = summary.get("probes") or {}
    for name in ("scanner", "staining"):
        if probes.get(name) and probes[name].get("normalized") is not None:
            console.print(f"{name}-ID leakage (normalised balanced accuracy, 0 = none): {probes[name]['normalized']:.3f}")
    err_console.print(f"[green]✓[/] {run_dir}  (results.csv: mean (std) ; median (iqr) per group)")


@data_app.command("synth-plism")
def synth_plism_command(
    out: opt.OutDir = Path("synth-plism"),
    tiles_per_slide: Annotated[int, typer.Option("--tiles-per-slide", min=2, help="Tiles per slide (same locations in every slide).")] = 48,
    stainings: Annotated[Optional[str], typer.Option("--stainings", help="Comma-separated subset of the 13 PLISM stainings (default all).")] = None,
    scanners: Annotated[Optional[str], typer.Option("--scanners", help="Comma-separated subset of the 7 PLISM scanners (default all).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Tile positions and simulation parameters.")] = 0,
    overwrite: opt.Overwrite = False,
    no_progress: opt.NoProgress = False,
) -> None:
    """Synthetic PLISM-like data in the real owkin/plism-dataset-tiles parquet layout: real H&E
    tiles (bundled CC0 slide) under 13 simulated stainings (Beer-Lambert, per-protocol H and E
    vectors) x 7 simulated scanners (colour, gamma, white balance, blur, shift, noise, JPEG).

    Examples:
      pathrobust data synth-plism --out synth-plism/
      pathrobust data synth-plism --out small/ --tiles-per-slide 16 --stainings GIV,GM,HR --scanners AT2,S60
    """
    from pathrobust.data.plism import SCANNERS, STAININGS
    from pathrobust.data.synth_plism import SynthPlismConfig, parse_names, synth_plism

    config = SynthPlismConfig(tiles_per_slide=tiles_per_slide, stainings=parse_names(stainings, STAININGS, "--stainings"),
                              scanners=parse_names(scanners, SCANNERS, "--scanners"), seed=seed)
    path = synth_plism(out, config, overwrite=overwrite, progress=not no_progress)
    n = len(config.stainings) * len(config.scanners)
    err_console.print(f"[green]✓[/] {path}  ({n} slides x {tiles_per_slide} tiles, parquet shards in {path / 'data'})")
