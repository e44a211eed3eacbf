"""Classification metrics for the EVA and slide-level suites (pure functions, arrays in, numbers out).

Balanced accuracy is eva's monitored and reported metric: torchmetrics'
``MulticlassAccuracy(average="macro")`` for multiclass tasks and ``BinaryBalancedAccuracy``
(threshold 0.5 on the sigmoid, i.e. a logit > 0) for binary ones — both the mean over classes
of the per-class recall. Classes absent from ``y_true`` are left out of the mean (sklearn's
``balanced_accuracy_score``); on eva's datasets every class occurs in every split, so this
never differs from torchmetrics there.
"""

from __future__ import annotations

import numpy as np
import torch


def balanced_accuracy(y_true, y_pred, num_classes: int | None = None) -> float:
    """Mean per-class recall.

    Args:
        y_true: ``(N,)`` integer labels in ``[0, C)``.
        y_pred: ``(N,)`` integer predictions in ``[0, C)``.
        num_classes: ``C`` (default: ``max(y_true, y_pred) + 1``).

    Returns:
        The mean over the classes present in ``y_true`` of ``correct_c / count_c``.
    """
    y_true = np.asarray(y_true).reshape(-1).astype(np.int64)
    y_pred = np.asarray(y_pred).reshape(-1).astype(np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in length")
    if len(y_true) == 0:
        raise ValueError("balanced accuracy of an empty set")
    c = num_classes or int(max(y_true.max(), y_pred.max())) + 1
    count = np.bincount(y_true, minlength=c).astype(np.float64)
    correct = np.bincount(y_true[y_true == y_pred], minlength=c).astype(np.float64)
    present = count > 0
    return float(np.mean(correct[present] / count[present]))


def predictions_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Class predictions from linear-head outputs.

    ``logits`` ``(..., C)`` with ``C > 1``: argmax. ``C == 1`` (binary, one logit, as eva's
    BCEWithLogits heads): ``logit > 0``, the same as ``sigmoid(logit) > 0.5``.
    Returns int64 ``(...)``."""
    if logits.shape[-1] == 1:
        return (logits[..., 0] > 0).long()
    return logits.argmax(dim=-1)


def balanced_accuracy_batched(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Balanced accuracy of several prediction sets against one label vector at once.

    Args:
        y_true: int64 ``(N,)``.
        y_pred: int64 ``(R, N)`` — one row per probe run.
        num_classes: ``C``.

    Returns:
        float64 ``(R,)``: :func:`balanced_accuracy` of each row.
    """
    count = torch.bincount(y_true, minlength=num_classes).double()
    hit = (y_pred == y_true[None]).double()  # (R, N)
    correct = torch.zeros(y_pred.shape[0], num_classes, dtype=torch.float64, device=y_pred.device)
    correct.index_add_(1, y_true, hit)
    present = count > 0
    return (correct[:, present] / count[present]).mean(dim=1)


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for one value), as eva's session
    recorder reports runs (``statistics.mean`` / ``statistics.stdev``)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(v) == 0:
        raise ValueError("mean_std of no values")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


# -- slide-level metrics (eva's BinaryClassificationMetrics / MulticlassClassificationMetrics) --

def roc_auc(y_true, scores) -> float:
    """Binary AUROC: the probability that a positive outranks a negative, ties counting one
    half (Mann-Whitney U with mid-ranks; equal to ``sklearn.metrics.roc_auc_score``).

    Args:
        y_true: ``(N,)`` labels in {0, 1}; both must occur.
        scores: ``(N,)`` scores (probabilities or logits), higher = positive.
    """
    y = np.asarray(y_true).reshape(-1).astype(np.int64)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"y_true {y.shape} and scores {s.shape} differ in length")
    if not np.isfinite(s).all():
        raise ValueError("AUROC of non-finite scores")
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if n_pos == 0 or n_neg == 0 or n_pos + n_neg != len(y):
        raise ValueError("AUROC needs binary labels with both classes present")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # mid-ranks of tied runs
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    mid = (starts + ends + 1) / 2.0  # 1-based average rank of each run
    ranks[order] = np.repeat(mid, ends - starts)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_auc_macro(y_true, probs) -> float:
    """Multiclass AUROC, one-vs-rest, macro mean over the classes that have both positives
    and negatives. ``probs`` ``(N, C)``."""
    y = np.asarray(y_true).reshape(-1).astype(np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or len(p) != len(y):
        raise ValueError(f"probs {p.shape} must be (N, C) for {len(y)} labels")
    aucs = [roc_auc((y == c).astype(np.int64), p[:, c]) for c in range(p.shape[1])
            if 0 < (y == c).sum() < len(y)]
    if not aucs:
        raise ValueError("AUROC needs at least two classes present")
    return float(np.mean(aucs))


def _confusion(y_true, y_pred, num_classes: int) -> np.ndarray:
    y = np.asarray(y_true).reshape(-1).astype(np.int64)
    p = np.asarray(y_pred).reshape(-1).astype(np.int64)
    if y.shape != p.shape:
        raise ValueError(f"y_true {y.shape} and y_pred {p.shape} differ in length")
    return np.bincount(y * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def precision_recall_f1(y_true, y_pred, num_classes: int = 2) -> tuple[float, float, float]:
    """Precision, recall and F1 as torchmetrics reports them: of class 1 for binary tasks;
    for multiclass the macro mean over classes with any support or prediction. A zero
    denominator scores 0."""
    cm = _confusion(y_true, y_pred, num_classes).astype(np.float64)
    tp = np.diag(cm)
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
    if num_classes == 2:
        return float(precision[1]), float(recall[1]), float(f1[1])
    seen = (tp + fp + fn) > 0
    return float(precision[seen].mean()), float(recall[seen].mean()), float(f1[seen].mean())


def slide_metrics(y_true, probs, num_classes: int, threshold: float = 0.5) -> dict[str, float]:
    """eva's slide-level metrics of one run: ``balanced_accuracy`` (the headline), ``accuracy``,
    ``auroc``, ``f1``, ``precision``, ``recall``.

    Args:
        y_true: ``(N,)`` labels in ``[0, C)``.
        probs: binary: ``(N,)`` positive-class probabilities, predicted positive when
            ``> threshold`` (eva: 0.5); multiclass: ``(N, C)`` probabilities, argmax.
        num_classes: ``C``.
    """
    y = np.asarray(y_true).reshape(-1).astype(np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if num_classes == 2:
        p = p.reshape(-1)
        pred = (p > threshold).astype(np.int64)
        auroc = roc_auc(y, p)
    else:
        pred = p.argmax(-1)
        auroc = roc_auc_macro(y, p)
    precision, recall, f1 = precision_recall_f1(y, pred, num_classes)
    return {"balanced_accuracy": balanced_accuracy(y, pred, num_classes), "accuracy": float((pred == y).mean()),
            "auroc": auroc, "f1": f1, "precision": precision, "recall": recall}


def summarise_runs(per_run: list[dict[str, float]]) -> dict[str, float]:
    """``{metric}_mean`` and ``{metric}_sd`` (sample sd) over runs' metric dicts."""
    out = {}
    for key in per_run[0]:
        out[f"{key}_mean"], out[f"{key}_sd"] = mean_std([r[key] for r in per_run])
    return out


def slide_metrics_runs(y_true, probs, num_classes: int, threshold: float = 0.5) -> tuple[list[dict[str, float]], dict[str, float]]:
    """:func:`slide_metrics` of every run and their mean / sample sd. ``probs`` ``(R, N)``
    (binary) or ``(R, N, C)``. Returns ``(per_run, summary)``."""
    per_run = [slide_metrics(y_true, p, num_classes, threshold) for p in np.asarray(probs)]
    return per_run, summarise_runs(per_run)
