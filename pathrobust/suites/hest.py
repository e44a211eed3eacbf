"""HEST-Benchmark runner: embeddings -> per-fold linear probe -> task, gene and average scores.

``run_hest`` takes a hest-bench root (see :mod:`pathrobust.data.hest`) and either an encoder
(embeddings computed through the shared resumable extractor and stored in HEST's cache
layout, ``<embed_root>/<TASK>/<encoder>/<sample_id>.h5``) or an existing HEST embedding
cache. Per fold it runs :func:`pathrobust.probes.ridge.fit_predict_fold` with the
parameters of ``suites/hest.toml``; a task's score is the mean (± population std)
of its folds' mean Pearson, a gene's score the mean over folds, the leaderboard number the
unweighted mean over tasks (HEST ``merge_fold_results`` and ``benchmark_grid``).

Options beyond the reference — ``alpha="cv"`` (or a fixed number), ``pca=False`` and the
pooling — are recorded in the run's config, provenance and every results-DB row
(``RunRecord.options``, with a ``variant`` label such as ``alpha=cv,no-pca``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pathrobust.config import at_least, non_empty, positive
from pathrobust.data import hest as H
from pathrobust.errors import UserError
from pathrobust.metrics import regression as R
from pathrobust.probes import ridge as ridge_probe
from pathrobust.store import safe_name
from pathrobust.suites.base import (Features, FeaturesMode, RunContext, Suite, SuiteResult, TaskRow, option,
                                   register_suite)

SUITE = "hest"


# -- the protocol (suites/hest.toml) -----------------------------------------------------------
@dataclass(frozen=True)
class RidgeProtocol:
    tasks: list[str]
    gene_list: str
    log1p: bool
    pca_components: int = field(metadata=positive())
    pca_random_state: int
    alpha_numerator: float = field(metadata=positive())
    ridge_tol: float = field(metadata=positive())
    ridge_max_iter: int = field(metadata=positive())


@dataclass(frozen=True)
class AlphaCV:
    alphas: list[float] = field(metadata={**non_empty(), "check": lambda v: None if v and min(v) > 0
                                          else f"must be positive numbers, got {v}"})
    inner_folds: int = field(metadata=at_least(2))


@dataclass(frozen=True)
class SyntheticHest:
    tasks: list[str] = field(metadata={**non_empty(), "flag": "--tasks", "help": "Task folders to write."})
    samples_per_task: int = field(metadata={**at_least(2), "flag": "--samples",
                                            "help": "Samples (patients) per task; a multiple of --folds."})
    folds: int = field(metadata={**at_least(1), "help": "Folds per task."})
    spots_per_sample: int = field(metadata={**at_least(10), "flag": "--spots", "help": "Spots per sample."})
    genes: int = field(metadata={**at_least(2), "help": "Genes (written as var_50genes.json, HEST's file name)."})
    tile_size: int = field(metadata={**at_least(16), "help": "Patch side in pixels (HEST: 224)."})
    noise: float = field(metadata=positive())
    sample_effect: float = field(metadata=positive())
    stain_jitter: float = field(metadata=positive())
    base_log_rate: float
    seed: int = field(metadata={"help": "Random seed."})


@dataclass(frozen=True)
class HestProtocol:
    protocol: RidgeProtocol
    alpha_cv: AlphaCV
    synthetic: SyntheticHest


def _split_tasks(value: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in value.split(",") if t.strip())


@dataclass(frozen=True)
class HestOptions:
    """How this run departs from (or keeps) the reference protocol, and what it reads."""

    alpha: str = option("--alpha", "Ridge alpha: 'reference' (100/(n_features*n_genes), HEST), 'cv' (inner "
                        "patient-grouped CV over the grid in suites/hest.toml) or a number.", "reference")
    pca: bool = option("--no-pca", "Ridge on the raw embeddings (HEST dimreduce=None: no scaler, no PCA) instead "
                       "of StandardScaler+PCA(256).", True, invert=True)
    pooling: str | None = None  # recorded on the rows; set from the encoder (or the cache) by the suite
    tasks: tuple[str, ...] | None = option("--tasks", "Comma-separated tasks (default: the leaderboard tasks the "
                                           "data holds, else every task folder).", parse=_split_tasks,
                                           variant=False)
    encoder_name: str | None = option("--encoder-name", "With --embeddings: the <encoder> folder to read "
                                      "(default: the only one).", variant=False)
    embed_dir: Path | None = option("--embed-dir", "With --model: where the HEST-layout embedding files go "
                                    "(default OUT/hest-embeddings).", parse=Path, variant=False)

    def __post_init__(self) -> None:
        if self.alpha not in ("reference", "cv"):
            try:
                value = float(self.alpha)
            except ValueError:
                raise UserError(f"--alpha {self.alpha}: expected 'reference', 'cv' or a positive number") from None
            if not value > 0:
                raise UserError(f"--alpha {self.alpha}: must be > 0")

    @property
    def variant(self) -> str:
        """Leaderboard label of the departures from the reference ('' = reference protocol)."""
        parts = []
        if self.alpha != "reference":
            parts.append(f"alpha={self.alpha}")
        if not self.pca:
            parts.append("no-pca")
        return ",".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "pca": self.pca, "pooling": self.pooling, "variant": self.variant}


@dataclass
class TaskResult:
    task: str
    genes: tuple[str, ...]
    folds: list[ridge_probe.FoldScore]
    fold_alphas: list[float] = field(default_factory=list)

    @property
    def fold_means(self) -> list[float]:
        return [f.mean for f in self.folds]

    @property
    def summary(self) -> tuple[float, float]:
        return R.fold_summary(self.fold_means)

    @property
    def per_gene(self) -> np.ndarray:
        """Mean Pearson of each gene over folds ``(G,)`` (``merge_fold_results``' per-gene mean)."""
        return np.mean(np.stack([f.pearson for f in self.folds]), axis=0)


# -- embeddings ----------------------------------------------------------------------------
def encoder_folder(encoder, precision: str) -> str:
    """Folder name of an encoder in the embedding cache: the model name, plus the pooling
    when it is not the model's default and the precision when it is not fp32."""
    name = safe_name(encoder.name).replace("+", "_")
    if encoder.pooling != encoder.spec.default_pooling:
        name += f"-{encoder.pooling.replace('+', '_')}"
    if precision != "fp32":
        name += f"-{precision}"
    return name


def export_task(ctx: RunContext, task: H.HestTask, embed_root: Path, folder: str) -> None:
    """Embed every sample of ``task`` through the run's feature cache and write it in HEST's
    layout, ``<embed_root>/<TASK>/<folder>/<sample_id>.h5`` (what HEST's own code and
    ``--embeddings`` read). An export that already holds these features is left as it is."""
    from pathrobust.data.tiles import H5Tiles
    from pathrobust.extract import IDENTITY_ATTRS, load_features, read_attrs

    for sample in task.samples:
        out = H.embedding_path(embed_root, task.name, folder, sample.sample_id)
        source = H5Tiles(sample.patches_path, name=sample.sample_id)
        cached = ctx.cache.embed(source, f"{task.name}/{sample.sample_id}")
        want = {k: str(v) for k, v in read_attrs(cached).items() if k in IDENTITY_ATTRS}
        if out.is_file() and not ctx.overwrite:
            have = H.read_embeddings(out).attrs
            diff = [k for k in IDENTITY_ATTRS if str(have.get(k)) != want.get(k)]
            if not diff:
                continue
            if any(k != "source_fingerprint" for k in diff):
                raise UserError(f"{out}: already holds embeddings with a different {', '.join(diff)}; "
                                "pass --overwrite or another --embed-dir")
        feats = load_features(cached)
        if feats.tile_ids is None:
            raise UserError(f"{sample.patches_path}: no 'barcode' dataset; HEST patches need one barcode per patch")
        H.write_embeddings(out, feats.features, feats.tile_ids, feats.coords, feats.attrs)


def resolve_encoder_folder(embed_root: Path, tasks: Sequence[H.HestTask], encoder_name: str | None) -> str:
    """``--encoder-name``, or the only encoder folder the cache holds for the first task."""
    if encoder_name:
        for task in tasks:
            if not (embed_root / task.name / encoder_name).is_dir():
                raise UserError(f"--embeddings {embed_root}: no folder {task.name}/{encoder_name}")
        return encoder_name
    first = embed_root / tasks[0].name
    if not first.is_dir():
        raise UserError(f"--embeddings {embed_root}: no folder for task {tasks[0].name}")
    found = sorted(p.name for p in first.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(found) != 1:
        raise UserError(f"--embeddings {embed_root}: {len(found)} encoder folders under {tasks[0].name} "
                        f"({', '.join(found) or 'none'}); pick one with --encoder-name")
    return found[0]


# -- evaluation ----------------------------------------------------------------------------
def _sample_data(task: H.HestTask, sample: H.HestSample, embed_root: Path, folder: str, log1p: bool,
                 check_patches: bool) -> tuple[np.ndarray, np.ndarray]:
    emb = H.read_embeddings(H.embedding_path(embed_root, task.name, folder, sample.sample_id))
    if check_patches:
        barcodes, _ = H.read_patch_index(sample.patches_path)
        if barcodes != emb.barcodes:
            raise UserError(f"{H.embedding_path(embed_root, task.name, folder, sample.sample_id)}: barcodes differ "
                            f"from those of {sample.patches_path}")
    # as the reference: the embedding file's barcodes select and order the expression rows
    Y = H.read_expression(sample.expr_path, emb.barcodes, task.genes, log1p=log1p,
                          barcodes_from=sample.patches_path)
    return emb.embeddings, Y


def evaluate_task(task: H.HestTask, embed_root: Path, folder: str, protocol: HestProtocol,
                  options: HestOptions, *, check_patches: bool = True, progress: bool = True) -> TaskResult:
    """Every fold of ``task`` on the cached embeddings (see module doc)."""
    from pathrobust.progress import tile_progress

    proto, cv = protocol.protocol, protocol.alpha_cv
    data = {s.sample_id: _sample_data(task, s, embed_root, folder, proto.log1p, check_patches)
            for s in task.samples}
    dims = {x.shape[1] for x, _ in data.values()}
    if len(dims) != 1:
        raise UserError(f"--embeddings {embed_root}: {task.name}/{folder} mixes embedding sizes {sorted(dims)}")
    folds, alphas = [], []
    with tile_progress(f"hest · {task.name}", total=len(task.folds), unit="folds", enabled=progress) as advance:
        for fold in task.folds:
            X_tr = np.concatenate([data[s.sample_id][0] for s in fold.train])
            Y_tr = np.concatenate([data[s.sample_id][1] for s in fold.train])
            X_te = np.concatenate([data[s.sample_id][0] for s in fold.test])
            Y_te = np.concatenate([data[s.sample_id][1] for s in fold.test])
            common = dict(pca=options.pca, n_components=proto.pca_components,
                          random_state=proto.pca_random_state)
            if options.alpha == "cv":
                groups = np.concatenate([[s.sample_id] * len(data[s.sample_id][0]) for s in fold.train])
                if len(set(groups)) < 2:
                    raise UserError(f"--alpha cv: fold {fold.index} of {task.name} has one train sample; "
                                    "grouped cross-validation needs at least 2")
                alpha, _ = ridge_probe.choose_alpha_cv(X_tr, Y_tr, groups, cv.alphas, n_splits=cv.inner_folds,
                                                       **common)
            elif options.alpha == "reference":
                alpha = None
            else:
                alpha = float(options.alpha)
            score = ridge_probe.fit_predict_fold(X_tr, Y_tr, X_te, Y_te, alpha=alpha,
                                                 alpha_numerator=proto.alpha_numerator, tol=proto.ridge_tol,
                                                 max_iter=proto.ridge_max_iter, **common)
            score.predictions = None  # not kept: a fold's predictions are as large as its targets
            if score.undefined_genes:
                if score.undefined_genes == len(score.pearson):
                    raise UserError(f"{task.root}: fold {fold.index} has no gene with a defined Pearson "
                                    "(every gene constant over the test spots)")
                warnings.warn(f"{task.name} fold {fold.index}: {score.undefined_genes} gene(s) constant over the test "
                              "spots (Pearson undefined) left out of the fold's mean", stacklevel=2)
            folds.append(score)
            alphas.append(score.alpha)
            advance(1)
    return TaskResult(task.name, task.genes, folds, alphas)


# -- the run -------------------------------------------------------------------------------
def select_tasks(bench_root: Path, names: Sequence[str] | None, gene_list: str, require_patches: bool = True,
                 leaderboard: Sequence[str] = ()) -> list[H.HestTask]:
    """The tasks to run: ``names``; by default the leaderboard tasks the root holds (so a
    full hest-bench download skips HCC), or every task folder when it holds none of them
    (a synthetic or custom benchmark)."""
    available = H.list_tasks(bench_root)
    chosen = list(names) if names else ([t for t in leaderboard if t in available] or available)
    unknown = [t for t in chosen if t not in available]
    if unknown:
        raise UserError(f"--tasks: {', '.join(unknown)} not in {bench_root} (has {', '.join(available)})")
    return [H.load_task(bench_root / t, gene_list, require_patches=require_patches) for t in chosen]


def write_tables(results: Sequence[TaskResult]) -> dict[str, Any]:
    """``folds`` (task, fold, pearson_mean, alpha, n_components, n_train, n_test) and ``genes``
    (task, gene, pearson_mean, pearson per fold) as DataFrames."""
    import pandas as pd

    rows = [{"task": r.task, "fold": i, "pearson_mean": f.mean, "alpha": f.alpha, "n_components": f.n_components,
             "n_train": f.n_train, "n_test": f.n_test, "lsqr_iterations": f.lsqr_iterations}
            for r in results for i, f in enumerate(r.folds)]
    gene_rows = []
    for r in results:
        for g, gene in enumerate(r.genes):
            row = {"task": r.task, "gene": gene, "pearson_mean": float(r.per_gene[g])}
            row.update({f"fold{i}": float(f.pearson[g]) for i, f in enumerate(r.folds)})
            gene_rows.append(row)
    return {"folds": pd.DataFrame(rows), "genes": pd.DataFrame(gene_rows)}


@dataclass
class HestData:
    root: Path
    tasks: list[H.HestTask]


@register_suite
class HestSuite(Suite):
    """HEST-Benchmark (see the module doc)."""

    name = SUITE
    summary = "HEST-Benchmark: 50-gene expression from patch embeddings (PCA-256 + ridge, Pearson)."
    description = """HEST-Benchmark: predict 50 genes' log1p expression from patch embeddings (PCA-256 +
    ridge, per-gene Pearson on held-out patients), per task, per gene and on average.

    Embeddings are cached and also written in HEST's layout (OUT/hest-embeddings/<TASK>/<model>/...),
    so a rerun, or `--embeddings` later, reuses them. Results: a run directory (summary.json,
    folds.csv, genes.csv) and rows in OUT/results.sqlite (one per task plus "average").
    Options beyond the reference (--alpha cv, --no-pca, --pooling) are recorded and label
    the row."""
    examples = (
        "pathrobust run hest --model efficientnet-lite0-imagenet",
        "pathrobust run hest --model h0-mini --pooling cls+mean --data hest-bench/ --tasks IDC,PRAD",
        "pathrobust run hest --embeddings eval/ST_data_emb --encoder-name uni_v1 --data hest-bench/",
        "pathrobust run hest --model rgb-histogram --alpha cv --no-pca",
    )
    data_help = ("hest-bench root (one folder per task), or a fetched dataset name. Default: the synthetic "
                 "benchmark, built once into the cache.")
    features = FeaturesMode(help="Precomputed embeddings in HEST's cache layout DIR/<TASK>/<encoder>/<sample_id>.h5 "
                                 "instead of --model.", names=("--embeddings", "--features"), needs_data=True)
    Protocol = HestProtocol
    Options = HestOptions

    def build_synthetic(self, root: Path, overrides: dict[str, Any], progress: bool) -> Path:
        from dataclasses import asdict

        from pathrobust.data.synth_hest import SynthHestConfig, build_synth_hest

        return build_synth_hest(root, SynthHestConfig.from_mapping({**asdict(self.protocol.synthetic), **overrides}))

    def open_data(self, path: Path, options: HestOptions, embed: bool) -> HestData:
        # patches are needed only to embed them; --embeddings runs read the cache
        return HestData(path, select_tasks(path, options.tasks, self.protocol.protocol.gene_list,
                                           require_patches=embed, leaderboard=self.protocol.protocol.tasks))

    def data_fingerprint(self, path: Path, data: HestData, options: HestOptions) -> str:
        from pathrobust.data.identity import fingerprint_files

        files = []
        for task in data.tasks:
            files += sorted((task.root / "splits").glob("*.csv")) + [task.root / self.protocol.protocol.gene_list]
            files += [p for s in task.samples for p in (s.patches_path, s.expr_path)]
        return fingerprint_files(path, files, extra=",".join(t.name for t in data.tasks))

    def open_features(self, path: Path, data: HestData, options: HestOptions) -> Features:
        from pathrobust.data.identity import fingerprint_files

        if not path.is_dir():
            raise UserError(f"--embeddings {path}: not a directory")
        folder = resolve_encoder_folder(path, data.tasks, options.encoder_name)
        files = [H.embedding_path(path, t.name, folder, s.sample_id) for t in data.tasks for s in t.samples]
        attrs = H.read_embeddings(files[0]).attrs if files[0].is_file() else {}
        # a cache written by pathrobust carries the encoder's provenance: keep it on the rows
        record = {"spec_hash": str(attrs.get("spec_hash", "")), "weights_sha256": str(attrs.get("weights_sha256", "")),
                  "pooling": str(attrs.get("pooling", "")), "precision": str(attrs.get("precision", ""))}
        if attrs.get("input_size"):
            record["input_size"] = int(attrs["input_size"])
        return Features((path, folder), folder, fingerprint_files(path, files), record)

    def evaluate(self, ctx: RunContext) -> SuiteResult:
        options: HestOptions = ctx.options
        tasks = ctx.data.tasks
        if ctx.features is not None:
            embed_root, folder = ctx.features
        else:
            embed_root = Path(options.embed_dir) if options.embed_dir else ctx.run.out / "hest-embeddings"
            folder = encoder_folder(ctx.encoder, ctx.precision)
            for task in tasks:
                ctx.log.info("embedding %s with %s into %s", task.name, ctx.encoder.name, embed_root / task.name / folder)
                export_task(ctx, task, embed_root, folder)
        pooling = ctx.encoder.pooling if ctx.encoder is not None else options.pooling
        recorded = HestOptions(options.alpha, options.pca, pooling)
        results = []
        for task in tasks:
            result = evaluate_task(task, embed_root, folder, self.protocol, recorded,
                                   check_patches=ctx.encoder is not None, progress=ctx.progress)
            ctx.log.info("%s: pearson %.4f ± %.4f over %d folds", task.name, *result.summary, len(result.folds))
            results.append(result)
        average = float(np.mean([r.summary[0] for r in results]))
        summary = {
            "options": recorded.to_dict(), "embed_root": str(embed_root), "encoder_folder": folder,
            "tasks": {r.task: {"pearson_mean": r.summary[0], "pearson_std": r.summary[1],
                               "pearson_per_fold": r.fold_means, "alpha_per_fold": r.fold_alphas,
                               "undefined_genes_per_fold": [f.undefined_genes for f in r.folds],
                               "per_gene": {g: (float(v) if np.isfinite(v) else None)
                                            for g, v in zip(r.genes, r.per_gene)}} for r in results},
            "average": average,
            "reference": "mahmoodlab/HEST bench/benchmark.py + trainer.py",
        }
        row_options = recorded.to_dict()
        rows = [TaskRow(r.task, {"pearson_mean": r.summary[0], "pearson_std": r.summary[1], "n_folds": len(r.folds)},
                        row_options) for r in results]
        rows.append(TaskRow("average", {"pearson_mean": average, "n_tasks": len(results)}, row_options))
        return SuiteResult(headline=average, rows=rows, summary=summary, tables=write_tables(results))


def run_hest(*, bench_root: str | Path | None = None, out: str | Path = "runs", model: Any = None,
             embeddings: str | Path | None = None, encoder_name: str | None = None,
             tasks: Sequence[str] | None = None, options: HestOptions = HestOptions(), num_workers: int = 0,
             embed_dir: str | Path | None = None, **kwargs: Any) -> dict[str, Any]:
    """Run the HEST suite (:func:`pathrobust.suites.base.run_suite` with HEST's argument names:
    ``bench_root`` is the data, ``embeddings`` a precomputed HEST embedding cache)."""
    from dataclasses import replace

    from pathrobust.suites.base import run_suite

    opts = replace(options, tasks=tuple(tasks) if tasks else options.tasks,
                   encoder_name=encoder_name or options.encoder_name,
                   embed_dir=Path(embed_dir) if embed_dir else options.embed_dir)
    return run_suite(SUITE, model, bench_root, out, features=embeddings, pooling=kwargs.pop("pooling", options.pooling),
                     workers=num_workers, options=opts, **kwargs)
