"""CLI: ``pathrobust run hest`` and ``pathrobust data synth-hest`` (thin over the API)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pathrobust import cli_options as opt
from pathrobust.cli import data_app, err_console, run_app


@run_app.command("hest")
def run_hest_command(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Encoder to embed the patches with (registered name, module:factory, file.py:factory, distilled dir).")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", "-d", help="hest-bench root (one folder per task). Default: the synthetic benchmark, built once in $PATHROBUST_CACHE/synth-hest.")] = None,
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="Comma-separated tasks (default: every task folder in --data).")] = None,
    embeddings: Annotated[Optional[Path], typer.Option("--embeddings", help="Use precomputed embeddings in HEST's cache layout DIR/<TASK>/<encoder>/<sample_id>.h5 instead of --model.")] = None,
    encoder_name: Annotated[Optional[str], typer.Option("--encoder-name", help="With --embeddings: the <encoder> folder to read (default: the only one).")] = None,
    alpha: Annotated[str, typer.Option("--alpha", help="Ridge alpha: 'reference' (100/(n_features*n_genes), HEST), 'cv' (inner patient-grouped CV over the grid in suites/hest.toml) or a number.")] = "reference",
    no_pca: Annotated[bool, typer.Option("--no-pca", help="Ridge on the raw embeddings (HEST dimreduce=None: no scaler, no PCA) instead of StandardScaler+PCA(256).")] = False,
    pooling: opt.Pooling = None,
    weights: opt.Weights = None,
    out: opt.OutDir = Path("runs"),
    embed_dir: Annotated[Optional[Path], typer.Option("--embed-dir", help="With --model: where the embedding cache goes (default OUT/hest-embeddings).")] = None,
    batch_size: opt.BatchSize = 64,
    workers: opt.Workers = 0,
    precision: opt.Precision = "auto",
    device: opt.Device = "auto",
    overwrite: opt.Overwrite = False,
    as_json: opt.Json = False,
    no_progress: opt.NoProgress = False,
) -> None:
    """HEST-Benchmark: predict 50 genes' log1p expression from patch embeddings (PCA-256 +
    ridge, per-gene Pearson on held-out patients), per task, per gene and on average.

    Embeddings are cached in HEST's layout (OUT/hest-embeddings/<TASK>/<model>/...), so a
    rerun, or `--embeddings` later, reuses them. Results: a run directory (summary.json,
    folds.csv, genes.csv) and rows in OUT/results.sqlite (one per task plus "average").
    Options beyond the reference (--alpha cv, --no-pca, --pooling) are recorded and label
    the row.

    Examples:
      pathrobust run hest --model efficientnet-lite0-imagenet
      pathrobust run hest --model h0-mini --pooling cls+mean --data hest-bench/ --tasks IDC,PRAD
      pathrobust run hest --embeddings eval/ST_data_emb --encoder-name uni_v1 --data hest-bench/
      pathrobust run hest --model rgb-histogram --alpha cv --no-pca
    """
    import json

    from pathrobust.suites.hest import HestOptions, load_protocol, run_hest

    protocol = load_protocol()
    bench_root = data if data is not None else _default_synth(protocol, progress=not no_progress)
    task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    summary = run_hest(bench_root=bench_root, out=out, model=model, embeddings=embeddings, encoder_name=encoder_name,
                       tasks=task_list, options=HestOptions(alpha, not no_pca, pooling), weights=weights,
                       embed_dir=embed_dir, batch_size=batch_size, num_workers=workers, precision=precision,
                       device=device, overwrite=overwrite, progress=not no_progress, protocol=protocol)
    if as_json:
        print(json.dumps({k: v for k, v in summary.items() if k != "provenance"}, indent=2, default=float))
        return
    from rich.table import Table

    from pathrobust.cli import console

    variant = f" [{summary['variant']}]" if summary.get("variant") else ""
    table = Table(title=f"HEST · {summary['model']}{variant}")
    for col in ("task", "pearson (mean ± std over folds)", "folds", "alpha"):
        table.add_column(col)
    for name, t in summary["tasks"].items():
        alphas = sorted(set(t["alpha_per_fold"]))
        table.add_row(name, f"{t['pearson_mean']:.4f} ± {t['pearson_std']:.4f}", str(len(t["pearson_per_fold"])),
                      ", ".join(f"{a:.3g}" for a in alphas))
    table.add_row("[bold]average[/]", f"[bold]{summary['average']:.4f}[/]", "", "")
    console.print(table)
    err_console.print(f"run directory: {summary['run_dir']}")


def _default_synth(protocol: dict, progress: bool) -> Path:
    from pathrobust.data.synth_hest import SynthHestConfig, build_synth_hest, default_synth_dir

    target = default_synth_dir()
    if not (target / "synth_hest.json").is_file() and progress:
        err_console.print(f"building the synthetic HEST benchmark in {target} (once)")
    return build_synth_hest(target, SynthHestConfig.from_mapping(protocol.get("synthetic", {})))


@data_app.command("synth-hest")
def synth_hest_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Benchmark root to write (one folder per task).")],
    spots: Annotated[Optional[int], typer.Option("--spots", min=10, help="Spots per sample (default from suites/hest.toml).")] = None,
    samples: Annotated[Optional[int], typer.Option("--samples", min=2, help="Samples (patients) per task; a multiple of --folds.")] = None,
    folds: Annotated[Optional[int], typer.Option("--folds", min=1, help="Folds per task.")] = None,
    genes: Annotated[Optional[int], typer.Option("--genes", min=2, help="Genes (written as var_50genes.json, HEST's file name).")] = None,
    tile_size: Annotated[Optional[int], typer.Option("--tile-size", min=16, help="Patch side in pixels (HEST: 224).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed.")] = None,
    overwrite: opt.Overwrite = False,
) -> None:
    """Write a small HEST benchmark in the exact hest-bench layout (patches h5, adata h5ad,
    splits CSVs, var_50genes.json) from real H&E tiles of the bundled slide, with expression
    driven by morphology (nuclear count and area, texture, stain densities) plus noise,
    per-patient effects and per-patient staining.

    Examples:
      pathrobust data synth-hest --out synth-hest/
      pathrobust data synth-hest --out big/ --spots 200 --samples 6 --folds 3
      pathrobust run hest --model efficientnet-lite0-imagenet --data synth-hest/
    """
    from pathrobust.data.synth_hest import SynthHestConfig, build_synth_hest
    from pathrobust.suites.hest import load_protocol

    base = dict(load_protocol().get("synthetic", {}))
    for key, value in (("spots_per_sample", spots), ("samples_per_task", samples), ("folds", folds), ("genes", genes),
                       ("tile_size", tile_size), ("seed", seed)):
        if value is not None:
            base[key] = value
    path = build_synth_hest(out, SynthHestConfig.from_mapping(base), overwrite=overwrite)
    err_console.print(f"[green]✓[/] {path}")
