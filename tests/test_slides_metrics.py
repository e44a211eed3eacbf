"""Slide-level metrics: Lin's CCC, cross-acquisition concordance, AUROC / F1 at threshold 0.5."""

from __future__ import annotations

import numpy as np
import pytest

from pathrobust.metrics.classification import (
    precision_recall_f1,
    roc_auc,
    roc_auc_macro,
    slide_metrics,
    summarise_runs,
)
from pathrobust.metrics.concordance import ccc_grid, cross_acquisition, lins_ccc, pearson_r, score_table


def test_ccc_by_hand():
    x = np.array([0.1, 0.4, 0.5, 0.9])
    y = np.array([0.2, 0.3, 0.7, 0.8])
    mx, my = x.mean(), y.mean()
    cov = ((x - mx) * (y - my)).mean()  # population moments
    expected = 2 * cov / (x.var() + y.var() + (mx - my) ** 2)
    assert lins_ccc(x, y) == pytest.approx(expected, abs=1e-15)
    assert lins_ccc(x, x) == 1.0
    shifted = x + 0.3  # a bias shift keeps Pearson at 1 but costs concordance
    assert pearson_r(x, shifted) == pytest.approx(1.0)
    assert lins_ccc(x, shifted) < pearson_r(x, shifted)
    assert lins_ccc(x, shifted) == pytest.approx(2 * x.var() / (2 * x.var() + 0.09))
    assert lins_ccc(x, 2 * x) < 1.0  # a scale change too
    assert lins_ccc([0.5, 0.5], [0.5, 0.5]) == 1.0  # constant and equal: perfect agreement
    with pytest.raises(ValueError):
        lins_ccc([0.1, np.nan], [0.1, 0.2])


def test_cross_acquisition_pairs_drop_and_bootstrap():
    rng = np.random.default_rng(0)
    s = 30
    y = np.arange(s) % 2
    ref = np.clip(0.5 + 0.35 * (2 * y - 1) + 0.1 * rng.normal(size=s), 0, 1)
    near = ref + 0.01 * rng.normal(size=s)          # another scanner: almost the same scores
    far = 0.6 * ref + 0.3 + 0.1 * rng.normal(size=s)  # a stain change: shifted, compressed, noisier
    res = cross_acquisition({"ref": ref, "near": near, "far": far}, "ref", labels=y, n_bootstrap=300, seed=1)
    assert res.acquisitions == ["ref", "near", "far"]
    assert res.ccc_reference["near"] == pytest.approx(lins_ccc(ref, near))
    assert res.ccc_reference["far"] == pytest.approx(lins_ccc(ref, far))
    assert res.ccc_pairs[("near", "far")] == pytest.approx(lins_ccc(near, far))
    assert res.mean_ccc == pytest.approx((lins_ccc(ref, near) + lins_ccc(ref, far)) / 2)
    assert res.min_ccc == pytest.approx(lins_ccc(ref, far)) and res.min_ccc < res.ccc_reference["near"]
    assert res.mean_ccc_all_pairs == pytest.approx(np.mean(list(res.ccc_pairs.values())))
    for value, (lo, hi) in ((res.mean_ccc, res.mean_ccc_ci), (res.min_ccc, res.min_ccc_ci)):
        assert lo < value < hi and hi - lo < 0.5
    assert res.auc["ref"] == pytest.approx(roc_auc(y, ref))
    assert res.auc_drop["far"] == pytest.approx(res.auc["ref"] - res.auc["far"]) and res.auc_drop["ref"] == 0
    again = cross_acquisition({"ref": ref, "near": near, "far": far}, "ref", labels=y, n_bootstrap=300, seed=1)
    assert again.mean_ccc_ci == res.mean_ccc_ci  # seeded


def test_cross_acquisition_runs_and_missing_slides():
    rng = np.random.default_rng(2)
    runs = rng.random((3, 8))
    other = runs + 0.05
    other[:, 2] = np.nan  # specimen 2 not digitised under "b"
    res = cross_acquisition({"a": runs, "b": other}, "a", n_bootstrap=0)
    keep = np.arange(8) != 2
    per_run = [lins_ccc(runs[r, keep], other[r, keep]) for r in range(3)]
    assert res.ccc_reference["b"] == pytest.approx(np.mean(per_run))
    assert res.ccc_reference_sd["b"] == pytest.approx(np.std(per_run, ddof=1))
    assert np.isnan(res.mean_ccc_ci[0]) and res.n_runs == 3
    with pytest.raises(ValueError, match="reference acquisition 'c'"):
        cross_acquisition({"a": runs, "b": other}, "c")


def test_score_table_and_heatmap_grid():
    specimens, table = score_table(["s1", "s2", "s1", "s2"], ["A", "A", "B", "B"], [0.1, 0.2, 0.3, 0.4])
    assert specimens == ["s1", "s2"] and table["B"].tolist() == [0.3, 0.4]
    with pytest.raises(ValueError, match="twice"):
        score_table(["s1", "s1"], ["A", "A"], [0.1, 0.2])
    rows, cols, grid = ccc_grid({"GV_P": 0.9, "KRH_S60": 0.8, "KRH_P": 0.7},
                                {"GV_P": "GV", "KRH_S60": "KRH", "KRH_P": "KRH"},
                                {"GV_P": "P", "KRH_S60": "S60", "KRH_P": "P"})
    assert rows == ["GV", "KRH"] and cols == ["P", "S60"]
    assert grid[1].tolist() == [0.7, 0.8] and grid[0, 0] == 0.9 and np.isnan(grid[0, 1])


def test_auroc_f1_against_hand_counts():
    y = np.array([0, 0, 1, 1, 1, 0])
    s = np.array([0.1, 0.6, 0.6, 0.8, 0.4, 0.3])
    # 9 positive/negative pairs: positive 0.6 ties negative 0.6 (one half), beats 0.1 and 0.3;
    # 0.8 beats all three; 0.4 beats 0.1 and 0.3 -> (2.5 + 3 + 2) / 9
    assert roc_auc(y, s) == pytest.approx(7.5 / 9)
    pred = (s > 0.5).astype(int)  # [0, 1, 1, 1, 0, 0]: TP 2, FP 1, FN 1
    assert precision_recall_f1(y, pred) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    m = slide_metrics(y, s, 2)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 2 / 3) / 2) and m["accuracy"] == pytest.approx(4 / 6)
    assert slide_metrics(y, np.full(6, 0.5), 2)["recall"] == 0.0  # 0.5 is not above the threshold
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1]])
    yy = np.array([0, 1, 2, 1])
    assert roc_auc_macro(yy, probs) == pytest.approx(np.mean([roc_auc(yy == c, probs[:, c]) for c in range(3)]))
    mm = slide_metrics(yy, probs, 3)
    assert mm["balanced_accuracy"] == pytest.approx((1 + 0.5 + 1) / 3)
    # per-class F1: class 0: TP 1, FP 1 -> 2/3; class 1: TP 1, FN 1 -> 2/3; class 2: 1
    assert mm["f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    summary = summarise_runs([m, slide_metrics(y, 1 - s, 2)])
    assert summary["auroc_mean"] == pytest.approx((7.5 / 9 + 1.5 / 9) / 2) and summary["auroc_sd"] > 0
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([1, 1], [0.2, 0.3])
