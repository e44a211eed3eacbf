"""Classification metrics for the EVA suite (pure functions, arrays in, numbers out).

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
