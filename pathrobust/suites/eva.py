"""The EVA suite: linear-probe tile classification with kaiko-ai eva's offline protocol.

``run_eva`` reads the datasets (:mod:`pathrobust.data.eva`), embeds every split once through
the shared extractor with eva's resize-224 + centre-crop geometry (:class:`EvaResizeCrop`;
the encoder's own ``prepare`` is then a no-op at 224), caches the embeddings, trains the
``n_runs`` probes of each task together (:mod:`pathrobust.probes.linear`), scores each
run's best checkpoint on the test split (else validation) and records one row per task plus
``average`` (mean over the tasks in the leaderboard's average — all but BACH).

Embeddings: the run's feature cache (:class:`pathrobust.extract.FeatureCache`),
``<out>/eva/<model>/embeddings/<pooling>-<precision>-<key>/<task>/<split>.h5``, reused across runs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pathrobust.config import at_least, positive, probability
from pathrobust.data.eva import EvaDataset, EvaResizeCrop, discover_tasks, read_task
from pathrobust.errors import UserError
from pathrobust.metrics.classification import mean_std
from pathrobust.probes.linear import ProbeConfig, ProbeResult, patience_in_epochs, train_linear_probes
from pathrobust.suites.base import RunContext, Suite, SuiteResult, TaskRow, option, register_suite

SUITE = "eva"


# -- the protocol (suites/eva.toml) ------------------------------------------------------------
@dataclass(frozen=True)
class TransformProtocol:
    size: int = field(metadata=at_least(16))


@dataclass(frozen=True)
class ProbeProtocol:
    lr: float = field(metadata=positive())
    weight_decay: float = field(metadata=at_least(0))
    batch_size: int = field(metadata=positive())
    max_steps: int = field(metadata=positive())
    warmup_epochs: int = field(metadata=at_least(0))
    warmup_factor: float = field(metadata=probability())
    n_runs: int = field(metadata=positive())
    seed: int


@dataclass(frozen=True)
class TaskProtocol:
    """Early stopping per task: eva's published patience in epochs with the training-set size
    it was set for, or (class-folder datasets) a patience budget in steps."""

    in_average: bool
    patience: int | None = field(default=None, metadata=positive())
    train_size: int | None = field(default=None, metadata=positive())
    patience_steps: int | None = field(default=None, metadata=positive())

    def __post_init__(self) -> None:
        if (self.patience is None) != (self.train_size is None):
            raise UserError("'tasks.*.patience' and 'train_size' go together")
        if self.patience is None and self.patience_steps is None:
            raise UserError("'tasks.*' needs patience + train_size, or patience_steps")


@dataclass(frozen=True)
class SyntheticEva:
    crc_train_per_class: int = field(metadata={**at_least(1), "flag": "--crc-train",
                                               "help": "CRC-like training tiles per class (9 classes)."})
    crc_val_per_class: int = field(metadata={**at_least(1), "flag": "--crc-val",
                                             "help": "CRC-like validation tiles per class."})
    mhist_tiles: int = field(metadata={**at_least(10), "flag": "--mhist", "help": "MHIST-like tiles in all."})
    mhist_test_fraction: float = field(metadata=probability())
    mhist_ssa_fraction: float = field(metadata=probability())
    seed: int = field(metadata={"help": "Random seed."})


@dataclass(frozen=True)
class EvaProtocol:
    transform: TransformProtocol
    probe: ProbeProtocol
    tasks: dict[str, TaskProtocol]
    synthetic: SyntheticEva

    def __post_init__(self) -> None:
        if "default" not in self.tasks:
            raise UserError("'tasks.default' is missing (the settings of class-folder datasets)")

    def task(self, name: str) -> TaskProtocol:
        return self.tasks.get(name, self.tasks["default"])


def _split_names(value: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in value.split(",") if t.strip())


@dataclass(frozen=True)
class EvaOptions:
    """``pathrobust run eva`` options (None = the protocol's value)."""

    tasks: tuple[str, ...] | None = option("--tasks", "Comma-separated tasks (bach, crc, mhist, patch_camelyon, "
                                           "breakhis, or a class-folder dataset's name); default: all found.",
                                           parse=_split_names, variant=False, names=("-t",))
    runs: int | None = option("--runs", "Probe runs per task (protocol: 5).", min=1)
    max_steps: int | None = option("--max-steps", "Optimiser steps per run at most (protocol: 12,500).", min=1)
    seed: int | None = option("--seed", "Seed of run 0; run r uses seed + r (protocol: 42).", variant=False)


def probe_config(protocol: EvaProtocol, task: str, train_size: int, n_runs: int | None = None,
                 max_steps: int | None = None, seed: int | None = None) -> ProbeConfig:
    """The probe protocol of ``task`` for a training split of ``train_size`` embeddings."""
    p = protocol.probe
    t = protocol.task(task)
    if t.patience is not None:
        patience = patience_in_epochs(t.patience, t.train_size, train_size, p.batch_size)
    else:
        patience = max(1, math.ceil(t.patience_steps / math.ceil(train_size / p.batch_size)))
    return ProbeConfig(lr=p.lr, weight_decay=p.weight_decay, batch_size=p.batch_size,
                       max_steps=max_steps if max_steps is not None else p.max_steps,
                       warmup_epochs=p.warmup_epochs, warmup_factor=p.warmup_factor, patience=patience,
                       n_runs=n_runs if n_runs is not None else p.n_runs, seed=seed if seed is not None else p.seed)


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


def per_run_table(results: list[TaskResult]):
    """One row per (task, run): the score on the evaluation split and how the run stopped."""
    import pandas as pd

    rows = [{"task": r.task, "run": i, "seed": r.config.seed + i, "eval_split": r.eval_split,
             "balanced_accuracy": f"{score:.6f}", "val_balanced_accuracy": f"{r.val_balanced_accuracy[i]:.6f}",
             "best_epoch": int(r.best_epoch[i]), "steps": int(r.steps[i]), "patience_epochs": r.config.patience}
            for r in results for i, score in enumerate(r.balanced_accuracy)]
    return pd.DataFrame(rows, columns=["task", "run", "seed", "eval_split", "balanced_accuracy",
                                       "val_balanced_accuracy", "best_epoch", "steps", "patience_epochs"])


@register_suite
class EvaSuite(Suite):
    """EVA linear-probe tile classification (see the module doc)."""

    name = SUITE
    summary = "EVA: linear-probe tile classification with kaiko-ai eva's protocol (balanced accuracy)."
    description = """EVA: linear-probe tile classification with kaiko-ai eva's protocol (balanced accuracy,
    mean ± std over 5 runs; the average leaves BACH out).

    Embeddings are computed once per split (eva's resize-224 + centre-crop) and cached under
    --out; the probes of a task train together. Protocol values: suites/eva.toml."""
    examples = (
        "pathrobust run eva --model efficientnet-lite0-imagenet",
        "pathrobust run eva --model h0-mini --data /data/eva --tasks crc,mhist,patch_camelyon",
        "pathrobust run eva --model uni --data /data/eva --tasks bach --runs 5 --json",
    )
    data_help = ("Data root holding bach/, crc/, mhist/, patch_camelyon/, breakhis/ (eva's layouts) or train/+val/ "
                 "class folders, or a fetched dataset name; default: the synthetic CRC/MHIST sets.")
    Protocol = EvaProtocol
    Options = EvaOptions

    def build_synthetic(self, root: Path, overrides: dict[str, Any], progress: bool) -> Path:
        from pathrobust.data.synth_eva import SynthEvaConfig, write_synth_eva

        return write_synth_eva(root, SynthEvaConfig(**{**asdict(self.protocol.synthetic), **overrides}))

    def open_data(self, path: Path, options: EvaOptions, embed: bool) -> dict[str, tuple[Path, EvaDataset]]:
        tasks = list(options.tasks) if options.tasks else None
        return {t: (root, read_task(t, root)) for t, root in discover_tasks(path, tasks).items()}

    def data_fingerprint(self, path: Path, data: dict[str, tuple[Path, EvaDataset]], options: EvaOptions) -> str:
        return ",".join(f"{task}={_task_fingerprint(root)}" for task, (root, _) in data.items())

    def evaluate(self, ctx: RunContext) -> SuiteResult:
        options: EvaOptions = ctx.options
        size = self.protocol.transform.size
        results, fingerprints = [], {}
        for task, (root, dataset) in ctx.data.items():
            config = probe_config(self.protocol, task, len(dataset.splits["train"].labels), options.runs,
                                  options.max_steps, options.seed)
            feats = {}
            for name, split in dataset.splits.items():
                ff = ctx.cache.load(EvaResizeCrop(split.source, size), f"{task}/{name}")
                if len(ff.features) != len(split.labels):
                    raise UserError(f"{root}: {len(ff.features)} embeddings for {len(split.labels)} tiles of {name}; "
                                    "pass --overwrite")
                feats[name] = ff.features
            result = evaluate_task(dataset, feats, config, ctx.progress, self.protocol.task(task).in_average)
            ctx.log.info("%s: balanced accuracy %.4f ± %.4f on %s", task, *result.mean_std, result.eval_split)
            results.append(result)
            fingerprints[task] = _task_fingerprint(root)
        rows = [TaskRow(r.task, {"balanced_accuracy_mean": r.mean_std[0], "balanced_accuracy_std": r.mean_std[1]},
                        r.to_dict(), data_fingerprint=fingerprints[r.task]) for r in results]
        summary: dict[str, Any] = {"data": str(ctx.data_path), "transform": f"resize{size}-crop{size}",
                                   "tasks": {r.task: r.to_dict() for r in results}}
        headline = None
        avg = average_over_tasks(results)
        if avg is not None:
            mean, std, per_run = avg
            tasks = [r.task for r in results if r.in_average]
            summary["average"] = {"balanced_accuracy_mean": mean, "balanced_accuracy_std": std, "tasks": tasks,
                                  "runs": per_run.tolist()}
            rows.append(TaskRow("average", {"balanced_accuracy_mean": mean, "balanced_accuracy_std": std},
                                {"tasks": tasks}))
            headline = mean
        return SuiteResult(headline=headline, rows=rows, summary=summary, tables={"per_run": per_run_table(results)})


def _task_fingerprint(root: Path) -> str:
    from pathrobust.data.identity import fingerprint_tree

    return fingerprint_tree(root)


def run_eva(model: Any, data: str | Path | None = None, tasks: list[str] | None = None, out: str | Path = "runs", *,
            n_runs: int | None = None, max_steps: int | None = None, seed: int | None = None,
            **kwargs: Any) -> dict[str, Any]:
    """Run the EVA suite (:func:`pathrobust.suites.base.run_suite` with EVA's argument names)."""
    from pathrobust.suites.base import run_suite

    return run_suite(SUITE, model, data, out, tasks=tuple(tasks) if tasks else None, runs=n_runs,
                     max_steps=max_steps, seed=seed, **kwargs)
