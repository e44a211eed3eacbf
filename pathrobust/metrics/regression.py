"""Gene-expression regression scores (pure): per-gene Pearson and the fold summary of
HEST-Benchmark (``scipy.stats.pearsonr`` per gene; ``merge_fold_results``). The ridge probe
that produces the predictions is :mod:`pathrobust.probes.ridge`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pearson_per_gene(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Pearson r of each column: ``y_true``, ``y_pred`` ``(N, G)`` -> ``(G,)``.

    Matches ``scipy.stats.pearsonr`` per column; a constant column gives NaN (as scipy does)."""
    yt = np.asarray(y_true, dtype=np.float64)
    yp = np.asarray(y_pred, dtype=np.float64)
    if yt.shape != yp.shape or yt.ndim != 2:
        raise ValueError(f"y_true {yt.shape} and y_pred {yp.shape} must be the same (N, G) shape")
    yt = yt - yt.mean(axis=0)
    yp = yp - yp.mean(axis=0)
    # scipy normalises each centred vector before the dot product; do the same for rounding.
    nt = np.linalg.norm(yt, axis=0)
    np_ = np.linalg.norm(yp, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.einsum("ng,ng->g", yt / nt, yp / np_)
    r = np.clip(r, -1.0, 1.0)
    r[(nt == 0) | (np_ == 0)] = np.nan
    return r


def fold_summary(fold_means: Sequence[float]) -> tuple[float, float]:
    """HEST ``merge_fold_results``: ``(np.mean, np.std)`` (population std) over fold scores."""
    arr = np.asarray(fold_means, dtype=np.float64)
    return float(np.mean(arr)), float(np.std(arr))
