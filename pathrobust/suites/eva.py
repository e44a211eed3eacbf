"""The EVA suite: kaiko-ai eva's patch classification (linear probes) and dense segmentation
(a decoder on patch tokens) on one leaderboard.

Patch tasks (BACH, CRC, MHIST, PCam, BreakHis, class-folder datasets;
:mod:`pathrobust.data.eva`): every split is embedded once through the shared extractor with
eva's resize-224 + centre-crop geometry (:class:`EvaResizeCrop`; the encoder's own
``prepare`` is then a no-op at 224), the ``n_runs`` probes of each task train together
(:mod:`pathrobust.probes.linear`), each run's best checkpoint is scored on the test split
(else validation); one row per task records balanced accuracy, plus ``average`` (mean over
the tasks in the leaderboard's average — all but BACH).

Dense tasks (CoNSeP, MoNuSAC, image + mask folders, the synthetic nuclei set;
:mod:`pathrobust.data.eva_dense`): each split's patch-token grids are computed once
(:mod:`pathrobust.encoders.grid`), eva's ``ConvDecoderWithImage`` is trained ``n_runs``
times on them (:mod:`pathrobust.probes.decoder`) and scored with MONAI's Dice (per image,
foreground classes present, then the mean over images); rows record ``dice_mean`` /
``dice_std`` and the other segmentation metrics, never balanced accuracy, so the leaderboard
shows them in their own "(Dice)" columns and keeps them out of the average. On data with
simulated renderings (the synthetic set) a dense task also measures pathrobust's own
segmentation consistency: the Dice between the predictions on the same tiles under each
simulated staining/scanner and on the reference rendering (``dense_consistency.png``).
Encoders without patch tokens (colour histograms) skip the dense tasks with a note, or stop
with a one-line error when a dense task was asked for by name.

Embeddings and grids share the run's feature cache
(:class:`pathrobust.extract.FeatureCache`),
``<out>/eva/<model>/embeddings/<pooling>-<precision>-<key>/<task>/<split>.h5`` and
``<dataset>/<split>.grids.h5``, reused across runs and recomputed when the tiles change.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pathrobust.config import at_least, each, one_of, positive, probability
from pathrobust.data.eva import TASK_ALIASES, EvaDataset, EvaResizeCrop, discover_datasets, read_task
from pathrobust.data.eva_dense import DenseTask, read_consep, read_generic_dense, read_monusac
from pathrobust.errors import UserError
from pathrobust.metrics.classification import mean_std
from pathrobust.metrics.segmentation import IGNORE_MODES
from pathrobust.probes.decoder import DecoderConfig
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


DENSE_READERS = ("consep", "monusac", "generic", "synthetic")  # pathrobust.data.eva_dense.DENSE_LAYOUTS
GRID_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class DenseTaskProtocol:
    """One dense task (``[dense.tasks.<name>]``): the layout that provides it (``reader``),
    eva's early-stopping patience in validation epochs, and optional overrides of ``[dense]``
    values (unset: the ``[dense]`` value). ``variant_of``: a labelled variant of another task on
    the same data, run only when named in ``--tasks``. ``train_views``: MoNuSAC's training
    random-resized crops, drawn once per image (cached grids cannot redraw them per step)."""

    reader: str = field(metadata=one_of(*DENSE_READERS))
    patience: int = field(metadata=positive())
    variant_of: str | None = None
    train_views: int | None = field(default=None, metadata=at_least(0))
    ignore_mode: str | None = field(default=None, metadata=one_of(*IGNORE_MODES))
    size: int | None = field(default=None, metadata=at_least(16))
    batch_size: int | None = field(default=None, metadata=positive())
    eval_batch_size: int | None = field(default=None, metadata=positive())
    max_steps: int | None = field(default=None, metadata=positive())
    n_runs: int | None = field(default=None, metadata=positive())


@dataclass(frozen=True)
class DenseProtocol:
    """``[dense]``: eva 0.4.5's online segmentation protocol (decoder, loss, optimiser,
    schedule, runs) and the dense tasks. ``[dense.tasks.default]`` serves image + mask
    datasets without a table of their own, ``[dense.tasks.synthetic]`` the synthetic set."""

    size: int = field(metadata=at_least(16))
    lr: float = field(metadata=positive())
    weight_decay: float = field(metadata=at_least(0))
    betas: tuple[float, ...] = field(metadata=each(probability()))
    eps: float = field(metadata=positive())
    batch_size: int = field(metadata=positive())
    eval_batch_size: int = field(metadata=positive())
    max_steps: int = field(metadata=positive())
    warmup_epochs: int = field(metadata=at_least(0))
    warmup_factor: float = field(metadata=probability())
    n_runs: int = field(metadata=positive())
    seed: int
    hidden_dims: tuple[int, ...] = field(metadata=each(positive()))
    smooth_nr: float = field(metadata=at_least(0))
    smooth_dr: float = field(metadata=at_least(0))
    ignore_mode: str = field(metadata=one_of(*IGNORE_MODES))
    grid_dtype: str = field(metadata=one_of(*GRID_DTYPES))
    tasks: dict[str, DenseTaskProtocol]

    def __post_init__(self) -> None:
        if len(self.betas) != 2:
            raise UserError(f"'dense.betas' must hold 2 values, got {len(self.betas)}")
        if len(self.hidden_dims) != 3:
            raise UserError(f"'dense.hidden_dims' must hold 3 values (eva: [64, 32, 32]), got {len(self.hidden_dims)}")
        for reserved, reader in (("default", "generic"), ("synthetic", "synthetic")):
            if reserved not in self.tasks or self.tasks[reserved].reader != reader:
                raise UserError(f"'dense.tasks.{reserved}' with reader = \"{reader}\" is missing")
        for name, task in self.tasks.items():
            base = self.tasks.get(task.variant_of) if task.variant_of else None
            if task.variant_of and (base is None or base.reader != task.reader or base.variant_of):
                raise UserError(f"'dense.tasks.{name}.variant_of' must name a task of the same reader "
                                f"({task.reader}) that is not itself a variant")
            if task.reader == "monusac" and task.train_views is None:
                raise UserError(f"'dense.tasks.{name}.train_views' is missing (required for reader = \"monusac\")")

    def tasks_for(self, layout: str, dataset: str) -> list[tuple[str, DenseTaskProtocol]]:
        """The tasks a dataset of ``layout`` named ``dataset`` offers: every task of that
        reader (CoNSeP, MoNuSAC), or the folder's own task with its table (else ``default`` /
        ``synthetic``)."""
        if layout in ("generic", "synthetic"):
            own = self.tasks.get(dataset)
            return [(dataset, own if own is not None and own.reader == layout else self.tasks[layout if layout ==
                                                                                               "synthetic" else "default"])]
        return [(name, t) for name, t in self.tasks.items() if t.reader == layout]


@dataclass(frozen=True)
class SyntheticEva:
    crc_train_per_class: int = field(metadata={**at_least(1), "flag": "--crc-train",
                                               "help": "CRC-like training tiles per class (9 classes)."})
    crc_val_per_class: int = field(metadata={**at_least(1), "flag": "--crc-val",
                                             "help": "CRC-like validation tiles per class."})
    mhist_tiles: int = field(metadata={**at_least(10), "flag": "--mhist", "help": "MHIST-like tiles in all."})
    mhist_test_fraction: float = field(metadata=probability())
    mhist_ssa_fraction: float = field(metadata=probability())
    dense_tile: int = field(metadata={**at_least(28), "flag": "--dense-tile",
                                      "help": "Tile size (px) of the synthetic nuclei segmentation set."})
    dense_train_tiles: int = field(metadata={**at_least(1), "flag": "--dense-train",
                                             "help": "Nuclei segmentation training tiles."})
    dense_val_tiles: int = field(metadata={**at_least(1), "flag": "--dense-val",
                                           "help": "Nuclei segmentation validation tiles (also rendered under each "
                                                   "simulated staining/scanner)."})
    dense_test_tiles: int = field(metadata={**at_least(1), "flag": "--dense-test",
                                            "help": "Nuclei segmentation test tiles (each under one simulated rendering)."})
    dense_renderings: list[str] = field(metadata={"flag": "--dense-renderings",
                                                  "help": "Simulated renderings, <staining>-<scanner>."})
    seed: int = field(metadata={"help": "Random seed."})


@dataclass(frozen=True)
class EvaProtocol:
    transform: TransformProtocol
    probe: ProbeProtocol
    tasks: dict[str, TaskProtocol]
    dense: DenseProtocol
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

    tasks: tuple[str, ...] | None = option("--tasks", "Comma-separated tasks: bach, crc, mhist, patch_camelyon, "
                                           "breakhis, consep, monusac (monusac_clean: the clean-ignore variant), "
                                           "or a class-folder or image+mask dataset's name; default: all found "
                                           "(variants only when named).", parse=_split_names, variant=False,
                                           names=("-t",))
    runs: int | None = option("--runs", "Runs per task, probes and decoders (protocol: 5).", min=1)
    max_steps: int | None = option("--max-steps", "Probe optimiser steps per run at most (protocol: 12,500).", min=1)
    dense_max_steps: int | None = option("--dense-max-steps", "Decoder optimiser steps per run at most, dense tasks "
                                         "(protocol: 2,000; the synthetic set: its own).", min=1)
    seed: int | None = option("--seed", "Seed of run 0; run r uses seed + r (protocol: 42); the decoders' seed.",
                              variant=False)


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


def dense_config(protocol: DenseProtocol, task: DenseTaskProtocol, n_runs: int | None = None,
                 max_steps: int | None = None, seed: int | None = None) -> DecoderConfig:
    """The decoder protocol of a dense task: ``[dense]`` with the task's overrides, then the
    run options'."""
    def pick(override, base):
        return base if override is None else override

    return DecoderConfig(lr=protocol.lr, weight_decay=protocol.weight_decay, betas=tuple(protocol.betas),
                         eps=protocol.eps, batch_size=pick(task.batch_size, protocol.batch_size),
                         eval_batch_size=pick(task.eval_batch_size, protocol.eval_batch_size),
                         max_steps=pick(max_steps, pick(task.max_steps, protocol.max_steps)),
                         warmup_epochs=protocol.warmup_epochs, warmup_factor=protocol.warmup_factor,
                         patience=task.patience, n_runs=pick(n_runs, pick(task.n_runs, protocol.n_runs)),
                         seed=pick(seed, protocol.seed), hidden_dims=tuple(protocol.hidden_dims),
                         smooth_nr=protocol.smooth_nr, smooth_dr=protocol.smooth_dr,
                         ignore_mode=pick(task.ignore_mode, protocol.ignore_mode))


# -- the data ----------------------------------------------------------------------------------
@dataclass
class DenseEntry:
    """A dense task to run: its row name, protocol table, data and the dataset's folder."""

    task: str
    protocol: DenseTaskProtocol
    data: DenseTask
    root: Path


@dataclass
class EvaData:
    """What :meth:`EvaSuite.open_data` found: patch tasks (root, dataset), dense tasks, and
    whether the tasks were named with ``--tasks``."""

    patch: dict[str, tuple[Path, EvaDataset]]
    dense: dict[str, DenseEntry]
    named: bool = False
    _prints: dict[Path, str] = field(default_factory=dict, repr=False)

    def roots(self) -> dict[str, Path]:
        return {**{t: root for t, (root, _) in self.patch.items()}, **{t: e.root for t, e in self.dense.items()}}

    def fingerprint(self, task: str) -> str:
        """Content fingerprint of the task's dataset folder (computed once per folder)."""
        root = self.roots()[task]
        if root not in self._prints:
            from pathrobust.data.identity import fingerprint_tree

            self._prints[root] = fingerprint_tree(root)
        return self._prints[root]


def _read_dense(layout: str, root: Path, size: int, task: DenseTaskProtocol, seed: int) -> DenseTask:
    if layout == "consep":
        return read_consep(root, size)
    if layout == "monusac":
        return read_monusac(root, size, train_views=task.train_views, seed=seed)
    return read_generic_dense(root, size)


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


# -- dense results ------------------------------------------------------------------------------
@dataclass
class DenseResult:
    """One dense task's outcome (:class:`pathrobust.probes.dense.DenseEvaluation`) with the
    protocol it ran under and the grid it ran on."""

    task: str
    evaluation: Any  # pathrobust.probes.dense.DenseEvaluation
    config: DecoderConfig
    eval_split: str
    grid: tuple[int, int, int]
    sizes: dict[str, int]

    @property
    def runs(self) -> list:
        return self.evaluation.result.runs

    def run_consistency(self) -> dict[str, list[float]]:
        """Rendering -> each run's segmentation consistency (mean over tiles) against the
        reference rendering (``val``)."""
        return self.evaluation.result.consistency_per_run("val", list(self.evaluation.consistency))

    def metrics(self) -> dict[str, float | None]:
        """The results-DB row: ``<score>_mean`` / ``<score>_std`` over runs for every
        segmentation score (``dice`` first), and ``consistency_mean`` / ``_std`` (each run's
        mean over renderings) where the data has renderings."""
        out: dict[str, float | None] = {}
        for key, (mean, std) in self.evaluation.scores.items():
            out[f"{key}_mean"], out[f"{key}_std"] = _finite(mean), _finite(std)
        per_rendering = self.run_consistency()
        if per_rendering:
            per_run = np.nanmean(np.array(list(per_rendering.values()), dtype=np.float64), axis=0)
            out["consistency_mean"], out["consistency_std"] = (_finite(v) for v in mean_std(per_run))
        return out

    def to_dict(self) -> dict[str, Any]:
        ev = self.evaluation
        return {**self.metrics(), "eval_split": self.eval_split, "grid": list(self.grid), "sizes": self.sizes,
                "runs": [_finite(r.get("dice")) for r in ev.per_run],
                "val_runs": [_finite(r.scores["dice"]) for r in self.runs],
                "best_epoch": [r.best_epoch for r in self.runs], "steps": [r.steps for r in self.runs],
                "consistency": {k: [_finite(v) for v in ms] for k, ms in ev.consistency.items()},
                "render_dice": {k: [_finite(v) for v in ms] for k, ms in ev.render_dice.items()},
                "patience_epochs": self.config.patience, "max_steps": self.config.max_steps,
                "batch_size": self.config.batch_size, "ignore_mode": self.config.ignore_mode}


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _num(value: Any) -> str:
    value = _finite(value)
    return "" if value is None else f"{value:.6f}"


DENSE_RUN_COLUMNS = ["task", "run", "eval_split", "dice", "dice_ignore_empty_false", "mean_iou", "dice_micro",
                     "dice_macro", "dice_weighted", "val_dice", "best_epoch", "epochs", "steps", "patience_epochs"]


def dense_tables(results: list[DenseResult]) -> dict[str, Any]:
    """Per-item tables of the dense tasks: ``dense_per_run`` (each run's scores on the
    reported split and how it stopped), ``dense_per_class`` (each run's Dice per class, as
    eva's class-wise MONAI Dice, background included; empty = no image has the class) and,
    with renderings, ``dense_consistency`` (each run's consistency and Dice per rendering)."""
    import pandas as pd

    runs, classes, consistency = [], [], []
    for r in results:
        names = r.evaluation.result.labels.class_names
        ignore = r.evaluation.result.labels.ignore_index
        per_rendering = r.run_consistency()
        for i, (run, scores) in enumerate(zip(r.runs, r.evaluation.per_run)):
            runs.append({"task": r.task, "run": i, "eval_split": r.eval_split,
                         **{k: _num(scores[k]) for k in DENSE_RUN_COLUMNS[3:9]}, "val_dice": _num(run.scores["dice"]),
                         "best_epoch": run.best_epoch, "epochs": run.epochs, "steps": run.steps,
                         "patience_epochs": r.config.patience})
            classes += [{"task": r.task, "run": i, "class": name, "dice": _num(scores[f"dice_{name}"])}
                        for k, name in enumerate(names) if k != ignore]
            for rendering, values in per_rendering.items():
                consistency.append({"task": r.task, "run": i, "rendering": rendering.removeprefix("val_"),
                                    "consistency_dice": _num(values[i]),
                                    "dice": _num(run.split_scores[rendering]["dice"]),
                                    "reference_dice": _num(run.scores["dice"])})
    tables = {"dense_per_run": pd.DataFrame(runs, columns=DENSE_RUN_COLUMNS),
              "dense_per_class": pd.DataFrame(classes, columns=["task", "run", "class", "dice"])}
    if consistency:
        tables["dense_consistency"] = pd.DataFrame(consistency, columns=["task", "run", "rendering", "consistency_dice",
                                                                         "dice", "reference_dice"])
    return tables


CONSISTENCY_FIGURE = "dense_consistency.png"


def consistency_figure(results: list[DenseResult], path: Path, model: str) -> Path | None:
    """``dense_consistency.png``: per dense task with renderings, (left) the segmentation
    consistency of each simulated rendering against the reference rendering's predictions
    and (right) each rendering's Dice against the masks next to the reference's, mean ± std
    over runs. None when no task has renderings."""
    from matplotlib.figure import Figure

    from pathrobust import atomic

    shown = [r for r in results if r.evaluation.consistency]
    if not shown:
        return None
    fig = Figure(figsize=(9.0, 2.9 * len(shown) + 0.6))
    axes = fig.subplots(len(shown), 2, squeeze=False)
    for (left, right), r in zip(axes, shown):
        ev = r.evaluation
        names = [k.removeprefix("val_") for k in ev.consistency]
        means = [ev.consistency[k][0] for k in ev.consistency]
        stds = [ev.consistency[k][1] for k in ev.consistency]
        left.bar(names, means, yerr=stds, color="#4c72b0", capsize=3)
        left.set_ylim(0, 1.05)
        left.set_ylabel("Dice vs reference\nprediction")
        left.set_title(f"{r.task}: consistency under simulated renderings", fontsize=9)
        ref_mean, ref_std = ev.result.summary(None)["dice"]
        dice = [ref_mean] + [ev.render_dice[k][0] for k in ev.render_dice]
        dice_std = [ref_std] + [ev.render_dice[k][1] for k in ev.render_dice]
        right.bar(["reference"] + names, dice, yerr=dice_std, color=["#55a868"] + ["#c44e52"] * len(names), capsize=3)
        right.set_ylim(0, 1.05)
        right.set_ylabel("Dice vs masks")
        right.set_title(f"{r.task}: Dice per rendering (same tiles)", fontsize=9)
        for ax in (left, right):
            ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(f"{model} · segmentation consistency (pathrobust's own measure, not part of eva; "
                 f"mean ± std over {len(shown[0].runs)} runs)", fontsize=9)
    fig.tight_layout()
    atomic.save_figure(fig, path, dpi=100)
    return path


@register_suite
class EvaSuite(Suite):
    """EVA patch classification and dense segmentation (see the module doc)."""

    name = SUITE
    summary = "EVA: kaiko-ai eva's patch classification (linear probes) and segmentation (decoder on patch tokens)."
    description = """EVA: kaiko-ai eva's protocols: linear-probe tile classification (balanced accuracy,
    mean ± std over 5 runs; the average leaves BACH out) and semantic segmentation with eva's
    decoder on the encoder's patch tokens (CoNSeP, MoNuSAC, image + mask data; MONAI Dice,
    shown apart from balanced accuracy and never averaged with it).

    Embeddings and token grids are computed once per split and cached under --out; the
    probes of a task train together. Encoders without patch tokens skip the dense tasks.
    Protocol values: suites/eva.toml."""
    examples = (
        "pathrobust run eva --model efficientnet-lite0-imagenet",
        "pathrobust run eva --model h0-mini --data /data/eva --tasks crc,mhist,patch_camelyon",
        "pathrobust run eva --model h0-mini --data /data/eva --tasks consep,monusac",
        "pathrobust run eva --model uni --data /data/eva --tasks bach --runs 5 --json",
    )
    data_help = ("Data root holding bach/, crc/, mhist/, patch_camelyon/, breakhis/, consep/, monusac/ (eva's "
                 "layouts), train/+val/ class folders or image+mask folders with a dataset.json, or a fetched "
                 "dataset name; default: the synthetic CRC/MHIST/nuclei sets.")
    Protocol = EvaProtocol
    Options = EvaOptions

    def build_synthetic(self, root: Path, overrides: dict[str, Any], progress: bool) -> Path:
        from pathrobust.data.synth_eva import SynthEvaConfig, write_synth_eva

        values = {**asdict(self.protocol.synthetic), **overrides}
        values["dense_renderings"] = tuple(values["dense_renderings"])
        return write_synth_eva(root, SynthEvaConfig(**values))

    def open_data(self, path: Path, options: EvaOptions, embed: bool) -> EvaData:
        dense_proto = self.protocol.dense
        offered: dict[str, tuple[str, Path, DenseTaskProtocol | None]] = {}
        for name, (kind, root) in discover_datasets(path).items():
            if kind.startswith("dense:"):
                for task, proto in dense_proto.tasks_for(kind.removeprefix("dense:"), name):
                    offered.setdefault(task, (kind, root, proto))
            else:
                offered.setdefault(name, (kind, root, None))
        if options.tasks:
            lowered = {name.lower(): name for name in offered}
            wanted = list(dict.fromkeys(TASK_ALIASES.get(t.lower(), t.lower()) for t in options.tasks))
            absent = [t for t in wanted if t not in lowered]
            if absent:
                raise UserError(f"--tasks {','.join(absent)}: not found under {path} (found: {', '.join(offered)})")
            chosen = [lowered[t] for t in wanted]
        else:
            chosen = [t for t, (_, _, proto) in offered.items() if proto is None or proto.variant_of is None]
        patch, dense, read = {}, {}, {}
        for task in chosen:
            kind, root, proto = offered[task]
            if proto is None:  # a patch task: eva's layout (task = its name) or class folders
                patch[task] = (root, read_task(task, root))
                continue
            layout = kind.removeprefix("dense:")
            size = proto.size or dense_proto.size
            key = (layout, root, size, proto.train_views)
            if key not in read:  # MoNuSAC and its variant share one reading
                read[key] = _read_dense(layout, root, size, proto, dense_proto.seed)
            dense[task] = DenseEntry(task, proto, read[key], root)
        return EvaData(patch, dense, named=bool(options.tasks))

    def data_fingerprint(self, path: Path, data: EvaData, options: EvaOptions) -> str:
        return ",".join(f"{task}={data.fingerprint(task)}" for task in data.roots())

    def evaluate(self, ctx: RunContext) -> SuiteResult:
        from pathrobust.encoders.grid import grid_problem

        options: EvaOptions = ctx.options
        data: EvaData = ctx.data
        dense, notes, not_applicable = dict(data.dense), [], {}
        if dense:  # before any work: an encoder without patch tokens cannot run them
            problem = grid_problem(ctx.encoder)
            if problem and data.named:
                raise UserError(f"--tasks {','.join(dense)}: {problem}")
            if problem:
                not_applicable = {task: problem for task in dense}
                notes.append(f"dense tasks {', '.join(dense)}: not applicable, {problem} (no row recorded)")
                ctx.log.warning("%s", notes[-1])
                dense = {}
        size = self.protocol.transform.size
        results = []
        for task, (root, dataset) in data.patch.items():
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
        dense_results = [self._dense_task(ctx, entry) for entry in dense.values()]

        rows = [TaskRow(r.task, {"balanced_accuracy_mean": r.mean_std[0], "balanced_accuracy_std": r.mean_std[1]},
                        r.to_dict(), data_fingerprint=data.fingerprint(r.task)) for r in results]
        rows += [TaskRow(r.task, r.metrics(), {k: v for k, v in r.to_dict().items() if not k.endswith(("_mean", "_std"))},
                         data_fingerprint=data.fingerprint(r.task)) for r in dense_results]
        summary: dict[str, Any] = {"data": str(ctx.data_path), "transform": f"resize{size}-crop{size}",
                                   "tasks": {r.task: r.to_dict() for r in results},
                                   "dense": {r.task: r.to_dict() for r in dense_results}}
        if not_applicable:
            summary["not_applicable"] = not_applicable
        if notes:
            summary["notes"] = notes
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
        tables = {"per_run": per_run_table(results)} if results else {}
        artefacts = {}
        if dense_results:
            tables.update(dense_tables(dense_results))
            figure = consistency_figure(dense_results, ctx.dir / CONSISTENCY_FIGURE, ctx.encoder.name)
            if figure is not None:
                artefacts["dense_consistency"] = figure.name
        return SuiteResult(headline=headline, rows=rows, summary=summary, tables=tables, artefacts=artefacts)

    def _dense_task(self, ctx: RunContext, entry: DenseEntry) -> DenseResult:
        from pathrobust.encoders.grid import token_grid_shape
        from pathrobust.probes.dense import evaluate_dense_task
        from pathrobust.progress import tile_progress

        options: EvaOptions = ctx.options
        config = dense_config(self.protocol.dense, entry.protocol, options.runs, options.dense_max_steps, options.seed)
        task = entry.data
        dtype = self.protocol.dense.grid_dtype

        def grid_file(tiles, split: str) -> Path:  # the run's feature cache, shared by a task's variants
            return ctx.cache.grids(tiles, f"{task.name}/{split}", dtype)

        with tile_progress(f"{entry.task} · {config.n_runs} decoders", total=config.n_runs * config.max_steps,
                           unit="steps", enabled=ctx.progress) as advance:
            ev = evaluate_dense_task(ctx.encoder, task, config, grid_file, device=ctx.device, dtype=dtype,
                                     progress=advance)
        ev.task = entry.task
        result = DenseResult(entry.task, ev, config, task.eval_split, token_grid_shape(ctx.encoder),
                             {name: len(tiles) for name, tiles in task.splits.items()})
        ctx.log.info("%s: Dice %.4f ± %.4f on %s", entry.task, *ev.scores["dice"], task.eval_split)
        return result


def run_eva(model: Any, data: str | Path | None = None, tasks: list[str] | None = None, out: str | Path = "runs", *,
            n_runs: int | None = None, max_steps: int | None = None, seed: int | None = None,
            **kwargs: Any) -> dict[str, Any]:
    """Run the EVA suite (:func:`pathrobust.suites.base.run_suite` with EVA's argument names)."""
    from pathrobust.suites.base import run_suite

    return run_suite(SUITE, model, data, out, tasks=tuple(tasks) if tasks else None, runs=n_runs,
                     max_steps=max_steps, seed=seed, **kwargs)
