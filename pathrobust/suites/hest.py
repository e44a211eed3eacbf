"""HEST-Benchmark runner: embeddings -> per-fold linear probe -> task, gene and average scores.

``run_hest`` takes a hest-bench root (see :mod:`pathrobust.data.hest`) and either an encoder
(embeddings computed through the shared resumable extractor and stored in HEST's cache
layout, ``<embed_root>/<TASK>/<encoder>/<sample_id>.h5``) or an existing HEST embedding
cache. Per fold it runs :func:`pathrobust.metrics.regression.fit_predict_fold` with the
parameters of ``configs/suites/hest.toml``; a task's score is the mean (± population std)
of its folds' mean Pearson, a gene's score the mean over folds, the leaderboard number the
unweighted mean over tasks (HEST ``merge_fold_results`` and ``benchmark_grid``).

Options beyond the reference — ``alpha="cv"`` (or a fixed number), ``pca=False`` and the
pooling — are recorded in the run's config, provenance and every results-DB row
(``RunRecord.options``, with a ``variant`` label such as ``alpha=cv,no-pca``).
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pathrobust.data import hest as H
from pathrobust.errors import UserError
from pathrobust.metrics import regression as R
from pathrobust.store import safe_name
from pathrobust.suites.base import SuiteRun, encoder_record_fields

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "suites" / "hest.toml"
SUITE = "hest"


def load_protocol(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The suite TOML (``[protocol]``, ``[alpha_cv]``, ``[synthetic]``)."""
    p = Path(path) if path else CONFIG
    try:
        return tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"{p}: suite config not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{p}: not valid TOML ({exc})") from None


@dataclass(frozen=True)
class HestOptions:
    """How this run departs from (or keeps) the reference protocol."""

    alpha: str = "reference"   # "reference", "cv" or a number
    pca: bool = True
    pooling: str | None = None

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
    folds: list[R.FoldScore]
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


def embed_task(encoder, task: H.HestTask, embed_root: Path, folder: str, *, batch_size: int = 64,
               num_workers: int = 0, precision: str = "auto", device: str = "auto", overwrite: bool = False,
               progress: bool = True) -> None:
    """Embed every sample of ``task`` into ``<embed_root>/<TASK>/<folder>/<sample_id>.h5``.

    Forward passes go through :func:`pathrobust.extract.extract_features` (batched, resumable:
    an interrupted sample continues from its finished chunks under ``.extract/``); the result
    is then rewritten in HEST's layout with the extractor's provenance as attributes. A sample
    whose HEST file already holds the same model/weights/pooling/precision/tiles is skipped."""
    from pathrobust.data.tiles import H5Tiles
    from pathrobust.extract import IDENTITY_ATTRS, extract_features, feature_attrs, load_features, resolve_device, \
        resolve_precision

    dev = resolve_device(device)
    prec = resolve_precision(precision, dev, encoder.spec)
    for sample in task.samples:
        out = H.embedding_path(embed_root, task.name, folder, sample.sample_id)
        source = H5Tiles(sample.patches_path, name=sample.sample_id)
        want = {k: str(v) for k, v in feature_attrs(encoder, source, prec).items() if k in IDENTITY_ATTRS}
        if out.is_file() and not overwrite:
            have = H.read_embeddings(out).attrs
            diff = [k for k in IDENTITY_ATTRS if str(have.get(k)) != want[k]]
            if not diff:
                continue
            raise UserError(f"{out}: already holds embeddings with a different {', '.join(diff)}; "
                            "pass --overwrite or another --embed-dir")
        work = out.parent / ".extract" / out.name
        work.parent.mkdir(parents=True, exist_ok=True)
        extract_features(encoder, source, work, batch_size=batch_size, num_workers=num_workers, precision=prec,
                         device=dev, overwrite=overwrite, progress=progress)
        feats = load_features(work)
        if feats.tile_ids is None:
            raise UserError(f"{sample.patches_path}: no 'barcode' dataset; HEST patches need one barcode per patch")
        H.write_embeddings(out, feats.features, feats.tile_ids, feats.coords, feats.attrs)
        work.unlink()
    shutil.rmtree(embed_root / task.name / folder / ".extract", ignore_errors=True)


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


def evaluate_task(task: H.HestTask, embed_root: Path, folder: str, protocol: dict[str, Any],
                  options: HestOptions, *, check_patches: bool = True, progress: bool = True) -> TaskResult:
    """Every fold of ``task`` on the cached embeddings (see module doc)."""
    from pathrobust.progress import tile_progress

    proto, cv = protocol["protocol"], protocol["alpha_cv"]
    data = {s.sample_id: _sample_data(task, s, embed_root, folder, proto["log1p"], check_patches)
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
            common = dict(pca=options.pca, n_components=proto["pca_components"],
                          random_state=proto["pca_random_state"])
            if options.alpha == "cv":
                groups = np.concatenate([[s.sample_id] * len(data[s.sample_id][0]) for s in fold.train])
                if len(set(groups)) < 2:
                    raise UserError(f"--alpha cv: fold {fold.index} of {task.name} has one train sample; "
                                    "grouped cross-validation needs at least 2")
                alpha, _ = R.choose_alpha_cv(X_tr, Y_tr, groups, cv["alphas"], n_splits=cv["inner_folds"], **common)
            elif options.alpha == "reference":
                alpha = None
            else:
                alpha = float(options.alpha)
            score = R.fit_predict_fold(X_tr, Y_tr, X_te, Y_te, alpha=alpha, alpha_numerator=proto["alpha_numerator"],
                                       tol=proto["ridge_tol"], max_iter=proto["ridge_max_iter"], **common)
            score.predictions = None  # not kept: a fold's predictions are as large as its targets
            folds.append(score)
            alphas.append(score.alpha)
            advance(1)
    return TaskResult(task.name, task.genes, folds, alphas)


def _cache_attrs(embed_root: Path, task: H.HestTask, folder: str) -> dict[str, Any]:
    first = H.embedding_path(embed_root, task.name, folder, task.samples[0].sample_id)
    return H.read_embeddings(first).attrs


# -- the run -------------------------------------------------------------------------------
def data_fingerprint(tasks: Sequence[H.HestTask]) -> str:
    """Hash of what defines the benchmark: split CSVs, gene lists, and the patch/expression
    files' names and sizes."""
    h = hashlib.sha256()
    for task in tasks:
        h.update(task.name.encode())
        h.update("\0".join(task.genes).encode())
        for csv_file in sorted((task.root / "splits").glob("*.csv")):
            h.update(csv_file.name.encode() + csv_file.read_bytes())
        for s in task.samples:
            for p in (s.patches_path, s.expr_path):
                h.update(f"{p.name}:{p.stat().st_size if p.exists() else -1}".encode())
    return h.hexdigest()[:16]


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


def write_tables(run_dir: Path, results: Sequence[TaskResult]) -> None:
    """``folds.csv`` (task, fold, pearson_mean, alpha, n_components, n_train, n_test) and
    ``genes.csv`` (task, gene, pearson_mean, pearson per fold), written atomically."""
    rows = [{"task": r.task, "fold": i, "pearson_mean": f.mean, "alpha": f.alpha, "n_components": f.n_components,
             "n_train": f.n_train, "n_test": f.n_test, "lsqr_iterations": f.lsqr_iterations}
            for r in results for i, f in enumerate(r.folds)]
    _write_csv(run_dir / "folds.csv", rows)
    gene_rows = []
    for r in results:
        for g, gene in enumerate(r.genes):
            row = {"task": r.task, "gene": gene, "pearson_mean": float(r.per_gene[g])}
            row.update({f"fold{i}": float(f.pearson[g]) for i, f in enumerate(r.folds)})
            gene_rows.append(row)
    _write_csv(run_dir / "genes.csv", gene_rows)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def run_hest(*, bench_root: str | os.PathLike, out: str | os.PathLike, model: str | None = None,
             embeddings: str | os.PathLike | None = None, encoder_name: str | None = None,
             tasks: Sequence[str] | None = None, options: HestOptions = HestOptions(), weights: str | None = None,
             embed_dir: str | os.PathLike | None = None, batch_size: int = 64, num_workers: int = 0,
             precision: str = "auto", device: str = "auto", overwrite: bool = False, progress: bool = True,
             db_path: str | os.PathLike | None = None, protocol: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the suite (see module doc) and return its summary (also in ``summary.json``)."""
    from pathrobust.store import RunRecord

    bench_root, out = Path(bench_root), Path(out)
    embeddings = Path(embeddings) if embeddings is not None else None

    if (model is None) == (embeddings is None):
        raise UserError("run hest: give exactly one of --model and --embeddings")
    protocol = protocol or load_protocol()
    proto = protocol["protocol"]
    selected = select_tasks(bench_root, tasks, proto["gene_list"], require_patches=model is not None,
                            leaderboard=proto["tasks"])
    fingerprint = data_fingerprint(selected)
    encoder = None
    if model is not None:
        from pathrobust.encoders.base import build_encoder
        from pathrobust.extract import resolve_device, resolve_precision

        dev = resolve_device(device)
        encoder = build_encoder(model, pooling=options.pooling, weights=weights, device=dev)
        precision = resolve_precision(precision, dev, encoder.spec)
        options = HestOptions(options.alpha, options.pca, encoder.pooling)
        embed_root = Path(embed_dir) if embed_dir else out / "hest-embeddings"
        folder = encoder_folder(encoder, precision)
        label = encoder.name
        ident = {"spec_hash": encoder.spec.hash, "weights_sha256": encoder.weights_sha256 or "",
                 "pooling": encoder.pooling, "precision": precision}
    else:
        embed_root = Path(embeddings)
        if not embed_root.is_dir():
            raise UserError(f"--embeddings {embed_root}: not a directory")
        folder = resolve_encoder_folder(embed_root, selected, encoder_name)
        label = folder
        ident = {"embeddings": str(embed_root.resolve()), "encoder_folder": folder}
    config = {"tasks": [t.name for t in selected], "data_fingerprint": fingerprint, "options": options.to_dict(),
              "protocol": proto, **ident}
    if options.alpha == "cv":
        config["alpha_cv"] = protocol["alpha_cv"]
    provenance = {"bench_root": str(bench_root.resolve()), "embed_root": str(embed_root.resolve()),
                  "encoder_folder": folder, "options": options.to_dict(),
                  "reference": "mahmoodlab/HEST bench/benchmark.py + trainer.py"}
    if encoder is not None:
        provenance["encoder"] = encoder.provenance()
    run = SuiteRun(out, SUITE, label + (f"[{options.variant}]" if options.variant else ""), config, provenance,
                   db_path=db_path)
    if run.finished and not overwrite:
        run.log.info("already finished; reusing %s", run.dir)
        return run.summary()

    if encoder is not None:
        for task in selected:
            run.log.info("embedding %s with %s into %s", task.name, encoder.name, embed_root / task.name / folder)
            embed_task(encoder, task, embed_root, folder, batch_size=batch_size, num_workers=num_workers,
                       precision=precision, device=device, overwrite=overwrite, progress=progress)
    results = []
    for task in selected:
        result = evaluate_task(task, embed_root, folder, protocol, options, check_patches=encoder is not None,
                               progress=progress)
        mean, std = result.summary
        run.log.info("%s: pearson %.4f ± %.4f over %d folds", task.name, mean, std, len(result.folds))
        results.append(result)
    write_tables(run.dir, results)
    average = float(np.mean([r.summary[0] for r in results]))
    summary = {
        "suite": SUITE, "model": label, "variant": options.variant, "options": options.to_dict(),
        "tasks": {r.task: {"pearson_mean": r.summary[0], "pearson_std": r.summary[1],
                           "pearson_per_fold": r.fold_means, "alpha_per_fold": r.fold_alphas,
                           "per_gene": dict(zip(r.genes, map(float, r.per_gene)))} for r in results},
        "average": average,
    }
    base = dict(suite=SUITE, model=label, data_fingerprint=fingerprint, options=options.to_dict(),
                precision=precision if encoder is not None else "")
    if encoder is not None:
        base.update(encoder_record_fields(encoder, precision))
    else:  # a cache written by pathrobust carries the encoder's provenance: keep it on the rows
        attrs = _cache_attrs(embed_root, selected[0], folder)
        base.update(spec_hash=str(attrs.get("spec_hash", "")), weights_sha256=str(attrs.get("weights_sha256", "")),
                    pooling=options.pooling or str(attrs.get("pooling", "")), precision=str(attrs.get("precision", "")))
        if attrs.get("input_size"):
            base["input_size"] = int(attrs["input_size"])
    records = [RunRecord(task=r.task, metrics={"pearson_mean": r.summary[0], "pearson_std": r.summary[1],
                                               "n_folds": len(r.folds)}, run_id="auto", **base) for r in results]
    records.append(RunRecord(task="average", metrics={"pearson_mean": average, "n_tasks": len(results)},
                             run_id="auto", **base))
    return run.finish(summary, records)
