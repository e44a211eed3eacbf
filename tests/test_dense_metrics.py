"""Segmentation metrics and the Dice loss: hand cases (MONAI's and torchmetrics 1.6's
definitions worked out by hand) and, where MONAI / torchmetrics are installed, eva 0.4.5's
metric pipeline run with the libraries themselves."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pathrobust.metrics.segmentation import consistency_dice, confusion_per_image, segmentation_scores
from pathrobust.probes.decoder import dice_loss


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one thread avoids OpenMP barrier stalls on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _maps(*rows):
    return np.array(rows, dtype=np.int64)


# Two 2x4 images, classes 0 (background), 1, 2.
# image A: target class 1 on 4 px, class 2 absent; prediction hits 3 of them + 1 px of class 1
#          elsewhere, and predicts class 2 on 1 px.
# image B: target all background; prediction has class 2 on 2 px.
TARGET = np.stack([_maps([1, 1, 1, 1], [0, 0, 0, 0]), _maps([0, 0, 0, 0], [0, 0, 0, 0])])
PRED = np.stack([_maps([1, 1, 1, 0], [1, 2, 0, 0]), _maps([2, 2, 0, 0], [0, 0, 0, 0])])


def test_confusion_counts_pixels_per_image():
    m = confusion_per_image(PRED, TARGET, 3)
    assert m.shape == (2, 3, 3)
    assert m[0].tolist() == [[2, 1, 1], [1, 3, 0], [0, 0, 0]]
    assert m[1].tolist() == [[6, 0, 2], [0, 0, 0], [0, 0, 0]]


def test_hand_case_empty_classes_and_all_background_image():
    s = segmentation_scores(PRED, TARGET, 3, class_names=["bg", "a", "b"], batch_size=1)
    # MONAI, ignore_empty=True: A: class 1 = 2*3/(4+4) = 0.75, class 2 NaN -> 0.75;
    # B has no foreground in its target: left out of the image mean.
    assert s["dice"] == pytest.approx(0.75)
    # ignore_empty=False: A: class 2 absent but predicted -> 0 -> (0.75 + 0) / 2;
    # B: class 1 absent, not predicted -> 1; class 2 absent, predicted -> 0 -> 0.5.
    assert s["dice_ignore_empty_false"] == pytest.approx((0.375 + 0.5) / 2)
    # torchmetrics 1.6, per image then mean, zero division = 1:
    # micro A: (6 + 0) / (8 + 1) ; B: 0 / (0 + 2) = 0
    assert s["dice_micro"] == pytest.approx((6 / 9 + 0.0) / 2)
    # macro A: (0.75 + 0/(0+1)) / 2; B: (1 [0/0] + 0) / 2
    assert s["dice_macro"] == pytest.approx((0.375 + 0.5) / 2)
    # weighted A: support (4, 0) -> 0.75; B: support (0, 0) -> weights 1 each -> 1 + 0
    assert s["dice_weighted"] == pytest.approx((0.75 + 1.0) / 2)
    # MeanIoU (updates of 1 image): A: class 1 = 3 / (4 + 4 - 3) = 0.6, class 2 = 0 / 1 -> 0.3;
    # B: class 1 0/0 -> 0, class 2 0/2 -> 0 -> 0
    assert s["mean_iou"] == pytest.approx(0.15)
    # per class (background included), mean over images whose target has the class:
    # bg: A 2*2/(4+3) = 4/7, B 2*6/(8+6) = 6/7; a: 0.75; b: never in a target -> NaN
    assert s["dice_bg"] == pytest.approx((4 / 7 + 6 / 7) / 2)
    assert s["dice_a"] == pytest.approx(0.75)
    assert math.isnan(s["dice_b"])


def test_mean_iou_averages_per_update():
    one = segmentation_scores(PRED, TARGET, 3, batch_size=None)["mean_iou"]
    assert one == pytest.approx(0.15)  # one update of two images: (0.3 + 0) / 2
    three = np.concatenate([PRED, PRED[:1]]), np.concatenate([TARGET, TARGET[:1]])
    # updates of 2: [A, B] -> 0.15, [A] -> 0.3 -> 0.225 (not the image mean 0.2)
    assert segmentation_scores(*three, 3, batch_size=2)["mean_iou"] == pytest.approx(0.225)


def test_all_background_targets():
    target = np.zeros((2, 3, 3), dtype=np.int64)
    pred = np.zeros_like(target)
    pred[1, 0, 0] = 1
    s = segmentation_scores(pred, target, 2, class_names=["bg", "fg"])
    assert s["dice"] == 0.0  # MONAI's mean of nothing
    assert s["dice_ignore_empty_false"] == pytest.approx(0.5)  # 1 (empty, not predicted), 0 (predicted)
    assert math.isnan(s["dice_fg"])


def test_ignored_index_eva_and_exclude():
    # classes 0..2, 2 ignored ("ambiguous"); the decoder predicts only 0, 1
    target = _maps([1, 1, 2, 2], [0, 0, 0, 2])[None]
    pred = _maps([1, 0, 1, 0], [0, 1, 0, 0])[None]
    eva = segmentation_scores(pred, target, 3, class_names=["bg", "fg", "amb"], ignore_index=2)
    # eva: ignored target pixels become "no class" but predictions there still count:
    # class 1: tp 1, |t| 2, |p| 3 (one on an ambiguous pixel) -> 2/5
    assert eva["dice"] == pytest.approx(2 / 5)
    # background (per-class key): tp 2, |t| 3, |p| 5 (two on ambiguous pixels) -> 4/8
    assert eva["dice_bg"] == pytest.approx(0.5)
    assert "dice_amb" not in eva
    clean = segmentation_scores(pred, target, 3, class_names=["bg", "fg", "amb"], ignore_index=2,
                                ignore_mode="exclude")
    assert clean["dice"] == pytest.approx(2 / (2 + 2))  # ambiguous pixels dropped: |p| 2
    assert clean["dice_bg"] == pytest.approx(4 / 6)


def test_class_ids_out_of_range_rejected():
    with pytest.raises(ValueError, match="outside"):
        confusion_per_image(np.full((1, 2, 2), 3), np.zeros((1, 2, 2), int), 3)


def test_consistency_dice_against_reference_prediction():
    ref = _maps([1, 1, 0, 0], [0, 0, 0, 0])[None].repeat(2, 0)
    ref[1] = 0
    other = _maps([1, 0, 0, 0], [0, 0, 0, 0])[None].repeat(2, 0)
    c = consistency_dice(other, ref, 2)
    assert c[0] == pytest.approx(2 * 1 / 3)
    assert math.isnan(c[1])


def test_dice_loss_hand_value():
    # one pixel per class, logits that softmax to known probabilities
    logits = torch.log(torch.tensor([[0.7, 0.2], [0.3, 0.8]])).T.reshape(2, 2, 1, 1).permute(1, 0, 2, 3)
    target = torch.tensor([0, 1]).view(2, 1, 1)
    probs = torch.softmax(logits, 1)[:, :, 0, 0]  # rows: pixels
    expect = []
    for c in range(2):
        inter = float(probs[c, c])  # pixel c has class c
        expect.append(1 - (2 * inter + 1e-5) / (1 + float(probs[:, c].sum()) + 1e-5))
    assert float(dice_loss(logits, target)) == pytest.approx(sum(expect) / 2, abs=1e-7)


# -- the libraries themselves, through eva's wrappers ------------------------------------------
def _eva_index_to_one_hot(x: torch.Tensor, c: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(x.long(), num_classes=c).movedim(-1, 1)


def _eva_apply_ignore(preds, target, ignore):  # eva.vision.metrics.segmentation._utils
    mask = preds[:, ignore] == 1
    target = target * (~mask.unsqueeze(1))
    drop = lambda t: torch.cat([t[:, :ignore], t[:, ignore + 1:]], dim=1)  # noqa: E731
    return drop(preds), drop(target)


def _eva_reference(pred, target, num_classes, ignore_index, batch):
    monai = pytest.importorskip("monai.metrics")
    seg = pytest.importorskip("torchmetrics.segmentation")
    from torchmetrics.functional.segmentation.dice import _dice_score_update

    k = num_classes - (ignore_index is not None)
    m_true = monai.DiceMetric(include_background=False, ignore_empty=True, num_classes=k)
    m_false = monai.DiceMetric(include_background=False, ignore_empty=False, num_classes=k)
    m_class = monai.DiceMetric(include_background=True, reduction="none", num_classes=k)
    iou = seg.MeanIoU(num_classes=k, include_background=False)
    dice = {a: [] for a in ("micro", "macro", "weighted")}
    dice_mods = {a: seg.DiceScore(num_classes=k, include_background=False, average=a, input_format="one-hot")
                 for a in dice}
    for start in range(0, len(pred), batch):
        p = _eva_index_to_one_hot(pred[start:start + batch], num_classes)
        t = _eva_index_to_one_hot(target[start:start + batch], num_classes)
        if ignore_index is not None:
            p, t = _eva_apply_ignore(p, t, ignore_index)
        for m in (m_true, m_false, m_class):
            m(p, t)
        iou.update(p.long(), t.long())
        for a, mod in dice_mods.items():
            num, den, sup = _dice_score_update(p.long(), t.long(), k, False, "one-hot")
            mod.numerator.append(num)
            mod.denominator.append(den)
            mod.support.append(sup)
    out = {"dice": float(m_true.aggregate()), "dice_ignore_empty_false": float(m_false.aggregate()),
           "mean_iou": float(iou.compute())}
    for a, mod in dice_mods.items():
        out[f"dice_{a}"] = float(mod.compute())
    out["per_class"] = m_class.aggregate().nanmean(dim=0).tolist()
    return out


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("num_classes,ignore_index", [(5, None), (6, 5)])
def test_matches_monai_and_torchmetrics_through_eva_wrappers(num_classes, ignore_index):
    g = torch.Generator().manual_seed(0)
    n, size = 10, 24
    outputs = num_classes - (ignore_index is not None)
    # sparse classes: some images lack some classes, two images are all background
    target = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(2, n):
        for c in torch.randperm(num_classes - 1, generator=g)[: 1 + i % 3].tolist():
            y, x = torch.randint(0, size - 8, (2,), generator=g).tolist()
            target[i, y:y + 8, x:x + 8] = c + 1
    pred = target.clone()
    pred[pred >= outputs] = 0
    noise = torch.rand(n, size, size, generator=g) < 0.2
    pred[noise] = torch.randint(0, outputs, (int(noise.sum()),), generator=g)
    ref = _eva_reference(pred, target, num_classes, ignore_index, batch=4)
    names = [f"c{k}" for k in range(num_classes)]
    ours = segmentation_scores(pred, target, num_classes, class_names=names, ignore_index=ignore_index, batch_size=4)
    for key in ("dice", "dice_ignore_empty_false", "dice_micro", "dice_macro", "dice_weighted", "mean_iou"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-6), key
    kept = [k for k in range(num_classes) if k != ignore_index]
    for k, value in zip(kept, ref["per_class"]):
        assert ours[f"dice_c{k}"] == pytest.approx(value, abs=1e-6, nan_ok=True)


@pytest.mark.parametrize("ignore_index", [None, 4])
def test_dice_loss_matches_monai_through_eva_wrapper(ignore_index):
    losses = pytest.importorskip("monai.losses")
    from monai.networks import one_hot

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 6, 6, generator=g, requires_grad=True)
    target = torch.randint(0, 5 if ignore_index else 4, (3, 6, 6), generator=g)
    # eva.vision.losses.DiceLoss.forward
    x, t = logits, target
    if ignore_index is not None:
        mask = t != ignore_index
        t = t * mask
        x = torch.mul(x, mask.unsqueeze(1))
    ref = losses.DiceLoss(softmax=True, batch=True)(x, one_hot(t[:, None], num_classes=4))
    ours = dice_loss(logits, target, ignore_index=ignore_index)
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), abs=1e-6)
    (g_ref,) = torch.autograd.grad(ref, logits)
    (g_ours,) = torch.autograd.grad(ours, logits)
    assert torch.allclose(g_ours, g_ref, atol=1e-7)
