"""Cross-acquisition robustness of slide-level predictions (pure functions, arrays in, numbers out).

The same physical specimens digitised under several acquisitions (scanners, staining labs): a
slide head trained on the reference acquisition scores every slide. Reported (the H0-mini
paper's BreastBm analysis; the procedure is pathrobust's own, documented here):

* per acquisition: AUROC of the slide scores, and its drop from the reference's
  (``auc[reference] - auc[acquisition]``);
* Lin's concordance correlation coefficient of the per-specimen scores between two
  acquisitions, ``2 cov(x, y) / (var(x) + var(y) + (mean(x) - mean(y))^2)`` with population
  moments: for every (reference, other) pair and for every unordered pair of acquisitions;
* summaries: mean and minimum CCC over the (reference, other) pairs and the mean over all
  pairs, each with a specimen-bootstrap interval (specimens resampled with replacement, the
  same resample for every acquisition and run; percentile interval).

Scores may carry a leading run axis ``(R, S)``: every statistic is computed per run and then
averaged over runs (AUROC also gets its sample sd over runs). A missing score (NaN: that
specimen was not digitised under that acquisition) leaves the specimen out of the pairs and
AUROCs that need it.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from pathrobust.metrics.classification import mean_std, roc_auc


def lins_ccc(x, y) -> float:
    """Lin's concordance correlation coefficient of two score vectors (population moments).

    1 for identical vectors, below Pearson's r whenever the means or scales differ; two
    constant, equal vectors agree perfectly (1)."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.shape != y.shape or len(x) == 0:
        raise ValueError(f"CCC needs two non-empty vectors of one length; got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("CCC of non-finite scores")
    return float(_ccc_weighted(x[None], y[None], np.ones((1, len(x))))[0])


def pearson_r(x, y) -> float:
    """Pearson's correlation (for comparison with the CCC); NaN-free inputs, not constant."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    xc, yc = x - x.mean(), y - y.mean()
    denom = np.sqrt((xc * xc).sum() * (yc * yc).sum())
    if denom == 0:
        raise ValueError("Pearson's r of a constant vector")
    return float((xc * yc).sum() / denom)


def _ccc_weighted(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """CCC along the last axis with non-negative weights (bootstrap counts x presence):
    weighted population moments. Shapes broadcast; a zero total weight gives NaN; a zero
    denominator with positive weight (constant, equal scores) gives 1."""
    total = w.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        mx = (w * x).sum(-1) / total
        my = (w * y).sum(-1) / total
        dx, dy = x - mx[..., None], y - my[..., None]
        vx = (w * dx * dx).sum(-1) / total
        vy = (w * dy * dy).sum(-1) / total
        cov = (w * dx * dy).sum(-1) / total
        denom = vx + vy + (mx - my) ** 2
        ccc = np.where(denom > 0, 2 * cov / np.where(denom > 0, denom, 1.0), 1.0)
    return np.where(total > 0, ccc, np.nan)


@dataclass
class CrossAcquisition:
    """Outcome of :func:`cross_acquisition` (run-averaged values; see the module doc).

    ``auc``/``auc_sd``/``auc_drop``: per acquisition (empty without labels);
    ``ccc_reference``: per other acquisition, CCC with the reference (and ``ccc_reference_sd``
    over runs); ``ccc_pairs``: ``{(a, b): CCC}`` for every unordered pair; ``mean_ccc``,
    ``min_ccc`` over the reference pairs and ``mean_ccc_all_pairs``, each with a bootstrap
    ``(low, high)`` interval; ``n_specimens``, ``n_runs``, ``n_bootstrap``, ``ci_level``."""

    reference: str
    acquisitions: list[str]
    ccc_reference: dict[str, float]
    ccc_reference_sd: dict[str, float]
    ccc_pairs: dict[tuple[str, str], float]
    mean_ccc: float
    min_ccc: float
    mean_ccc_all_pairs: float
    mean_ccc_ci: tuple[float, float]
    min_ccc_ci: tuple[float, float]
    mean_ccc_all_pairs_ci: tuple[float, float]
    n_specimens: int
    n_runs: int
    n_bootstrap: int
    ci_level: float
    auc: dict[str, float] = field(default_factory=dict)
    auc_sd: dict[str, float] = field(default_factory=dict)
    auc_drop: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready (pairs as ``"a|b"`` keys)."""
        out = dict(self.__dict__)
        out["ccc_pairs"] = {f"{a}|{b}": v for (a, b), v in self.ccc_pairs.items()}
        for key in ("mean_ccc_ci", "min_ccc_ci", "mean_ccc_all_pairs_ci"):
            out[key] = list(out[key])
        return out


def cross_acquisition(scores: Mapping[str, np.ndarray], reference: str, labels=None, *, n_bootstrap: int = 1000,
                      ci_level: float = 0.95, seed: int = 0) -> CrossAcquisition:
    """Cross-acquisition AUROC and concordance of slide scores (see the module doc).

    Args:
        scores: ``{acquisition: scores}``, each ``(S,)`` or ``(R, S)`` (``R`` runs), aligned on
            the same ``S`` specimens; NaN = not digitised under that acquisition.
        reference: the acquisition the head was trained on.
        labels: ``(S,)`` binary labels for the AUROCs (``None``: no AUROCs).
        n_bootstrap: specimen-bootstrap resamples for the intervals (0: no intervals).
        ci_level: interval coverage (0.95: the 2.5th and 97.5th percentiles).
        seed: the bootstrap's random seed.
    """
    if reference not in scores:
        raise ValueError(f"reference acquisition {reference!r} has no scores (have: {', '.join(scores)})")
    if len(scores) < 2:
        raise ValueError("concordance needs >= 2 acquisitions")
    names = [reference] + [a for a in scores if a != reference]
    arrays = [np.asarray(scores[a], dtype=np.float64) for a in names]
    arrays = [a[None] if a.ndim == 1 else a for a in arrays]
    if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 2:
        raise ValueError(f"scores must all be (S,) or all (R, S) of one shape; got {[a.shape for a in arrays]}")
    stack = np.stack(arrays)  # (A, R, S)
    n_acq, n_runs, n_spec = stack.shape
    present = np.isfinite(stack).all(axis=1)  # (A, S): a specimen's score exists in every run
    if np.isinf(stack).any() or (np.isnan(stack).any(axis=1) & ~np.isnan(stack).all(axis=1)).any():
        raise ValueError("scores must be finite, or NaN in every run for a missing slide")
    filled = np.nan_to_num(stack)
    pairs = list(itertools.combinations(range(n_acq), 2))
    ref_pairs = [k for k, (i, _) in enumerate(pairs) if i == 0]

    def pair_cccs(weights: np.ndarray) -> np.ndarray:
        """``weights`` ``(B, S)`` -> run-mean CCC of every pair ``(B, n_pairs)``."""
        out = np.empty((len(weights), len(pairs)))
        for k, (i, j) in enumerate(pairs):
            w = weights * (present[i] & present[j])  # (B, S)
            ccc = _ccc_weighted(filled[i][None], filled[j][None], w[:, None, :])  # (B, R)
            out[:, k] = ccc.mean(axis=1)
        return out

    for k, (i, j) in enumerate(pairs):
        if (present[i] & present[j]).sum() < 2:
            raise ValueError(f"acquisitions {names[i]!r} and {names[j]!r} share fewer than 2 specimens")
    point = pair_cccs(np.ones((1, n_spec)))[0]
    per_run_ref = {names[j]: _ccc_weighted(filled[0], filled[j], np.broadcast_to(present[0] & present[j], (n_runs, n_spec)))
                   for (i, j) in (pairs[k] for k in ref_pairs)}
    lo_q, hi_q = (1 - ci_level) / 2 * 100, (1 + ci_level) / 2 * 100
    intervals = {key: (float("nan"), float("nan")) for key in ("mean", "min", "all")}
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        stats = {"mean": [], "min": [], "all": []}
        chunk = max(1, 2_000_000 // max(1, n_runs * n_spec))
        for start in range(0, n_bootstrap, chunk):
            b = min(chunk, n_bootstrap - start)
            picks = rng.integers(0, n_spec, size=(b, n_spec))
            counts = np.zeros((b, n_spec))
            np.add.at(counts, (np.repeat(np.arange(b), n_spec), picks.reshape(-1)), 1.0)
            boot = pair_cccs(counts)
            stats["mean"].append(np.nanmean(boot[:, ref_pairs], axis=1))
            stats["min"].append(np.nanmin(boot[:, ref_pairs], axis=1))
            stats["all"].append(np.nanmean(boot, axis=1))
        for key, values in stats.items():
            v = np.concatenate(values)
            v = v[np.isfinite(v)]
            intervals[key] = (float(np.percentile(v, lo_q)), float(np.percentile(v, hi_q)))
    result = CrossAcquisition(
        reference=reference, acquisitions=names,
        ccc_reference={a: float(v.mean()) for a, v in per_run_ref.items()},
        ccc_reference_sd={a: mean_std(v)[1] for a, v in per_run_ref.items()},
        ccc_pairs={(names[i], names[j]): float(point[k]) for k, (i, j) in enumerate(pairs)},
        mean_ccc=float(point[ref_pairs].mean()), min_ccc=float(point[ref_pairs].min()),
        mean_ccc_all_pairs=float(point.mean()), mean_ccc_ci=intervals["mean"], min_ccc_ci=intervals["min"],
        mean_ccc_all_pairs_ci=intervals["all"], n_specimens=n_spec, n_runs=n_runs, n_bootstrap=n_bootstrap,
        ci_level=ci_level)
    if labels is not None:
        y = np.asarray(labels).reshape(-1)
        if len(y) != n_spec:
            raise ValueError(f"{len(y)} labels for {n_spec} specimens")
        for a, name in enumerate(names):
            keep = present[a]
            aucs = [roc_auc(y[keep], stack[a, r, keep]) for r in range(n_runs)]
            result.auc[name], result.auc_sd[name] = mean_std(aucs)
        result.auc_drop = {name: result.auc[reference] - result.auc[name] for name in names}
    return result


def score_table(specimen_ids: Sequence[str], acquisitions: Sequence[str], scores) -> tuple[list[str], dict[str, np.ndarray]]:
    """Long form (one entry per slide) -> ``(specimens, {acquisition: scores aligned on them})``.

    ``scores`` ``(N,)`` or ``(R, N)``; a specimen missing under an acquisition gets NaN; a
    (specimen, acquisition) given twice is an error."""
    values = np.asarray(scores, dtype=np.float64)
    values = values[None] if values.ndim == 1 else values
    if values.shape[1] != len(specimen_ids) or len(acquisitions) != len(specimen_ids):
        raise ValueError("one specimen id, acquisition and score per slide")
    specimens = list(dict.fromkeys(specimen_ids))
    column = {s: k for k, s in enumerate(specimens)}
    out: dict[str, np.ndarray] = {}
    for n, (spec, acq) in enumerate(zip(specimen_ids, acquisitions)):
        table = out.setdefault(acq, np.full((values.shape[0], len(specimens)), np.nan))
        if not np.isnan(table[:, column[spec]]).all():
            raise ValueError(f"specimen {spec} appears twice under {acq}")
        table[:, column[spec]] = values[:, n]
    if np.ndim(scores) == 1:
        out = {a: t[0] for a, t in out.items()}
    return specimens, out


def ccc_grid(ccc_by_acquisition: Mapping[str, float], row_of: Mapping[str, str],
             column_of: Mapping[str, str]) -> tuple[list[str], list[str], np.ndarray]:
    """A heatmap's cells: ``(rows, columns, values)`` with ``values[i, j]`` the CCC of the
    acquisition whose row (e.g. staining) is ``rows[i]`` and column (e.g. scanner) ``columns[j]``;
    NaN where no acquisition has that combination. Rows and columns in first-seen order."""
    rows = list(dict.fromkeys(row_of[a] for a in ccc_by_acquisition))
    cols = list(dict.fromkeys(column_of[a] for a in ccc_by_acquisition))
    grid = np.full((len(rows), len(cols)), np.nan)
    for a, value in ccc_by_acquisition.items():
        grid[rows.index(row_of[a]), cols.index(column_of[a])] = value
    return rows, cols, grid
