"""The slide-level suite: ABMIL on whole-slide feature bags (eva's slide tasks) and the
cross-acquisition concordance of slide scores (the H0-mini paper's BreastBm analysis).

``pathrobust run slides --model M [--data MANIFEST.csv | EVA_ROOT] [--features DIR]``

Data (``--data``), one task per manifest or eva dataset:

* a slide manifest CSV (:mod:`pathrobust.data.slide_manifest`: ``slide_id``, ``path`` and/or
  ``features``, ``label``, ``split`` or ``fold``, ``patient_id``; ``specimen_id`` +
  ``acquisition`` turn on robustness), or a folder holding ``manifest.csv``; the task is named
  after the CSV (``er_status.csv`` -> ``er_status``) and tiled as ``[tasks.manifest]`` says;
* eva's layouts: a Camelyon16 root (``training/``, ``testing/``) or PANDA root
  (``train_images/``), or a folder holding them: tasks ``camelyon16_small`` / ``panda_small``;
* default: the synthetic multi-acquisition slides (:mod:`pathrobust.data.synth_slides`,
  task ``synth_atypia``).

Bags. With ``--model`` every slide is tiled on eva's foreground grid
(:class:`~pathrobust.data.slides.SlideTiles`, capped at the task's ``max_tiles``) and embedded
through the run's feature cache (``<out>/slides/<model>/embeddings/.../<task>/<slide>.h5``:
``features``, level-0 ``coords``, TRIDENT/CLAM geometry attributes; resumable, keyed by the
encoder's identity and each slide's fingerprint). With ``--features DIR`` the bags are read
instead (``<slide_id>.h5``, TRIDENT ``features_*/``, CLAM ``h5_files/`` or ``pt_files/``; a
manifest's ``features`` column wins), capped once with the sampler's seed.

Training (:mod:`pathrobust.probes.abmil`): eva's ABMIL protocol, ``n_runs`` heads trained at
once. Splits: a manifest whose every row has a ``fold`` is cross-validated (fold k = test,
the next fold = validation, the others train; every slide gets an out-of-fold score from
run r's head of its fold); otherwise the ``split`` column (eva's layouts: train/val/test).
Metrics (:func:`pathrobust.metrics.classification.slide_metrics`) at the ``[metrics]``
threshold per run, then mean and sample sd over runs: balanced accuracy (the headline), AUROC,
F1, accuracy, precision, recall.

Robustness (manifests with ``specimen_id`` + ``acquisition``; binary labels): the heads train
on the reference acquisition's slides only and score every acquisition's test slides; per
acquisition the AUROC and its drop from the reference; Lin's CCC of the slide scores
(positive-class probabilities) between the reference and each acquisition and over all pairs;
mean and minimum with a specimen-bootstrap interval (:mod:`pathrobust.metrics.concordance`);
a staining x scanner heatmap ``ccc_heatmap.png``.

Near-constant heads. Lin's CCC of scores that barely vary says nothing about concordance (two
almost flat score vectors can agree "perfectly" or not at all by noise). A run whose scores on
the reference acquisition have a population sd below ``[robustness] min_score_sd`` is left out
of the CCC (its AUROC still counts); the summary, the log and the rows say how many were left
out (``ccc_runs_excluded``) and record the sd (``score_sd_mean``, ``score_sd_min``). When every
run is flat the CCC is *not informative*: ``ccc_*`` are empty and ``ccc_informative`` is 0.

Rows: one per task (``balanced_accuracy_mean``, ``balanced_accuracy_std``, ``auroc_mean``,
``auroc_std``, ``f1_mean``, ...; robustness tasks add ``ccc_mean``, ``ccc_min``,
``ccc_ci_low``/``ccc_ci_high``, ``auc_drop_max``, ...) and ``average`` (mean over tasks, and the
robustness task's concordance: the leaderboard counts ``ccc_mean`` as robustness). Tables in
the run directory: ``per_run.csv``, ``slide_scores.csv``, ``acquisitions.csv``.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pathrobust.config import at_least, each, in_range, non_negative, one_of, positive, probability
from pathrobust.data.plism import SCANNERS, STAININGS
from pathrobust.errors import UserError
from pathrobust.suites.base import (Features, FeaturesMode, RunContext, Suite, SuiteResult, TaskRow, option,
                                   register_suite)

SUITE = "slides"
LAYOUTS = ("camelyon16", "panda", "manifest", "synthetic")
MANIFEST_NAME = "manifest.csv"
HEATMAP = "ccc_heatmap.png"
HEATMAP_AXES = ("staining", "scanner", "acquisition")
METRICS = ("balanced_accuracy", "auroc", "f1", "accuracy", "precision", "recall")
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def _size_check(value: str) -> str | None:
    return None if _SIZE.match(value) and min(map(int, _SIZE.match(value).groups())) >= 1 \
        else f"must be 'COLUMNSxROWS' such as '3x2', got {value!r}"


def parse_size(value: str) -> tuple[int, int]:
    """``"3x2"`` -> ``(3, 2)``."""
    match = _SIZE.match(str(value).strip())
    if not match:
        raise UserError(f"{value!r}: expected COLUMNSxROWS such as 3x2")
    return int(match.group(1)), int(match.group(2))


# -- the protocol (suites/slides.toml) ---------------------------------------------------------
@dataclass(frozen=True)
class TilingProtocol:
    """eva's ``ForegroundGridSampler`` and mask (the tile size and µm/px are per task)."""

    min_foreground: float = field(metadata=probability())
    shuffle: bool
    seed: int
    saturation_threshold: int = field(metadata=in_range(0, 255))


@dataclass(frozen=True)
class ABMILProtocol:
    projected_size: int = field(metadata=positive())
    attention_hidden: int = field(metadata=positive())
    mlp_hidden: list[int] = field(metadata=each(positive()))
    lr: float = field(metadata=positive())
    betas: list[float] = field(metadata={"check": lambda v: None if len(v) == 2 and all(0 <= b < 1 for b in v)
                                         else f"must be two numbers in [0, 1), got {v}"})
    eps: float = field(metadata=positive())
    weight_decay: float = field(metadata=non_negative())
    warmup_epochs: int = field(metadata=non_negative())
    warmup_factor: float = field(metadata=in_range(1e-9, 1.0))
    batch_size: int = field(metadata=positive())
    max_epochs: int = field(metadata=positive())
    patience: int = field(metadata=positive())
    n_runs: int = field(metadata=positive())
    seed: int


@dataclass(frozen=True)
class MetricsProtocol:
    threshold: float = field(metadata=probability())


@dataclass(frozen=True)
class TaskProtocol:
    """One slide task: where its slides come from and how they are tiled and padded.

    ``classes``: the label vocabulary in index order (binary: negative, positive); ``[]``
    (manifest layout only) = the manifest's labels, sorted, unless ``--classes`` says.
    PANDA also needs ``small`` (PANDASmall's 0.1/0.05/0.05 split) and ``split_seed``."""

    layout: str = field(metadata=one_of(*LAYOUTS))
    classes: list[str]
    tile_size: int = field(metadata=at_least(16))
    target_mpp: float = field(metadata=positive())
    max_tiles: int = field(metadata=positive())
    pad_size: int = field(metadata=positive())
    small: bool | None = None
    split_seed: int | None = None

    def __post_init__(self) -> None:
        if self.pad_size < self.max_tiles:
            raise UserError(f"'tasks.*.pad_size' {self.pad_size} is below 'max_tiles' {self.max_tiles} "
                            "(eva pads bags to the tile cap)")
        if (self.layout == "panda") != (self.small is not None and self.split_seed is not None):
            raise UserError("'tasks.*.small' and 'split_seed' are needed by (and only by) layout \"panda\"")
        if not self.classes and self.layout != "manifest":
            raise UserError(f"'tasks.*.classes' must not be empty for layout {self.layout!r}")
        if len(set(self.classes)) != len(self.classes):
            raise UserError(f"'tasks.*.classes' repeats a class: {self.classes}")


@dataclass(frozen=True)
class RobustnessProtocol:
    reference: str
    n_bootstrap: int = field(metadata=non_negative())
    ci_level: float = field(metadata=in_range(0.5, 0.999))
    bootstrap_seed: int
    min_score_sd: float = field(metadata=non_negative())
    heatmap_rows: str = field(metadata=one_of(*HEATMAP_AXES))
    heatmap_columns: str = field(metadata=one_of(*HEATMAP_AXES))


@dataclass(frozen=True)
class SyntheticSlides:
    """``[synthetic]``: :class:`pathrobust.data.synth_slides.SynthSlidesConfig` (sizes as
    ``"COLUMNSxROWS"`` strings, so ``data synth-slides --islands 3x2,2x2`` works)."""

    specimens: int = field(metadata={**at_least(6), "help": "Physical specimens (balanced labels)."})
    stainings: list[str] = field(metadata={**each(one_of(*STAININGS)), "help": "Simulated stainings (PLISM names)."})
    scanners: list[str] = field(metadata={**each(one_of(*SCANNERS)), "help": "Simulated scanners (PLISM names)."})
    grid: str = field(metadata={"check": _size_check, "help": "Canvas size in cells, COLUMNSxROWS."})
    cell: int = field(metadata={**at_least(32), "help": "Cell side in level-0 pixels (one tile per tissue cell)."})
    mpp: float = field(metadata={**positive(), "help": "µm/px of level 0."})
    islands: list[str] = field(metadata={**each({"check": _size_check}),
                                         "help": "Tissue islands in cells (COLUMNSxROWS); the first is the atypia "
                                                 "one."})
    zoom: float = field(metadata={**at_least(1), "help": "Magnification of the atypia island (nuclear enlargement)."})
    folds: int = field(metadata={**at_least(3), "help": "Cross-validation folds (by specimen)."})
    specks: int = field(metadata={**non_negative(), "help": "Dust specks per slide (below the foreground threshold)."})
    seed: int = field(metadata={"help": "Random seed."})


@dataclass(frozen=True)
class SlidesProtocol:
    tiling: TilingProtocol
    abmil: ABMILProtocol
    metrics: MetricsProtocol
    tasks: dict[str, TaskProtocol]
    robustness: RobustnessProtocol
    synthetic: SyntheticSlides

    def __post_init__(self) -> None:
        for layout in ("manifest", "synthetic"):
            if sum(t.layout == layout for t in self.tasks.values()) != 1:
                raise UserError(f"'tasks': exactly one task must have layout \"{layout}\"")

    def layout_task(self, layout: str) -> str:
        return next(name for name, t in self.tasks.items() if t.layout == layout)


def _split_names(value: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in value.split(",") if t.strip())


@dataclass(frozen=True)
class SlidesOptions:
    """``pathrobust run slides`` options (None = the protocol's value)."""

    tasks: tuple[str, ...] | None = option("--tasks", "With an eva data root: comma-separated tasks "
                                           "(camelyon16_small, panda_small); default: all found.",
                                           parse=_split_names, variant=False, names=("-t",))
    classes: tuple[str, ...] | None = option("--classes", "A manifest's labels in class order, comma-separated "
                                             "(binary: negative,positive); default: the task's, else sorted.",
                                             parse=_split_names, variant=False)
    reference: str | None = option("--reference", "Reference acquisition of a robustness manifest (the heads "
                                   "train on it); default from suites/slides.toml.", variant=False)
    runs: int | None = option("--runs", "ABMIL runs (protocol: 20).", min=1)
    max_epochs: int | None = option("--max-epochs", "Epochs per run at most (protocol: 100).", min=1)
    max_tiles: int | None = option("--max-tiles", "Tiles per slide at most (and the pad size); protocol: the "
                                   "task's (Camelyon16-small 1,000, PANDA-small 200).", min=1)
    slide_mpp: float | None = option("--slide-mpp", "µm/px of level 0 for slides without that metadata.",
                                     variant=False)


# -- data --------------------------------------------------------------------------------------
@dataclass
class SlideTask:
    """One task of a run: its name (the results row), protocol, manifest, and — robustness —
    the reference acquisition. ``sources``: each slide's tiles (when an encoder embeds them)."""

    name: str
    protocol: TaskProtocol
    manifest: Any  # pathrobust.data.slide_manifest.SlideManifest
    root: Path
    files: list[Path]
    reference: str | None = None
    sources: dict[str, Any] = field(default_factory=dict)

    @property
    def robustness(self) -> bool:
        return self.reference is not None


@dataclass
class SlidesData:
    path: Path
    tasks: list[SlideTask]


def _identify(path: Path) -> str | None:
    if all((path / p).is_dir() for p in ("training/normal", "training/tumor", "testing/images")):
        return "camelyon16"
    if (path / "train_images").is_dir():
        return "panda"
    return None


def find_layouts(root: Path) -> dict[str, Path]:
    """eva layouts at ``root``, in its sub-folders, or one level further (eva's
    ``panda/prostate-cancer-grade-assessment``): ``{layout: folder}`` (first found)."""
    own = _identify(root)
    if own is not None:
        return {own: root}
    found: dict[str, Path] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for folder in [sub, *sorted(p for p in sub.iterdir() if p.is_dir() and not p.name.startswith("."))]:
            kind = _identify(folder)
            if kind is not None:
                found.setdefault(kind, folder)
                break
    return found


def task_tiling(protocol: SlidesProtocol, task: TaskProtocol, options: SlidesOptions):
    from pathrobust.data.slides import Tiling

    t = protocol.tiling
    return Tiling(tile_size=task.tile_size, target_mpp=task.target_mpp, max_tiles=options.max_tiles or task.max_tiles,
                  min_foreground=t.min_foreground, shuffle=t.shuffle, seed=t.seed,
                  saturation_threshold=t.saturation_threshold)


def pad_size(task: TaskProtocol, options: SlidesOptions) -> int:
    return options.max_tiles or task.pad_size


def _manifest_task(protocol: SlidesProtocol, csv: Path, options: SlidesOptions, embed: bool) -> SlideTask:
    from pathrobust.data.slide_manifest import check_robustness, read_slide_manifest
    from pathrobust.data.synth_slides import DONE_MARKER

    synthetic = (csv.parent / DONE_MARKER).is_file() and csv.name == MANIFEST_NAME
    key = protocol.layout_task("synthetic" if synthetic else "manifest")
    task = protocol.tasks[key]
    classes = options.classes or (tuple(task.classes) if task.classes else None)
    if classes is not None and (len(set(classes)) != len(classes) or len(classes) < 2):
        raise UserError(f"--classes {','.join(classes)}: need >= 2 distinct classes")
    # precomputed bags need no slide file (the slides may live where the bags were made)
    manifest = read_slide_manifest(csv, classes, check_files=embed)
    if manifest.num_classes < 2:
        raise UserError(f"{csv}: column 'label': one class ({manifest.classes[0]}); a slide task needs >= 2")
    reference = None
    if any(r.specimen_id is not None or r.acquisition is not None for r in manifest.records):
        reference = options.reference or protocol.robustness.reference
        if reference not in manifest.acquisitions:
            raise UserError(f"{csv}: column 'acquisition': no slide under the reference acquisition '{reference}' "
                            f"(found: {', '.join(manifest.acquisitions)}); pass --reference")
        check_robustness(manifest, reference)
        if manifest.num_classes != 2:
            raise UserError(f"{csv}: column 'label': {manifest.num_classes} classes; cross-acquisition concordance "
                            "needs a binary label (drop 'specimen_id'/'acquisition' for a multiclass task)")
    elif options.reference is not None:
        raise UserError(f"--reference {options.reference}: {csv} has no 'specimen_id'/'acquisition' columns")
    name = key if synthetic else csv.stem
    files = [csv] + [r.path for r in manifest.records if r.path is not None and (embed or r.path.is_file())]
    return SlideTask(name, task, manifest, csv.parent, files, reference)


def _layout_task(protocol: SlidesProtocol, name: str, root: Path) -> SlideTask:
    from pathrobust.data.slide_manifest import PANDA_LABELS_CSV, camelyon16_manifest, panda_manifest

    task = protocol.tasks[name]
    if task.layout == "camelyon16":
        manifest = camelyon16_manifest(root)
        extra = [root / "testing" / "reference.csv"]
    else:
        manifest = panda_manifest(root, small=bool(task.small), seed=int(task.split_seed))
        extra = [root / PANDA_LABELS_CSV]
    if tuple(manifest.classes) != tuple(task.classes):
        raise UserError(f"'tasks.{name}.classes' {task.classes} differ from the {task.layout} reader's "
                        f"{list(manifest.classes)}")
    return SlideTask(name, task, manifest, root, extra + [r.path for r in manifest.records])


def open_slides_data(protocol: SlidesProtocol, path: Path, options: SlidesOptions, embed: bool = True) -> SlidesData:
    """The tasks at ``path`` (see the module doc), validated; no slide is opened yet.
    ``embed``: slide files must exist (False: precomputed bags are read instead)."""
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise UserError(f"--data {path}: expected a slide manifest (.csv) or a folder")
        if options.tasks:
            raise UserError("--tasks: only with an eva data root (a manifest is one task)")
        return SlidesData(path, [_manifest_task(protocol, path, options, embed)])
    if (path / MANIFEST_NAME).is_file():
        if options.tasks:
            raise UserError("--tasks: only with an eva data root (a manifest is one task)")
        return SlidesData(path, [_manifest_task(protocol, path / MANIFEST_NAME, options, embed)])
    layouts = find_layouts(path)
    if not layouts:
        raise UserError(f"--data {path}: no slide manifest ({MANIFEST_NAME} or a .csv) and no eva slide dataset "
                        "(Camelyon16: training/ + testing/; PANDA: train_images/)")
    names = [n for n, t in protocol.tasks.items() if t.layout in layouts]
    if options.tasks:
        unknown = [t for t in options.tasks if t not in names]
        if unknown:
            raise UserError(f"--tasks {','.join(unknown)}: not found under {path} "
                            f"(found: {', '.join(names) or 'none'})")
        names = [n for n in names if n in options.tasks]
    if options.classes or options.reference:
        raise UserError("--classes and --reference apply to a slide manifest, not to eva's layouts")
    return SlidesData(path, [_layout_task(protocol, n, layouts[protocol.tasks[n].layout]) for n in names])


def open_sources(protocol: SlidesProtocol, data: SlidesData, options: SlidesOptions) -> None:
    """Tile every slide (opens each file, computes its tissue mask): a file OpenSlide cannot
    read or a slide without tissue stops here, before anything is written."""
    from pathrobust.data.slides import SlideTiles

    for task in data.tasks:
        tiling = task_tiling(protocol, task.protocol, options)
        for r in task.manifest.records:
            if r.path is None:
                raise UserError(f"{task.manifest.source}: slide {r.slide_id} has no 'path': --model tiles slide "
                                "files (for precomputed bags give --features)")
            task.sources[r.slide_id] = SlideTiles.from_tiling(r.path, tiling, name=r.slide_id,
                                                              slide_mpp_default=options.slide_mpp)


def open_bags(protocol: SlidesProtocol, data: SlidesData, root: Path, options: SlidesOptions):
    """Features mode: ``{task: {slide_id: FeatureBag}}`` and the files read."""
    from pathrobust.data.bags import cap_bag, check_same_dim, find_feature_file, read_feature_bag

    if not root.is_dir():
        raise UserError(f"--features {root}: not a directory")
    bags: dict[str, dict[str, Any]] = {}
    files, every = [], []
    for task in data.tasks:
        cap = options.max_tiles or task.protocol.max_tiles
        bags[task.name] = {}
        for r in task.manifest.records:
            file = r.features or find_feature_file(root, r.slide_id)
            if file is None:
                sid = r.slide_id
                raise UserError(f"--features {root}: no feature file for slide {sid} (looked for {sid}.h5, "
                                f"h5_files/{sid}.h5, {sid}.pt, pt_files/{sid}.pt)")
            bag = cap_bag(read_feature_bag(file, r.slide_id), cap, protocol.tiling.seed)
            bags[task.name][r.slide_id] = bag
            files.append(file)
            every.append(bag)
    check_same_dim(every)
    return bags, files


# -- evaluation ---------------------------------------------------------------------------------
def abmil_config(protocol: SlidesProtocol, options: SlidesOptions):
    from pathrobust.probes.abmil import ABMILConfig

    a = protocol.abmil
    return ABMILConfig(projected_size=a.projected_size, attention_hidden=a.attention_hidden,
                       mlp_hidden=tuple(a.mlp_hidden), lr=a.lr, betas=(a.betas[0], a.betas[1]), eps=a.eps,
                       weight_decay=a.weight_decay, warmup_epochs=a.warmup_epochs, warmup_factor=a.warmup_factor,
                       batch_size=a.batch_size, max_epochs=options.max_epochs or a.max_epochs, patience=a.patience,
                       n_runs=options.runs or a.n_runs, seed=a.seed)


def split_plans(task: SlideTask) -> list[tuple[str, dict[str, list]]]:
    """``[(name, {"train": records, "val": records, "test": records})]``: one per test fold of a
    fully folded manifest, else the ``split`` column's one plan. Robustness trains and validates
    on the reference acquisition only; every acquisition's test slides are scored."""
    man = task.manifest
    src = man.source
    if all(r.fold is not None for r in man.records):
        plans = [(f"fold {k}", {s: man.select(folds=f) for s, f in man.fold_splits(k).items()}) for k in man.folds]
    elif all(r.split is not None for r in man.records):
        plans = [("split", {s: man.select(split=s) for s in ("train", "val", "test")})]
    else:
        raise UserError(f"{src}: every row needs a 'split' (train/val/test), or every row a 'fold'")
    out = []
    for name, parts in plans:
        if task.robustness:
            parts = {**parts, **{s: [r for r in parts[s] if r.acquisition == task.reference] for s in ("train", "val")}}
        for split in ("train", "val", "test"):
            if not parts[split]:
                on_reference = task.robustness and split != "test"
                where = f" under the reference acquisition '{task.reference}'" if on_reference else ""
                raise UserError(f"{src}: {name}: no {split} slides{where}")
        if len({r.label_index for r in parts["train"]}) < 2:
            raise UserError(f"{src}: {name}: the training slides hold one class ({parts['train'][0].label}); "
                            "a slide head needs both")
        out.append((name, parts))
    return out


@dataclass
class TaskOutcome:
    """A task's scores: every scored slide's probabilities per run and what they give."""

    task: SlideTask
    records: list                 # scored slides (test split, or every fold's test fold)
    probs: np.ndarray             # (R, N) binary positive-class, or (R, N, C)
    per_run: list[dict[str, float]]
    summary: dict[str, float]     # {metric}_mean / {metric}_std over runs
    n_metric_slides: int
    training: list[dict[str, Any]]
    robustness: dict[str, Any] | None = None
    acquisitions: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _stack(bags: dict[str, np.ndarray], records, size: int) -> np.ndarray:
    from pathrobust.data.bags import pad_bags

    return pad_bags([bags[r.slide_id] for r in records], size)


def evaluate_task(task: SlideTask, bags: dict[str, np.ndarray], protocol: SlidesProtocol, options: SlidesOptions,
                  progress: bool = False, log=None) -> TaskOutcome:
    """Train the heads of every split plan, score the test slides, compute the metrics (and the
    robustness of a specimen/acquisition manifest); see the module doc."""
    from pathrobust.data.slide_manifest import labels_of
    from pathrobust.metrics.classification import slide_metrics_runs
    from pathrobust.probes.abmil import train_abmil_runs
    from pathrobust.progress import tile_progress

    config = abmil_config(protocol, options)
    size = pad_size(task.protocol, options)
    n_classes = task.manifest.num_classes
    plans = split_plans(task)
    records, probs, training = [], [], []
    with tile_progress(f"slides · {task.name} · {config.n_runs} ABMIL runs", total=config.max_epochs * len(plans),
                       unit="epochs", enabled=progress) as advance:
        for name, parts in plans:
            runs = train_abmil_runs(_stack(bags, parts["train"], size), labels_of(parts["train"]),
                                    _stack(bags, parts["val"], size), labels_of(parts["val"]), n_classes, config,
                                    progress=advance)
            advance(config.max_epochs - len(runs.history))  # early-stopped epochs count as done
            probs.append(runs.probabilities(_stack(bags, parts["test"], size)))
            records += parts["test"]
            training.append({"plan": name, "n_train": len(parts["train"]), "n_val": len(parts["val"]),
                             "n_test": len(parts["test"]), "best_epoch": runs.best_epoch.tolist(),
                             "epochs": runs.epochs.tolist(),
                             "val_balanced_accuracy": runs.val_balanced_accuracy.tolist()})
            if log:
                log.info("%s %s: %d train, %d val, %d test slides; best epochs %s", task.name, name,
                         len(parts["train"]), len(parts["val"]), len(parts["test"]), runs.best_epoch.tolist())
    probs_all = np.concatenate(probs, axis=1)
    scored = [k for k, r in enumerate(records) if not task.robustness or r.acquisition == task.reference]
    y = labels_of([records[k] for k in scored])
    if len(set(y.tolist())) < 2:
        raise UserError(f"{task.manifest.source}: the scored test slides hold one class; AUROC needs two")
    per_run, summary = slide_metrics_runs(y, probs_all[:, scored], n_classes, protocol.metrics.threshold)
    summary = {k.replace("_sd", "_std") if k.endswith("_sd") else k: v for k, v in summary.items()}
    outcome = TaskOutcome(task, records, probs_all, per_run, summary, len(scored), training)
    if task.robustness:
        robustness_of(outcome, protocol.robustness, log)
    return outcome


def robustness_of(outcome: TaskOutcome, params: RobustnessProtocol, log=None) -> None:
    """Per-acquisition AUROC and drop, CCC with the reference and over all pairs (runs whose
    reference scores are flat left out; see the module doc), into ``outcome``."""
    from pathrobust.metrics.concordance import cross_acquisition, score_table

    task, records = outcome.task, outcome.records
    ref = task.reference
    specimens, table = score_table([r.specimen_id for r in records], [r.acquisition for r in records], outcome.probs)
    label_of = {r.specimen_id: r.label_index for r in records}
    labels = [label_of[s] for s in specimens]
    src = task.manifest.source
    for acq, scores in table.items():
        present = np.isfinite(scores[0])
        if len({labels[k] for k in np.flatnonzero(present)}) < 2:
            raise UserError(f"{src}: acquisition {acq}: its scored specimens hold one class; AUROC needs two")
    try:
        aucs = cross_acquisition(table, ref, labels=labels, n_bootstrap=0)
    except ValueError as exc:
        raise UserError(f"{src}: {exc}") from None
    sd = np.array([float(np.std(row[np.isfinite(row)])) for row in table[ref]])  # (R,) per run, population sd
    kept = sd >= params.min_score_sd
    result: dict[str, Any] = {
        "reference": ref, "acquisitions": aucs.acquisitions, "n_specimens": len(specimens),
        "auc": aucs.auc, "auc_sd": aucs.auc_sd, "auc_drop": aucs.auc_drop,
        "score_sd": sd.tolist(), "min_score_sd": params.min_score_sd, "ccc_runs": int(kept.sum()),
        "ccc_runs_excluded": int((~kept).sum()), "ccc_informative": bool(kept.any())}
    if (~kept).any():
        note = (f"{task.name}: {int((~kept).sum())} of {len(kept)} runs left out of the CCC: their scores on {ref} "
                f"barely vary (sd < {params.min_score_sd:g}; CCC of flat scores is not informative)")
        if not kept.any():
            note = (f"{task.name}: CCC not informative: every run's scores on {ref} barely vary "
                    f"(sd < {params.min_score_sd:g}, largest {sd.max():.2g})")
        outcome.notes.append(note)
        warnings.warn(note, stacklevel=2)
        if log:
            log.warning("%s", note)
    if kept.any():
        ccc = cross_acquisition({a: t[kept] for a, t in table.items()}, ref, n_bootstrap=params.n_bootstrap,
                                ci_level=params.ci_level, seed=params.bootstrap_seed)
        result.update(ccc_reference=ccc.ccc_reference, ccc_reference_sd=ccc.ccc_reference_sd,
                      ccc_pairs={f"{a}|{b}": v for (a, b), v in ccc.ccc_pairs.items()}, mean_ccc=ccc.mean_ccc,
                      min_ccc=ccc.min_ccc, mean_ccc_all_pairs=ccc.mean_ccc_all_pairs,
                      mean_ccc_ci=list(ccc.mean_ccc_ci), min_ccc_ci=list(ccc.min_ccc_ci),
                      mean_ccc_all_pairs_ci=list(ccc.mean_ccc_all_pairs_ci), n_bootstrap=params.n_bootstrap,
                      ci_level=params.ci_level)
    outcome.robustness = _finite(result)
    first = {}
    for r in records:
        first.setdefault(r.acquisition, r)
    for acq in aucs.acquisitions:
        row = {"task": task.name, "acquisition": acq, "reference": acq == ref,
               "n_specimens": int(np.isfinite(table[acq][0]).sum()), "auc_mean": aucs.auc[acq],
               "auc_sd": aucs.auc_sd[acq], "auc_drop": aucs.auc_drop[acq],
               # the reference with itself: 1 (when the CCC is informative at all)
               "ccc_reference": (1.0 if acq == ref else result["ccc_reference"].get(acq)) if kept.any() else None,
               "ccc_reference_sd": (0.0 if acq == ref else result["ccc_reference_sd"].get(acq)) if kept.any() else None}
        for axis in ("staining", "scanner"):
            row[axis] = getattr(first[acq], axis)
        outcome.acquisitions.append(row)
    if all(r["staining"] is None or r["scanner"] is None for r in outcome.acquisitions):
        for row in outcome.acquisitions:
            row.pop("staining"), row.pop("scanner")
    if log:
        log.info("%s robustness: %s", task.name, json.dumps(outcome.robustness, default=str)[:2000])


def _finite(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def task_metrics(outcome: TaskOutcome, n_runs: int) -> dict[str, float | None]:
    """The task's results-DB row (see the module doc)."""
    out: dict[str, float | None] = {f"{m}_{s}": outcome.summary[f"{m}_{s}"] for m in METRICS for s in ("mean", "std")}
    out.update(n_runs=n_runs, n_slides_scored=outcome.n_metric_slides)
    rob = outcome.robustness
    if rob is not None:
        drops = [v for a, v in rob["auc_drop"].items() if a != rob["reference"] and v is not None]
        out.update(auc_reference=rob["auc"].get(rob["reference"]), auc_drop_max=max(drops) if drops else None,
                   auc_drop_mean=float(np.mean(drops)) if drops else None,
                   score_sd_mean=float(np.mean(rob["score_sd"])), score_sd_min=float(np.min(rob["score_sd"])),
                   ccc_runs=rob["ccc_runs"], ccc_runs_excluded=rob["ccc_runs_excluded"],
                   ccc_informative=float(rob["ccc_informative"]), n_specimens=rob["n_specimens"])
        informative = rob["ccc_informative"]
        for key, value, ci in (("ccc_mean", "mean_ccc", "mean_ccc_ci"), ("ccc_min", "min_ccc", "min_ccc_ci"),
                               ("ccc_all_pairs", "mean_ccc_all_pairs", "mean_ccc_all_pairs_ci")):
            out[key] = rob.get(value) if informative else None
            low, high = rob.get(ci) or (None, None)
            prefix = "ccc" if key == "ccc_mean" else key
            out[f"{prefix}_ci_low"], out[f"{prefix}_ci_high"] = low, high
    return out


ROBUSTNESS_KEYS = ("ccc_mean", "ccc_min", "ccc_ci_low", "ccc_ci_high", "ccc_min_ci_low", "ccc_min_ci_high",
                   "ccc_all_pairs", "ccc_all_pairs_ci_low", "ccc_all_pairs_ci_high", "auc_reference", "auc_drop_max",
                   "auc_drop_mean", "score_sd_mean", "score_sd_min", "ccc_runs", "ccc_runs_excluded",
                   "ccc_informative", "n_specimens")


def average_metrics(outcomes: list[TaskOutcome], rows: dict[str, dict[str, float | None]]) -> dict[str, float | None]:
    """``average``: the mean over tasks of each metric's mean, the sample sd over runs of each
    run's task average (runs share seeds across tasks), and the robustness task's concordance."""
    from pathrobust.metrics.classification import mean_std

    n = min(len(o.per_run) for o in outcomes)
    out: dict[str, float | None] = {}
    for m in METRICS:
        out[f"{m}_mean"] = float(np.mean([o.summary[f"{m}_mean"] for o in outcomes]))
        out[f"{m}_std"] = mean_std(np.mean([[run[m] for run in o.per_run[:n]] for o in outcomes], axis=0))[1]
    out["n_tasks"] = len(outcomes)
    robust = [o for o in outcomes if o.robustness is not None]
    if len(robust) == 1:
        out.update({k: rows[robust[0].task.name].get(k) for k in ROBUSTNESS_KEYS})
    return out


def heatmap_figure(acquisitions: list[dict[str, Any]], rows_axis: str, cols_axis: str, reference: str, title: str):
    """Staining x scanner (or the declared axes) grid of each acquisition's CCC with the
    reference (1 on the reference itself); annotated cells, NaN where no acquisition exists."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pathrobust.metrics.concordance import ccc_grid

    def axis_of(row: dict[str, Any], axis: str) -> str:
        if axis == "acquisition" or row.get(axis) is None:
            return row["acquisition"] if axis == rows_axis else "CCC"
        return row[axis]

    values = {r["acquisition"]: (np.nan if r["ccc_reference"] is None else r["ccc_reference"]) for r in acquisitions}
    row_of = {r["acquisition"]: axis_of(r, rows_axis) for r in acquisitions}
    col_of = {r["acquisition"]: axis_of(r, cols_axis) for r in acquisitions}
    rows, cols, grid = ccc_grid(values, row_of, col_of)
    fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 2.6, 0.7 * len(rows) + 1.8))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            if np.isfinite(grid[i, j]):
                acq = next(a for a in values if row_of[a] == rows[i] and col_of[a] == cols[j])
                text = f"{grid[i, j]:.3f}" + ("\n(ref)" if acq == reference else "")
                ax.text(j, i, text, ha="center", va="center", fontsize=8,
                        color="black" if grid[i, j] > 0.6 else "white")
    ax.set_xticks(range(len(cols)), cols, fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel(cols_axis if any(r.get(cols_axis) for r in acquisitions) else "", fontsize=8)
    ax.set_ylabel(rows_axis, fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def _tables(outcomes: list[TaskOutcome]) -> dict[str, Any]:
    import pandas as pd

    per_run, slides, acquisitions = [], [], []
    for o in outcomes:
        sd = o.robustness["score_sd"] if o.robustness else [None] * len(o.per_run)
        threshold = o.robustness["min_score_sd"] if o.robustness else None
        for i, run in enumerate(o.per_run):
            row = {"task": o.task.name, "run": i, **run}
            if o.robustness:
                row.update(score_sd_reference=sd[i], in_ccc=bool(sd[i] >= threshold))
            per_run.append(row)
        binary = o.probs.ndim == 2
        for k, r in enumerate(o.records):
            row = {"task": o.task.name, "slide_id": r.slide_id, "label": r.label, "patient_id": r.patient_id,
                   "specimen_id": r.specimen_id, "acquisition": r.acquisition,
                   "split": r.split if r.fold is None else f"fold {r.fold}"}
            if binary:  # the positive-class probability of every run (what the CCC compares)
                scores = o.probs[:, k]
                row.update(score_mean=float(scores.mean()),
                           score_sd=float(scores.std(ddof=1)) if len(scores) > 1 else 0.0)
                row.update({f"score_run{i}": float(v) for i, v in enumerate(scores)})
            else:  # every run's predicted class
                row.update({f"prediction_run{i}": o.task.manifest.classes[int(c)]
                            for i, c in enumerate(o.probs[:, k].argmax(-1))})
            slides.append(row)
        acquisitions += o.acquisitions
    tables = {"per_run": pd.DataFrame(per_run), "slide_scores": pd.DataFrame(slides)}
    if acquisitions:
        tables["acquisitions"] = pd.DataFrame(acquisitions)
    return tables


# -- the suite -----------------------------------------------------------------------------------
@register_suite
class SlidesSuite(Suite):
    """Slide-level MIL (eva's slide tasks) and cross-acquisition concordance (see the module doc)."""

    name = SUITE
    summary = ("Slides: ABMIL on whole-slide bags (eva's Camelyon16/PANDA-small) and cross-acquisition CCC of "
               "slide scores (BreastBm-style).")
    description = """Slide-level evaluation: eva's ABMIL protocol on whole-slide feature bags (balanced
    accuracy, AUROC, F1; mean ± sd over 20 runs) and, when the manifest has specimen_id and
    acquisition, the cross-acquisition robustness of the slide scores: heads trained on the
    reference acquisition, AUROC per acquisition and its drop, Lin's CCC with the reference and
    over all pairs (mean, minimum, specimen-bootstrap CI), a staining x scanner CCC heatmap.

    Data: a slide manifest CSV (slide_id, path or features, label, split or fold, patient_id;
    specimen_id + acquisition for robustness), eva's Camelyon16 / PANDA roots, or (default)
    synthetic multi-acquisition slides. Bags are tiled with eva's foreground grid and embedded
    through the run's feature cache; --features reads TRIDENT/CLAM bags instead."""
    examples = (
        "pathrobust run slides --model efficientnet-lite0-imagenet",
        "pathrobust run slides --model h0-mini --data cohort.csv --classes negative,positive --reference S60_lab1",
        "pathrobust run slides --model uni --data /data/eva --tasks camelyon16_small --device cuda",
        "pathrobust run slides --features trident/features_uni_v1 --data cohort.csv",
    )
    data_help = ("A slide manifest CSV (or a folder with manifest.csv), or an eva data root with Camelyon16 "
                 "(training/, testing/) and/or PANDA (train_images/); default: synthetic multi-acquisition slides, "
                 "built once into the cache.")
    features = FeaturesMode(
        help="Precomputed bags instead of --model: DIR/<slide_id>.h5 (pathrobust/TRIDENT: 'features', 'coords'), "
             "CLAM h5_files/ or pt_files/; a manifest's 'features' column wins. --data still gives the labels.",
        needs_data=True)
    Protocol = SlidesProtocol
    Options = SlidesOptions

    def synth_config(self, overrides: dict[str, Any] | None = None):
        from pathrobust.config import from_dict, to_dict
        from pathrobust.data.synth_slides import SynthSlidesConfig

        s = from_dict(SyntheticSlides, {**to_dict(self.protocol.synthetic), **(overrides or {})}, "synthetic")
        return SynthSlidesConfig(specimens=s.specimens, stainings=tuple(s.stainings), scanners=tuple(s.scanners),
                                 grid=parse_size(s.grid), cell=s.cell, mpp=s.mpp,
                                 islands=tuple(parse_size(i) for i in s.islands), zoom=s.zoom, folds=s.folds,
                                 specks=s.specks, seed=s.seed)

    def build_synthetic(self, root: Path, overrides: dict[str, Any], progress: bool) -> Path:
        from pathrobust.data.synth_slides import DONE_MARKER, FORMAT_VERSION, synth_slides

        config = self.synth_config(overrides)
        marker = root / DONE_MARKER
        if marker.is_file():
            try:
                info = json.loads(marker.read_text())
            except (OSError, ValueError):
                info = {}
            wanted = json.loads(json.dumps(asdict(config)))
            if info.get("version") == FORMAT_VERSION and all(info.get(k) == v for k, v in wanted.items()):
                return root
        # a synthetic slide set of another configuration is ours to replace; any other content is not
        return synth_slides(root, config, overwrite=marker.is_file(), progress=progress)

    def open_data(self, path: Path, options: SlidesOptions, embed: bool) -> SlidesData:
        data = open_slides_data(self.protocol, path, options, embed)
        for task in data.tasks:
            split_plans(task)  # split errors now, before any extraction
        if embed:
            open_sources(self.protocol, data, options)
        return data

    def data_fingerprint(self, path: Path, data: SlidesData, options: SlidesOptions) -> str:
        from pathrobust.data.identity import fingerprint_files

        return ",".join(f"{t.name}={fingerprint_files(t.root, t.files)}" for t in data.tasks)

    def open_features(self, path: Path, data: SlidesData, options: SlidesOptions) -> Features:
        from pathrobust.data.identity import fingerprint_files

        bags, files = open_bags(self.protocol, data, path, options)
        first = next(iter(next(iter(bags.values())).values()))
        attrs = first.attrs
        record = {"spec_hash": str(attrs.get("spec_hash", "")), "weights_sha256": str(attrs.get("weights_sha256", "")),
                  "pooling": str(attrs.get("pooling", "")), "precision": str(attrs.get("precision", ""))}
        return Features(bags, path.resolve().name, fingerprint_files(path, files), record)

    def evaluate(self, ctx: RunContext) -> SuiteResult:
        from pathrobust.data.bags import read_feature_bag

        options: SlidesOptions = ctx.options
        outcomes, rows = [], {}
        for task in ctx.data.tasks:
            if ctx.features is not None:
                bags = {sid: bag.features for sid, bag in ctx.features[task.name].items()}
            else:
                ctx.log.info("tiling and embedding %d slides of %s", len(task.sources), task.name)
                bags = {}
                for sid, source in task.sources.items():
                    bags[sid] = read_feature_bag(ctx.cache.embed(source, f"{task.name}/{sid}"), sid).features
            outcome = evaluate_task(task, bags, self.protocol, options, ctx.progress, ctx.log)
            rows[task.name] = task_metrics(outcome, len(outcome.per_run))
            ctx.log.info("%s: balanced accuracy %.4f ± %.4f, AUROC %.4f", task.name,
                         outcome.summary["balanced_accuracy_mean"], outcome.summary["balanced_accuracy_std"],
                         outcome.summary["auroc_mean"])
            outcomes.append(outcome)
        average = average_metrics(outcomes, rows)
        artefacts = {}
        rob = next((o for o in outcomes if o.robustness is not None), None)
        if rob is not None and rob.robustness["ccc_informative"]:
            from pathrobust import atomic

            r = self.protocol.robustness
            fig = heatmap_figure(rob.acquisitions, r.heatmap_rows, r.heatmap_columns, rob.task.reference,
                                 f"{rob.task.name}: CCC of slide scores with {rob.task.reference} "
                                 f"(mean over {rob.robustness['ccc_runs']} runs)")
            atomic.save_figure(fig, ctx.dir / HEATMAP, dpi=110)
            import matplotlib.pyplot as plt

            plt.close(fig)
            artefacts["ccc_heatmap"] = HEATMAP
        task_rows = [TaskRow(o.task.name, rows[o.task.name],
                             {"classes": list(o.task.manifest.classes), "reference": o.task.reference,
                              "max_tiles": options.max_tiles or o.task.protocol.max_tiles})
                     for o in outcomes]
        task_rows.append(TaskRow("average", average, {"tasks": [o.task.name for o in outcomes]}))
        summary = {
            "data": str(ctx.data_path), "notes": [n for o in outcomes for n in o.notes],
            "tasks": {o.task.name: {"metrics": rows[o.task.name], "runs": o.per_run, "training": o.training,
                                    "classes": list(o.task.manifest.classes), "robustness": o.robustness,
                                    "n_slides": len(o.task.manifest)} for o in outcomes},
            "average": average,
        }
        return SuiteResult(headline=average["balanced_accuracy_mean"], rows=task_rows, summary=summary,
                           tables=_tables(outcomes), artefacts=artefacts)


def run_slides(model: Any = None, data: str | Path | None = None, out: str | Path = "runs", *,
               features: str | Path | None = None, **kwargs: Any) -> dict[str, Any]:
    """Run the slide suite (:func:`pathrobust.suites.base.run_suite`; options as keyword
    arguments: ``runs``, ``max_epochs``, ``classes``, ``reference``, ...)."""
    from pathrobust.suites.base import run_suite

    return run_suite(SUITE, model, data, out, features=features, **kwargs)
