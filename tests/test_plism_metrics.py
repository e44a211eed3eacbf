"""PLISM metrics against hand-computed cases, a direct float64 2n×2n implementation of the
definition, and a re-implementation of plismbench's float32 algorithm."""

import numpy as np
import pytest
import torch

from pathrobust.metrics import plism as M


def dense_topk_f64(a, b, ks):
    """The definition, directly: 2n×2n cosine matrix in float64, query dropped by index,
    ties scored as the expected hit under a random tie-break."""
    m = np.concatenate([a, b]).astype(np.float64)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    sims = m @ m.T
    n = len(a)
    out = {}
    for k in ks:
        hits = np.zeros(2 * n)
        for r in range(2 * n):
            partner = r + n if r < n else r - n
            others = np.delete(sims[r], [r, partner])
            # ties up to 1e-9: float64 GEMM rows of identical inputs may differ in the last ulp
            g = np.sum(others > sims[r, partner] + 1e-9)
            t = np.sum(np.abs(others - sims[r, partner]) <= 1e-9)
            hits[r] = np.clip((k - g) / (t + 1), 0, 1)
        out[k] = (hits[:n].mean() + hits[n:].mean()) / 2
    return out


def plismbench_f32(a, b, ks):
    """plismbench's float32 algorithm (engine/evaluate.py core_compute_metrics), rewritten."""
    m = np.concatenate([a, b]).astype(np.float32)
    n = len(a)
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    cos = (m @ m.T) / (norms * norms.T)
    cosine = float(np.diag(cos[:n, n:]).mean())
    kmax = max(ks)
    top = np.argpartition(-cos, range(1, kmax + 1), axis=1)[:, 1:kmax + 1]
    acc = {}
    for k in ks:
        hit_a = np.any(top[:n, :k] == np.arange(n, 2 * n)[:, None], axis=1).mean()
        hit_b = np.any(top[n:, :k] == np.arange(0, n)[:, None], axis=1).mean()
        acc[k] = (hit_a + hit_b) / 2
    return cosine, acc


def signal_pair(n=160, d=24, noise=0.9, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, d)).astype(np.float32)
    b = (a + noise * rng.normal(size=(n, d))).astype(np.float32)
    return a, b


def test_plismbench_hand_case():
    # plismbench tests/metrics/test_retrieval.py: expected [0.125, 1] for k = [1, 7]
    a = np.array([[0, 1], [1, 0], [0, -1], [-1, 0]], np.float32)
    b = np.array([[0.1, 1.1], [0.2, 1.1], [0.3, 1.1], [0.4, 1.1]], np.float32)
    res = M.pair_metrics_from_features(a, b, topk=(1, 7))
    assert res.topk_accuracy[1] == pytest.approx(0.125, abs=1e-12)
    assert res.topk_accuracy[7] == 1.0


def test_ties_hand_case():
    # A0=(1,0) A1=(0,1) B0=B1=(1,0). Worked by hand (see module doc's tie rule):
    # A0: partner 1, B1 tied -> k1 1/2; A1: partner 0, A0 and B0 tied -> k1 1/3, k2 2/3;
    # B0: partner 1, B1 tied -> k1 1/2; B1: partner 0, A0 and B0 above -> k1 0, k2 0.
    a = np.array([[1, 0], [0, 1]], np.float32)
    b = np.array([[1, 0], [1, 0]], np.float32)
    res = M.pair_metrics_from_features(a, b, topk=(1, 2, 3))
    assert res.topk_accuracy[1] == pytest.approx(((1 / 2 + 1 / 3) / 2 + (1 / 2 + 0) / 2) / 2, abs=1e-9)
    assert res.topk_accuracy[2] == pytest.approx(((1 + 2 / 3) / 2 + (1 + 0) / 2) / 2, abs=1e-9)
    assert res.topk_accuracy[3] == 1.0  # k = 2n - 1: the whole gallery
    assert res.cosine_similarity == pytest.approx(0.5)
    dense = dense_topk_f64(a, b, (1, 2, 3))
    for k in (1, 2, 3):
        assert res.topk_accuracy[k] == pytest.approx(dense[k], abs=1e-12)


def test_collapsed_encoder_scores_chance_not_perfect():
    # all features equal: every gallery row ties the partner; n - 1 > kmax forces the
    # within-slide recount path. Expected hit k / (2n - 1).
    n = 20
    a = np.ones((n, 8), np.float32)
    res = M.pair_metrics_from_features(a, a.copy(), topk=(1, 3), chunk=7)
    assert res.topk_accuracy[1] == pytest.approx(1 / (2 * n - 1), abs=1e-9)
    assert res.topk_accuracy[3] == pytest.approx(3 / (2 * n - 1), abs=1e-9)
    assert res.cosine_similarity == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("k_big", [7, 8, 50])
def test_k_at_least_gallery_size_is_one(k_big):
    a, b = signal_pair(n=4, d=3, noise=3.0)
    res = M.pair_metrics_from_features(a, b, topk=(1, k_big))
    assert res.topk_accuracy[k_big] == 1.0


def test_swap_invariance():
    a, b = signal_pair(n=90, d=16, noise=1.1, seed=3)
    ab = M.pair_metrics_from_features(a, b, chunk=31)
    ba = M.pair_metrics_from_features(b, a, chunk=31)
    assert ab.topk_accuracy == ba.topk_accuracy
    assert ab.cosine_similarity == pytest.approx(ba.cosine_similarity, abs=1e-7)


@pytest.mark.parametrize("seed,noise", [(0, 0.7), (1, 1.2), (2, 2.5)])
def test_agrees_with_dense_float64(seed, noise):
    a, b = signal_pair(n=150, d=24, noise=noise, seed=seed)
    ks = (1, 3, 5, 10)
    dense = dense_topk_f64(a, b, ks)
    fast = M.pair_metrics_from_features(a, b, topk=ks, chunk=37)
    for k in ks:
        assert fast.topk_accuracy[k] == pytest.approx(dense[k], abs=1e-6)
    cos = np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
    assert fast.cosine_similarity == pytest.approx(cos, abs=1e-6)
    # the per-tile values average to the pair values
    assert fast.tile_hits[10].mean() == pytest.approx(fast.topk_accuracy[10], abs=1e-12)


def test_agrees_with_plismbench_float32_algorithm():
    a, b = signal_pair(n=300, d=64, noise=1.6, seed=7)
    cos_ref, acc_ref = plismbench_f32(a, b, (1, 3, 5, 10))
    fast = M.pair_metrics_from_features(a, b, chunk=128)
    assert 0.05 < acc_ref[1] < 0.95  # a non-trivial case
    assert fast.cosine_similarity == pytest.approx(cos_ref, abs=1e-6)
    for k in (1, 3, 5, 10):
        assert fast.topk_accuracy[k] == pytest.approx(acc_ref[k], abs=1e-6)


def test_fp64_mode_and_low_precision_close():
    a, b = signal_pair(n=120, d=32, noise=1.0, seed=5)
    f64 = M.pair_metrics_from_features(a, b, dtype=torch.float64)
    dense = dense_topk_f64(a, b, (1, 3, 5, 10))
    for k in (1, 3, 5, 10):
        assert f64.topk_accuracy[k] == pytest.approx(dense[k], abs=1e-9)
    bf16 = M.pair_metrics_from_features(a, b, dtype=torch.bfloat16)
    assert bf16.cosine_similarity == pytest.approx(f64.cosine_similarity, abs=1e-2)
    assert bf16.topk_accuracy[10] == pytest.approx(f64.topk_accuracy[10], abs=0.05)


def test_slide_topk_excludes_self_and_pads():
    x = M.normalize_rows(np.eye(3, dtype=np.float32) + 0.1)
    top = M.slide_topk(x, kmax=4, chunk=2)
    assert top.shape == (3, 4)
    assert torch.isinf(top[:, 2:]).all()
    assert (top[:, :2] < 0.999).all()  # the self-similarity (1) is not there


def test_aggregate_and_format():
    agg = M.aggregate([1, 2, 3, 4])
    assert agg == pytest.approx({"mean": 2.5, "std": np.sqrt(1.25), "median": 2.5, "iqr": 1.5})
    cell = M.format_cell({"mean": 0.9, "std": 0.05, "median": 0.9234, "iqr": 0.1})
    assert cell == "0.900 (0.050) ; 0.923 (0.100)"
    assert M.format_cell(M.aggregate([])) == "empty"


def test_groups_and_leaderboard():
    assert M.pair_group("GIV", "AT2", "GIV", "S60") == "inter-scanner"
    assert M.pair_group("GIV", "AT2", "GM", "AT2") == "inter-staining"
    assert M.pair_group("GIV", "AT2", "GM", "S60") == "inter-scanner, inter-staining"
    with pytest.raises(ValueError):
        M.pair_group("GIV", "AT2", "GIV", "AT2")
    aggs = {"all": {"cosine_similarity": {"median": 0.8236}},
            "inter-scanner": {"top_10_accuracy": {"median": 0.5}},
            "inter-staining": {"top_10_accuracy": {"median": 0.4446}},
            "inter-scanner, inter-staining": {"top_10_accuracy": {"median": 0.3}}}
    assert M.leaderboard_metric(aggs, rounded=True) == pytest.approx((0.824 + 0.5 + 0.445 + 0.3) / 4, abs=1e-12)
    assert M.leaderboard_metric(aggs, rounded=False) == pytest.approx((0.8236 + 0.5 + 0.4446 + 0.3) / 4, abs=1e-12)


def test_group_aggregates_empty_group_is_nan():
    groups = ["inter-scanner", "inter-scanner", "inter-staining"]
    aggs = M.group_aggregates(groups, {"cosine_similarity": np.array([0.2, 0.4, 0.9])})
    assert aggs["inter-scanner"]["cosine_similarity"]["mean"] == pytest.approx(0.3)
    assert aggs["all"]["cosine_similarity"]["median"] == pytest.approx(0.4)
    assert np.isnan(aggs["inter-scanner, inter-staining"]["cosine_similarity"]["median"])


def test_bootstrap():
    w = M.bootstrap_weights(50, 200, seed=1)
    assert w.shape == (200, 50) and np.all(w.sum(1) == 50)
    vals = np.linspace(0, 1, 50)
    means = M.bootstrap_means(w, vals)
    assert abs(means.mean() - vals.mean()) < 0.02 and means.std() > 0.01
    groups = ["inter-scanner", "inter-staining", "inter-scanner, inter-staining"] * 4
    cos = np.random.default_rng(0).uniform(0.5, 0.6, size=(12, 200))
    ci = M.bootstrap_leaderboard(groups, cos, cos)
    assert 0.5 <= ci["low"] < ci["high"] <= 0.6


def test_leakage_probe():
    from pathrobust.probes.leakage import leakage_probe

    assert M.normalized_balanced_accuracy(0.5, 4) == pytest.approx(1 / 3)
    rng = np.random.default_rng(0)
    positions = np.repeat(np.arange(40), 3)
    labels = np.tile(["a", "b", "c"], 40)
    offsets = {"a": np.eye(5)[0] * 3, "b": np.eye(5)[1] * 3, "c": np.eye(5)[2] * 3}
    leaky = rng.normal(size=(120, 5)) + np.array([offsets[l] for l in labels])
    assert leakage_probe(leaky, labels, positions)["normalized"] > 0.95
    clean = rng.normal(size=(120, 5))
    assert abs(leakage_probe(clean, labels, positions)["normalized"]) < 0.35


def test_batch_equals_single_pairs():
    rng = np.random.default_rng(4)
    base = rng.normal(size=(70, 12))
    slides = [M.normalize_rows((base + rng.normal(size=base.shape)).astype(np.float32)) for _ in range(4)]
    slides.append(M.normalize_rows(np.ones((70, 12), np.float32)))  # ties -> recount path inside a batch
    tops = [M.slide_topk(x, 10) for x in slides]
    batch = M.pair_metrics_batch(slides[0], torch.stack(slides[1:]), tops[0], torch.stack(tops[1:]), chunk=16)
    for j, res in enumerate(batch, start=1):
        single = M.pair_metrics(slides[0], slides[j], tops[0], tops[j])
        assert res.topk_accuracy == pytest.approx(single.topk_accuracy, abs=1e-12)
        assert res.cosine_similarity == pytest.approx(single.cosine_similarity, abs=1e-9)
        dense = dense_topk_f64(slides[0].numpy(), slides[j].numpy(), (1, 3, 5, 10))
        for k in (1, 3, 5, 10):
            assert res.topk_accuracy[k] == pytest.approx(dense[k], abs=1e-6)
