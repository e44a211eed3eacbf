"""The EVA suite: linear-probe tile classification with kaiko-ai eva's offline protocol.

``run_eva`` reads the datasets (:mod:`pathrobust.data.eva`), embeds every split once through
the shared extractor with eva's resize-224 + centre-crop geometry (:class:`EvaResizeCrop`;
the encoder's own ``prepare`` is then a no-op at 224), caches the embeddings, trains the
``n_runs`` probes of each task together (:mod:`pathrobust.suites.eva_probe`), scores each
run's best checkpoint on the test split (else validation) and records one row per task plus
``average`` (mean over the tasks in the leaderboard's average — all but BACH).

Embedding cache: ``<out>/eva/<model>/embeddings/<pooling>-<precision>/<task>/<split>.h5``
(reused across runs; the extractor checks its provenance).
"""

from __future__ import annotations

import csv
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pathrobust.data.eva import EvaDataset, EvaResizeCrop, discover_tasks, read_task
from pathrobust.errors import UserError
from pathrobust.metrics.classification import mean_std
from pathrobust.store import RunRecord
from pathrobust.suites.base import SuiteRun, encoder_record_fields
from pathrobust.suites.eva_probe import ProbeConfig, ProbeResult, patience_in_epochs, train_linear_probes

PROTOCOL_FILE = Path(__file__).resolve().parent.parent / "configs" / "suites" / "eva.toml"
SUITE = "eva"


def load_protocol(path: str | os.PathLike | None = None) -> dict[str, Any]:
    path = Path(path) if path else PROTOCOL_FILE
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"{path}: cannot read the EVA protocol ({exc})") from None


def task_settings(protocol: dict[str, Any], task: str) -> dict[str, Any]:
    tasks = protocol["tasks"]
    return {**tasks["default"], **tasks.get(task, {})}


def probe_config(protocol: dict[str, Any], task: str, train_size: int, n_runs: int | None = None,
                 max_steps: int | None = None, seed: int | None = None) -> ProbeConfig:
    """The probe protocol of ``task`` for a training split of ``train_size`` embeddings."""
    p = protocol["probe"]
    t = task_settings(protocol, task)
    batch = int(p["batch_size"])
    if "patience" in t and "train_size" in t:
        patience = patience_in_epochs(int(t["patience"]), int(t["train_size"]), train_size, batch)
    else:
        patience = max(1, math.ceil(int(t["patience_steps"]) / math.ceil(train_size / batch)))
    return ProbeConfig(lr=float(p["lr"]), weight_decay=float(p["weight_decay"]), batch_size=batch,
                       max_steps=int(max_steps if max_steps is not None else p["max_steps"]),
                       warmup_epochs=int(p["warmup_epochs"]), warmup_factor=float(p["warmup_factor"]),
                       patience=patience, n_runs=int(n_runs if n_runs is not None else p["n_runs"]),
                       seed=int(seed if seed is not None else p["seed"]))


@dataclass
class TaskResult:
    """One task's outcome: per-run balanced accuracy on ``eval_split`` and the protocol used."""

    task: str
    eval_split: str
    balanced_accuracy: np.ndarray
    val_balanced_accuracy: np.ndarray
    best_epoch: np.ndarray
    steps: np.ndarray
    config: ProbeConfig
    sizes: dict[str, int] = field(default_factory=dict)
    in_average: bool = True

    @property
    def mean_std(self) -> tuple[float, float]:
        return mean_std(self.balanced_accuracy)

    def to_dict(self) -> dict[str, Any]:
        mean, std = self.mean_std
        return {"balanced_accuracy_mean": mean, "balanced_accuracy_std": std, "eval_split": self.eval_split,
                "runs": self.balanced_accuracy.tolist(), "val_runs": self.val_balanced_accuracy.tolist(),
                "best_epoch": self.best_epoch.tolist(), "steps": self.steps.tolist(),
                "patience_epochs": self.config.patience, "sizes": self.sizes, "in_average": self.in_average}


def evaluate_task(dataset: EvaDataset, features: dict[str, np.ndarray], config: ProbeConfig,
                  progress: bool = False, in_average: bool = True) -> TaskResult:
    """Train the probes on ``features["train"]``, early-stop on ``features["val"]``, score the
    best checkpoints on the evaluation split."""
    from pathrobust.progress import tile_progress

    labels = {name: split.labels for name, split in dataset.splits.items()}
    with tile_progress(f"{dataset.task} · {config.n_runs} probes", total=config.max_steps, unit="steps",
                       enabled=progress) as advance:
        result: ProbeResult = train_linear_probes(features["train"], labels["train"], features["val"], labels["val"],
                                                  dataset.num_classes, config, progress=advance)
    split = dataset.eval_split
    scores = result.balanced_accuracy(features[split], labels[split])
    return TaskResult(dataset.task, split, scores, result.val_balanced_accuracy, result.best_epoch, result.steps,
                      config, {k: int(len(v)) for k, v in labels.items()}, in_average)


def average_over_tasks(results: list[TaskResult]) -> tuple[float, float, np.ndarray] | None:
    """Leaderboard average over the tasks with ``in_average`` (mean of task means) and the
    sample std over runs of each run's task average (runs share seeds across tasks)."""
    used = [r for r in results if r.in_average]
    if not used:
        return None
    n = min(len(r.balanced_accuracy) for r in used)
    per_run = np.mean([r.balanced_accuracy[:n] for r in used], axis=0)
    return float(np.mean([r.mean_std[0] for r in used])), mean_std(per_run)[1], per_run


def _one_line(exc: UserError) -> UserError:
    """A UserError raised in a DataLoader worker arrives wrapped in a multi-line message
    with the worker's traceback; keep its own last line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if len(lines) <= 1:
        return exc
    last = lines[-1]
    prefix = "pathrobust.errors.UserError:"
    return UserError(last[len(prefix):].strip() if last.startswith(prefix) else last)


def embed_splits(encoder, dataset: EvaDataset, cache_dir: Path, size: int, batch_size: int, workers: int,
                 precision: str, device, overwrite: bool, progress: bool) -> dict[str, np.ndarray]:
    """Embeddings of every split (``{split: (N, D)}``), computed once into ``cache_dir``."""
    from pathrobust.extract import extract_features, load_features

    feats = {}
    for name, split in dataset.splits.items():
        source = EvaResizeCrop(split.source, size)
        path = cache_dir / dataset.task / f"{name}.h5"
        try:
            extract_features(encoder, source, path, batch_size=batch_size, num_workers=workers, precision=precision,
                             device=device, overwrite=overwrite, progress=progress)
        except UserError as exc:
            raise _one_line(exc) from None
        ff = load_features(path)
        if len(ff.features) != len(split.labels):
            raise UserError(f"{path}: {len(ff.features)} embeddings for {len(split.labels)} tiles; pass --overwrite")
        feats[name] = ff.features
    return feats


def run_eva(model: str, data: str | os.PathLike | None = None, tasks: list[str] | None = None,
            out: str | os.PathLike = "runs", *, pooling: str | None = None, weights: str | None = None,
            batch_size: int = 64, workers: int = 0, precision: str = "auto", device: str = "auto",
            n_runs: int | None = None, max_steps: int | None = None, seed: int | None = None,
            overwrite: bool = False, progress: bool = True, db_path: str | os.PathLike | None = None,
            protocol_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run the EVA suite for one encoder; returns the summary (also ``summary.json``).

    ``data=None`` uses the synthetic CRC/MHIST datasets (built once in the cache)."""
    from pathrobust.data.synth_eva import write_synth_eva
    from pathrobust.encoders.base import build_encoder
    from pathrobust.extract import resolve_device, resolve_precision

    protocol = load_protocol(protocol_path)
    data_root = Path(data) if data is not None else write_synth_eva()
    datasets = {t: read_task(t, root) for t, root in discover_tasks(data_root, tasks).items()}
    dev = resolve_device(device)
    encoder = build_encoder(model, pooling=pooling, weights=weights, device=dev)
    precision = resolve_precision(precision, dev, encoder.spec)
    size = int(protocol["transform"]["size"])
    configs = {t: probe_config(protocol, t, len(d.splits["train"].labels), n_runs, max_steps, seed)
               for t, d in datasets.items()}
    run_config = {
        "pooling": encoder.pooling, "precision": precision, "spec_hash": encoder.spec.hash,
        "weights_sha256": encoder.weights_sha256 or "", "transform": f"resize{size}-crop{size}",
        "data": {t: d.fingerprint() for t, d in datasets.items()},
        "probe": {t: vars(c) for t, c in configs.items()},
    }
    run = SuiteRun(out, SUITE, encoder.name, run_config, provenance=encoder.provenance(), db_path=db_path)
    if run.finished and not overwrite:
        return run.summary()
    safe = run.dir.parent.name
    cache = Path(out) / SUITE / safe / "embeddings" / f"{encoder.pooling}-{precision}"
    results = []
    for task, dataset in datasets.items():
        feats = embed_splits(encoder, dataset, cache, size, batch_size, workers, precision, dev, overwrite, progress)
        settings = task_settings(protocol, task)
        result = evaluate_task(dataset, feats, configs[task], progress, bool(settings["in_average"]))
        run.log.info("%s: balanced accuracy %.4f ± %.4f on %s", task, *result.mean_std, result.eval_split)
        results.append(result)
    return _finish(run, encoder, results, data_root)


def _finish(run, encoder, results: list[TaskResult], data_root: Path) -> dict[str, Any]:
    spec = encoder.spec
    common = dict(suite=SUITE, model=spec.name, run_id="auto", **encoder_record_fields(encoder, run.config["precision"]))
    records = []
    for r in results:
        mean, std = r.mean_std
        records.append(RunRecord(task=r.task, metrics={"balanced_accuracy_mean": mean, "balanced_accuracy_std": std},
                                 data_fingerprint=run.config["data"][r.task], options=r.to_dict(), **common))
    summary: dict[str, Any] = {"suite": SUITE, "model": spec.name, "data": str(data_root),
                               "tasks": {r.task: r.to_dict() for r in results}}
    avg = average_over_tasks(results)
    if avg is not None:
        mean, std, per_run = avg
        tasks = [r.task for r in results if r.in_average]
        summary["average"] = {"balanced_accuracy_mean": mean, "balanced_accuracy_std": std, "tasks": tasks,
                              "runs": per_run.tolist()}
        records.append(RunRecord(task="average", metrics={"balanced_accuracy_mean": mean, "balanced_accuracy_std": std},
                                 options={"tasks": tasks}, **common))
    _write_per_run(run.dir / "per_run.csv", results)
    return run.finish(summary, records)


def _write_per_run(path: Path, results: list[TaskResult]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["task", "run", "seed", "eval_split", "balanced_accuracy", "val_balanced_accuracy", "best_epoch",
                    "steps", "patience_epochs"])
        for r in results:
            for i, score in enumerate(r.balanced_accuracy):
                w.writerow([r.task, i, r.config.seed + i, r.eval_split, f"{score:.6f}",
                            f"{r.val_balanced_accuracy[i]:.6f}", int(r.best_epoch[i]), int(r.steps[i]), r.config.patience])
    os.replace(tmp, path)
