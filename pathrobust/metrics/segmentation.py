"""Semantic-segmentation metrics (pure: label maps in, numbers out), as eva 0.4.5 reports them.

Everything derives from one per-image confusion matrix ``M[i, t, p]`` (pixels of image ``i``
with target ``t`` and prediction ``p``), so each metric below is a few sums of it.

eva's ``MulticlassSegmentationMetrics`` (``include_background=False``) and the per-class
wrapper, with the library versions of eva 0.4.5's lock file (MONAI 1.3.2, torchmetrics 1.6.0):

* ``dice`` — MONAI ``DiceMetric(include_background=False, ignore_empty=True)``, eva's
  ``val/MonaiDiceScore`` (monitored and reported): per image and class ``2 TP / (|target| +
  |pred|)``; a class absent from the image's target is NaN (skipped); each image's mean over
  its non-NaN classes, then the mean over the images that have at least one (an image with
  only background in its target is left out);
* ``dice_ignore_empty_false`` — the same with ``ignore_empty=False``: an absent class scores 1
  when it is not predicted either, else 0 (so every image counts);
* ``dice_micro``, ``dice_macro``, ``dice_weighted`` — torchmetrics 1.6.0 ``DiceScore``
  (``input_format="one-hot"``): per image, micro = ``sum 2TP / sum (|t| + |p|)`` over the
  classes, macro = the mean of the per-class Dice, weighted = the per-class Dice weighted by
  the target's share of each class; a zero denominator counts as 1 (torchmetrics 1.6's
  ``zero_division=1.0``, weights included), then the plain mean over images (torchmetrics
  >= 1.7 turned empty classes into NaN and skips them; 1.6 is what eva 0.4.5 locks);
* ``mean_iou`` — torchmetrics 1.6.0 ``MeanIoU``: per image ``TP / (|t| + |p| - TP)`` with
  0 for a zero union, the plain mean over the classes (absent classes count as 0), the mean
  over the images of each update (validation batch), then the mean over the updates;
* ``dice_<class>`` — eva's ``ClasswiseWrapper(MonaiDiceScore(include_background=True,
  reduction="none"))``: per class, the mean over the images whose target has that class
  (NaN where none has), background included.

Ignored class (MoNuSAC's ``ambiguous``, ``ignore_index=5`` with 6 metric classes; the
decoder has 5 outputs): eva one-hot encodes 6 classes, zeroes the target where the
*prediction* is the ignored class, then drops that channel from both. A pixel whose target is
ignored therefore still counts as a false positive for whatever class was predicted there
(background included where background counts). That is ``ignore_mode="eva"`` (the
reference). ``ignore_mode="exclude"`` is the clean variant: pixels whose target is the
ignored class are left out of every count.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

IGNORE_MODES = ("eva", "exclude")


def _as_long(labels) -> torch.Tensor:
    t = labels if isinstance(labels, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(labels))
    return t.long()


def confusion_per_image(pred, target, num_classes: int) -> torch.Tensor:
    """Per-image confusion matrices.

    Args:
        pred: predicted class indices ``(N, H, W)`` (any integer array or tensor).
        target: target class indices ``(N, H, W)``, values in ``[0, num_classes)``.
        num_classes: ``C``, every index either may take.

    Returns:
        int64 ``(N, C, C)``: ``[i, t, p]`` = pixels of image ``i`` with target ``t``, prediction ``p``.
    """
    p, t = _as_long(pred), _as_long(target)
    if p.shape != t.shape or p.ndim < 2:
        raise ValueError(f"pred {tuple(p.shape)} and target {tuple(t.shape)} must be equal (N, H, W) label maps")
    n = p.shape[0]
    p, t = p.reshape(n, -1), t.reshape(n, -1)
    for name, x in (("pred", p), ("target", t)):
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= num_classes):
            raise ValueError(f"{name} has class ids outside [0, {num_classes})")
    flat = t * num_classes + p + (torch.arange(n, device=p.device) * num_classes * num_classes)[:, None]
    counts = torch.bincount(flat.reshape(-1), minlength=n * num_classes * num_classes)
    return counts.view(n, num_classes, num_classes)


def class_counts(confusion: torch.Tensor, ignore_index: int | None = None,
                 ignore_mode: str = "eva") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """True positives, target and prediction sizes per image and kept class.

    Returns ``(tp, target_sum, pred_sum, classes)``: float64 ``(N, K)`` each, over the ``K``
    classes other than ``ignore_index`` (their ids in ``classes``), per the module's
    ``ignore_mode`` rules."""
    if ignore_mode not in IGNORE_MODES:
        raise ValueError(f"ignore_mode '{ignore_mode}': expected one of {IGNORE_MODES}")
    m = confusion.double()
    c = m.shape[-1]
    if ignore_index is not None and not 0 < ignore_index < c:
        raise ValueError(f"ignore_index {ignore_index} must be a non-background class id in [1, {c})")
    classes = [k for k in range(c) if k != ignore_index]
    if ignore_index is not None:
        if ignore_mode == "eva":
            # target zeroed where the *prediction* is the ignored class: that column counts nowhere
            m = m.clone()
            m[:, :, ignore_index] = 0
            pred_sum = m.sum(dim=1)  # includes rows whose target is the ignored class
        else:
            m = m.clone()
            m[:, ignore_index, :] = 0
            pred_sum = m.sum(dim=1)
    else:
        pred_sum = m.sum(dim=1)
    tp = torch.diagonal(m, dim1=1, dim2=2)
    target_sum = m.sum(dim=2)
    idx = torch.tensor(classes)
    return tp[:, idx], target_sum[:, idx], pred_sum[:, idx], classes


def monai_dice_per_image(tp: torch.Tensor, target_sum: torch.Tensor, pred_sum: torch.Tensor,
                         ignore_empty: bool = True) -> torch.Tensor:
    """MONAI ``DiceHelper.compute_channel`` on counts ``(N, K)`` -> ``(N, K)`` (NaN = ignored)."""
    dice = 2.0 * tp / (target_sum + pred_sum).clamp_min(1e-300)
    empty = target_sum == 0
    if ignore_empty:
        fill = torch.full_like(dice, float("nan"))
    else:
        fill = (pred_sum == 0).double()  # 1 when nothing is predicted either, else 0
    return torch.where(empty, fill, dice)


def monai_mean(per_image: torch.Tensor) -> float:
    """MONAI ``do_metric_reduction(..., "mean")``: per image the mean over non-NaN classes,
    then the mean over images with at least one; 0 when no image has any."""
    valid = ~torch.isnan(per_image)
    per_row = valid.sum(dim=1)
    row_mean = torch.where(per_row > 0, torch.nan_to_num(per_image).sum(dim=1) / per_row.clamp_min(1), 0.0)
    rows = per_row > 0
    return float(row_mean[rows].mean()) if rows.any() else 0.0


def _safe_div(num: torch.Tensor, den: torch.Tensor, zero: float) -> torch.Tensor:
    return torch.where(den != 0, num / torch.where(den != 0, den, 1.0), torch.full_like(num, zero))


def torchmetrics_dice(tp: torch.Tensor, target_sum: torch.Tensor, pred_sum: torch.Tensor, average: str) -> float:
    """torchmetrics 1.6.0 ``DiceScore(average=...)`` on counts ``(N, K)`` (see module docstring)."""
    num, den = 2.0 * tp, target_sum + pred_sum
    if average == "micro":
        per_image = _safe_div(num.sum(dim=1), den.sum(dim=1), 1.0)
    else:
        dice = _safe_div(num, den, 1.0)
        if average == "macro":
            per_image = dice.mean(dim=1)
        elif average == "weighted":
            weights = _safe_div(target_sum, target_sum.sum(dim=1, keepdim=True).expand_as(target_sum), 1.0)
            per_image = (dice * weights).sum(dim=1)
        else:
            raise ValueError(f"average '{average}': expected micro, macro or weighted")
    return float(per_image.mean())


def torchmetrics_mean_iou(tp: torch.Tensor, target_sum: torch.Tensor, pred_sum: torch.Tensor,
                          batch_size: int | None = None) -> float:
    """torchmetrics 1.6.0 ``MeanIoU``: per image the mean IoU over classes (0 for a zero
    union), averaged per update of ``batch_size`` images, then over updates (one update of
    all images when ``batch_size`` is None)."""
    iou = _safe_div(tp, target_sum + pred_sum - tp, 0.0).mean(dim=1)
    size = batch_size or len(iou)
    batch_means = torch.stack([chunk.mean() for chunk in iou.split(size)])
    return float(batch_means.mean())


def segmentation_scores(pred, target, num_classes: int, *, class_names: Sequence[str] | None = None,
                        ignore_index: int | None = None, ignore_mode: str = "eva",
                        batch_size: int | None = None) -> dict[str, float]:
    """All of eva's segmentation metrics for one evaluation (see the module docstring).

    Args:
        pred: predicted class indices ``(N, H, W)``.
        target: target class indices ``(N, H, W)``.
        num_classes: classes of the metric, the ignored one included (MoNuSAC: 6).
        class_names: names for the per-class keys (default ``class_<k>``), ``num_classes`` long.
        ignore_index: the ignored class (MoNuSAC: 5), or None.
        ignore_mode: ``eva`` (reference) or ``exclude`` (clean).
        batch_size: images per update for ``mean_iou`` (eva: the validation batch size, 64).

    Returns:
        ``dice``, ``dice_ignore_empty_false``, ``dice_micro``, ``dice_macro``,
        ``dice_weighted``, ``mean_iou`` and ``dice_<class name>`` for each kept class
        (NaN where no image's target has the class).
    """
    names = list(class_names) if class_names is not None else [f"class_{k}" for k in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    confusion = confusion_per_image(pred, target, num_classes)
    tp, ts, ps, classes = class_counts(confusion, ignore_index, ignore_mode)
    fg = slice(1, None)  # include_background=False: class 0 is the first kept class
    per_image = monai_dice_per_image(tp, ts, ps, ignore_empty=True)
    out = {
        "dice": monai_mean(per_image[:, fg]),
        "dice_ignore_empty_false": monai_mean(monai_dice_per_image(tp[:, fg], ts[:, fg], ps[:, fg], ignore_empty=False)),
        "dice_micro": torchmetrics_dice(tp[:, fg], ts[:, fg], ps[:, fg], "micro"),
        "dice_macro": torchmetrics_dice(tp[:, fg], ts[:, fg], ps[:, fg], "macro"),
        "dice_weighted": torchmetrics_dice(tp[:, fg], ts[:, fg], ps[:, fg], "weighted"),
        "mean_iou": torchmetrics_mean_iou(tp[:, fg], ts[:, fg], ps[:, fg], batch_size),
    }
    per_class = torch.nanmean(per_image, dim=0)
    for k, value in zip(classes, per_class.tolist()):
        out[f"dice_{names[k]}"] = float(value)
    return out


def consistency_dice(pred, reference_pred, num_classes: int) -> np.ndarray:
    """Segmentation consistency: Dice of predictions on the same tiles rendered otherwise
    (another staining or scanner) against the predictions on the reference rendering, taken
    as the target. Per tile, MONAI-style (foreground classes present in the reference
    prediction, background excluded); tiles whose reference prediction is all background are
    NaN. Returns float64 ``(N,)``; average with ``np.nanmean``."""
    tp, ts, ps, _ = class_counts(confusion_per_image(pred, reference_pred, num_classes))
    per_image = monai_dice_per_image(tp[:, 1:], ts[:, 1:], ps[:, 1:], ignore_empty=True)
    valid = ~torch.isnan(per_image)
    counts = valid.sum(dim=1)
    means = torch.nan_to_num(per_image).sum(dim=1) / counts.clamp_min(1)
    return torch.where(counts > 0, means, float("nan")).numpy()
