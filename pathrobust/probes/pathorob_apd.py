"""PathoROB's average performance drop (APD): logistic-regression probes trained on splits of
increasing centre–class correlation, tested in-domain and on unseen centres.

Reference: bifold-pathomics/PathoROB at commit 46594e9, ``pathorob/apd/apd.py``,
``utils.py`` (``load_data``, ``get_patches_map_to_split``), ``train_model.py``.

The protocol, for one dataset:

* The APD rows (a metadata table in PathoROB's order) are ``ID`` rows of the in-domain
  centres and ``OOD`` rows of unseen centres. ID rows are grouped by (centre, class) cell in
  the design's centre and class order; each cell is cut into consecutive chunks of
  ``patches_per_slide`` rows (slides, in PathoROB's metadata).
* ``random.seed(seed)``; ``random.sample(range(10000), iterations)`` gives one seed per
  iteration. Each iteration seeds Python's ``random`` again and shuffles the chunks of every
  cell in place (centre-major, then class) — the shuffles build on the previous iteration's
  order. With ``case_splits`` (Tolkach ESCA) one train/test case split is drawn per centre
  first (``randint`` per centre), and after the shuffle each test case's first chunk in the
  cell moves to the end.
* Split s trains on the first ``train_slides[s][i][j] · P`` rows of cell (i, j), validates on
  the next ``int(n / max_train_slides)`` rows of each cell, and tests in-domain on every
  cell's rows from ``(max_train_slides + 1) · P`` on, and out-of-domain on all OOD rows.
  Split 0 is balanced; later splits correlate centre and class more and more.
* Probe: ``LogisticRegression(C=c, random_state=0)`` (scikit-learn defaults: lbfgs,
  max_iter 100) for C in 10^linspace(−8, 4, 15); C with the best validation balanced
  accuracy (first best: the smallest C on ties); its test balanced accuracies are kept (the
  reference refits the same C on the same data — lbfgs is deterministic, the model is the same).
* APD = mean over iterations of (mean over s ≥ 1 of acc_s / acc_0) − 1, in- and out-of-domain
  (:func:`pathrobust.metrics.pathorob.apd`).

One deliberate difference: for ``case_splits`` the reference moves test cases in the
iteration order of a Python ``set`` of strings, which changes with ``PYTHONHASHSEED``; here
they move in sorted order, so a run is reproducible.
"""

from __future__ import annotations

import json
import os
import random
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pathrobust.errors import UserError
from pathrobust.metrics.pathorob import apd, apd_per_iteration

SMALL_FIT = 2_000_000  # training rows x dims below which the probes run single-threaded


@dataclass(frozen=True)
class ApdDesign:
    """One dataset's APD protocol (its values live in the suite TOML).

    ``train_slides`` ``(n_splits, n_id_centres, n_classes)``: training slides (chunks) of each
    cell per split. ``case_splits``: ``{"train"|"test": {centre: [[case ids], ...]}}``
    (PathoROB's ``tolkach_splits.json``), or None."""

    id_centres: tuple[str, ...]
    ood_centres: tuple[str, ...]
    classes: tuple[str, ...]
    patches_per_slide: int
    train_slides: tuple[tuple[tuple[int, ...], ...], ...]
    iterations: int = 20
    seed: int = 1000
    c_exponents: tuple[float, float, int] = (-8.0, 4.0, 15)
    max_iter: int = 100
    case_splits: Mapping | None = None

    @property
    def n_splits(self) -> int:
        return len(self.train_slides)

    @property
    def max_train_slides(self) -> int:
        return int(np.max(self.train_slides))

    def c_grid(self) -> np.ndarray:
        lo, hi, num = self.c_exponents
        return 10 ** np.linspace(lo, hi, int(num))

    @classmethod
    def from_mapping(cls, d: Mapping, source: str = "apd", search: Sequence[str | os.PathLike] = ()) -> "ApdDesign":
        """From a TOML table: ``id_centres, ood_centres, classes, patches_per_slide,
        train_slides`` (+ optional ``iterations, seed, c_exponents, max_iter, case_splits``).
        ``case_splits`` may be a mapping or a JSON file name (PathoROB's
        ``tolkach_splits.json``) looked up in the ``search`` folders."""
        required = ("id_centres", "ood_centres", "classes", "patches_per_slide", "train_slides")
        missing = [k for k in required if k not in d]
        if missing:
            raise UserError(f"{source}: missing {', '.join(missing)}")
        extra = set(d) - set(required) - {"iterations", "seed", "c_exponents", "max_iter", "case_splits"}
        if extra:
            raise UserError(f"{source}: unknown key(s) {', '.join(sorted(extra))}")
        slides = tuple(tuple(tuple(int(v) for v in row) for row in split) for split in d["train_slides"])
        case_splits = d.get("case_splits")
        if isinstance(case_splits, (str, os.PathLike)):
            case_splits = _load_case_splits(case_splits, search, source)
        design = cls(tuple(d["id_centres"]), tuple(d["ood_centres"]), tuple(d["classes"]), int(d["patches_per_slide"]),
                     slides, int(d.get("iterations", 20)), int(d.get("seed", 1000)),
                     tuple(d.get("c_exponents", (-8.0, 4.0, 15))), int(d.get("max_iter", 100)), case_splits)
        shape = np.asarray(slides).shape
        if len(shape) != 3 or shape[1:] != (len(design.id_centres), len(design.classes)) or shape[0] < 2:
            raise UserError(f"{source}: train_slides has shape {shape}; expected (n_splits >= 2, "
                            f"{len(design.id_centres)} centres, {len(design.classes)} classes)")
        if case_splits is not None:
            for part in ("train", "test"):
                absent = [c for c in design.id_centres if c not in case_splits.get(part, {})]
                if absent:
                    raise UserError(f"{source}: case_splits has no {part} splits for centre {absent[0]!r}")
        return design


def _load_case_splits(name: str | os.PathLike, search: Sequence[str | os.PathLike], source: str) -> dict:
    candidates = [Path(name)] if Path(name).is_absolute() else [Path(d) / name for d in search] + [Path(name)]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise UserError(f"{source}: case_splits file {name} not found (PathoROB's pathorob/resources/{Path(name).name}; "
                        f"looked in {', '.join(str(d) for d in search) or 'the working directory'})")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None


@dataclass
class ApdResult:
    """Balanced accuracies ``(n_splits, iterations)`` in- and out-of-domain, the C chosen for
    each, and the APDs."""

    id_accuracy: np.ndarray
    ood_accuracy: np.ndarray
    best_c: np.ndarray
    apd_id: float
    apd_ood: float
    per_iteration_id: np.ndarray
    per_iteration_ood: np.ndarray
    seeds: list[int]
    not_converged: int = 0
    provenance: dict = field(default_factory=dict)

    def split_table(self) -> pd.DataFrame:
        """One row per split: mean ID/OOD accuracy over iterations (PathoROB's ``*_means``)."""
        return pd.DataFrame({"split": np.arange(self.id_accuracy.shape[0]),
                             "id_accuracy": self.id_accuracy.mean(axis=1),
                             "ood_accuracy": self.ood_accuracy.mean(axis=1)})


def iteration_seeds(seed: int, iterations: int) -> list[int]:
    """``random.seed(seed); random.sample(range(0, 10000), iterations)``."""
    return random.Random(seed).sample(range(0, 10000), iterations)


def _cells(table: pd.DataFrame, design: ApdDesign, source: str) -> tuple[list[list[list[int]]], np.ndarray, np.ndarray]:
    """ID rows per cell (positions into ``table``, table order), OOD positions and OOD labels."""
    subset = table["subset"].astype(str).to_numpy()
    centre = table["medical_center"].astype(str).to_numpy()
    cls = table["biological_class"].astype(str).to_numpy()
    bad = sorted(set(subset) - {"ID", "OOD"})
    if bad:
        raise UserError(f"{source}: subset must be ID or OOD for APD, found {', '.join(map(repr, bad[:3]))}")
    unknown_cls = sorted(set(cls) - set(design.classes))
    if unknown_cls:
        raise UserError(f"{source}: class {unknown_cls[0]!r} is not one of the APD classes {list(design.classes)}")
    for s, centres in (("ID", design.id_centres), ("OOD", design.ood_centres)):
        other = sorted(set(centre[subset == s]) - set(centres))
        if other:
            raise UserError(f"{source}: {s} centre {other[0]!r} is not one of the APD {s} centres {list(centres)}")
    cells = [[list(np.nonzero((subset == "ID") & (centre == c) & (cls == b))[0]) for b in design.classes]
             for c in design.id_centres]
    need = (design.max_train_slides + 1) * design.patches_per_slide + 1
    for i, c in enumerate(design.id_centres):
        for j, b in enumerate(design.classes):
            if len(cells[i][j]) < need:
                raise UserError(f"{source}: cell ({c}, {b}) has {len(cells[i][j])} ID rows; the APD design needs at "
                                f"least {need} ((max training slides + 1) x {design.patches_per_slide} + a test row)")
    ood = np.nonzero(subset == "OOD")[0]
    if len(ood) == 0:
        raise UserError(f"{source}: no OOD rows: out-of-domain APD needs rows of unseen centres")
    return cells, ood, np.array([design.classes.index(b) for b in cls[ood]])


def _shuffle_cells(cells: list[list[list[int]]], slides: np.ndarray, design: ApdDesign, rng: random.Random) -> None:
    """One iteration's in-place reshuffle of every cell's slide chunks (module doc)."""
    p = design.patches_per_slide
    test_cases: list[Sequence[str]] | None = None
    if design.case_splits is not None:
        picks = [rng.randint(0, len(design.case_splits["train"][c]) - 1) for c in design.id_centres]
        test_cases = [design.case_splits["test"][c][pick] for c, pick in zip(design.id_centres, picks)]
    for i in range(len(design.id_centres)):
        for j in range(len(design.classes)):
            cell = cells[i][j]
            chunks = [cell[k:k + p] for k in range(0, len(cell), p)]
            rng.shuffle(chunks)
            if test_cases is not None:
                order = [slides[ch[0]] for ch in chunks]
                for case in sorted(set(test_cases[i]) & set(order)):
                    first = [slides[ch[0]] for ch in chunks].index(case)
                    chunks.append(chunks.pop(first))
            cells[i][j] = [r for ch in chunks for r in ch]


def _split_sets(cells: list[list[list[int]]], design: ApdDesign, split: int):
    """Positions and labels of the training, validation and in-domain test rows of a split."""
    p, top = design.patches_per_slide, design.max_train_slides
    train, val, test = [], [], []
    for i in range(len(design.id_centres)):
        for j in range(len(design.classes)):
            n = design.train_slides[split][i][j] * p
            cell = cells[i][j]
            train += [(r, j) for r in cell[:n]]
            val += [(r, j) for r in cell[n:n + int(n / top)]]
            test += [(r, j) for r in cell[(top + 1) * p:]]
    return tuple(np.array(s, dtype=np.int64).reshape(-1, 2) for s in (train, val, test))


def fit_probe(c: float, x_train: np.ndarray, y_train: np.ndarray, max_iter: int = 100):
    """``LogisticRegression(C=c, random_state=0)`` fitted; returns ``(model, hit max_iter)``."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model = LogisticRegression(C=c, random_state=0, max_iter=max_iter).fit(x_train, y_train)
    return model, any(issubclass(w.category, ConvergenceWarning) for w in caught)


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """scikit-learn's ``balanced_accuracy_score`` (the reference's), without its warning
    about predicted classes absent from ``y_true``."""
    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(balanced_accuracy_score(y_true, y_pred))


def fit_best_c(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, c_grid: np.ndarray,
               max_iter: int = 100):
    """A probe per C; the model of the first C with the best validation balanced accuracy
    (the smallest C on ties). Returns ``(model, c, number of fits that hit max_iter)``."""
    from threadpoolctl import threadpool_limits

    best, best_score, best_c, not_converged = None, -np.inf, float("nan"), 0
    # small problems: one BLAS thread is several times faster (thread start-up dominates)
    with threadpool_limits(1 if x_train.size <= SMALL_FIT else None):
        for c in c_grid:
            model, hit_limit = fit_probe(c, x_train, y_train, max_iter)
            not_converged += hit_limit
            score = balanced_accuracy(y_val, model.predict(x_val))
            if score > best_score:
                best, best_score, best_c = model, score, float(c)
    return best, best_c, not_converged


def run_apd(features: np.ndarray, table: pd.DataFrame, design: ApdDesign, source: str = "APD rows",
            progress=None) -> ApdResult:
    """PathoROB's APD protocol for one dataset (module doc).

    Args:
        features: raw embeddings ``(n, d)`` (not normalised), as extracted (dtype kept: the
            reference feeds float32 features to scikit-learn).
        table: APD rows in PathoROB's metadata order: ``row`` (index into ``features``),
            ``subset`` (ID/OOD), ``slide_id``, ``biological_class``, ``medical_center``.
        design: the dataset's :class:`ApdDesign`.
        progress: optional callable ``(done, total)`` after each fitted split.
    """
    table = table.reset_index(drop=True)
    x_all = np.asarray(features)[table["row"].to_numpy(np.int64)]
    if not np.isfinite(x_all).all():
        bad = int(np.nonzero(~np.isfinite(x_all).all(axis=1))[0][0])
        raise UserError(f"{source}: embeddings of row {int(table['row'].iloc[bad])} contain NaN or inf")
    cells, ood, y_ood = _cells(table, design, source)
    slides = table["slide_id"].astype(str).to_numpy()
    x_ood = x_all[ood]
    seeds = iteration_seeds(design.seed, design.iterations)
    shape = (design.n_splits, design.iterations)
    acc_id, acc_ood, best_c = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    not_converged = 0
    grid = design.c_grid()
    for it, seed in enumerate(seeds):
        _shuffle_cells(cells, slides, design, random.Random(seed))
        for s in range(design.n_splits):
            train, val, test = _split_sets(cells, design, s)
            model, c, nc = fit_best_c(x_all[train[:, 0]], train[:, 1], x_all[val[:, 0]], val[:, 1], grid,
                                      design.max_iter)
            not_converged += nc
            best_c[s, it] = c
            acc_id[s, it] = balanced_accuracy(test[:, 1], model.predict(x_all[test[:, 0]]))
            acc_ood[s, it] = balanced_accuracy(y_ood, model.predict(x_ood))
            if progress is not None:
                progress(it * design.n_splits + s + 1, design.iterations * design.n_splits)
    return ApdResult(acc_id, acc_ood, best_c, apd(acc_id), apd(acc_ood), apd_per_iteration(acc_id),
                     apd_per_iteration(acc_ood), seeds, not_converged,
                     {"reference": "bifold-pathomics/PathoROB@46594e9 apd", "iterations": design.iterations,
                      "seed": design.seed, "c_grid": [float(c) for c in grid], "max_iter": design.max_iter,
                      "test_case_order": "sorted" if design.case_splits is not None else None})
