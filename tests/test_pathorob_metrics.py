"""PathoROB metrics (pathrobust.metrics.pathorob) against croma 1.0.1, a direct NumPy
implementation of PathoROB's definitions and scikit-learn."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from pathrobust.errors import UserError
from pathrobust.metrics import pathorob as P


def fixture(seed: int = 0, d: int = 24, centres: int = 3, slides: int = 6, per_slide: int = 8):
    """2 classes x ``centres`` centres, slides of ``per_slide`` rows; embeddings = class +
    centre + slide effects + noise (float64)."""
    rng = np.random.default_rng(seed)
    rows = [(f"{b}-c{c}-s{s}", b, f"C{c}") for c in range(centres) for b in ("normal", "tumor")
            for s in range(slides) for _ in range(per_slide)]
    t = pd.DataFrame(rows, columns=["slide_id", "biological_class", "medical_center"])
    cls, cen = rng.normal(size=(2, d)), rng.normal(size=(centres, d))
    slide_fx = {s: 0.5 * rng.normal(size=d) for s in t.slide_id.unique()}
    x = np.stack([0.8 * cls[int(b == "tumor")] + cen[int(c[1:])] + slide_fx[s] + rng.normal(size=d)
                  for s, b, c in t.itertuples(index=False)])
    t.insert(0, "row", np.arange(len(t)))
    return x, t


def paired(t: pd.DataFrame) -> pd.DataFrame:
    """Every pair of centres with both classes: a 2 x 2 subset (rows repeat across subsets)."""
    centres = sorted(t.medical_center.unique())
    parts = [t[t.medical_center.isin([a, b])].assign(subset=f"{a}_{b}") for i, a in enumerate(centres)
             for b in centres[i + 1:]]
    return pd.concat(parts, ignore_index=True)


def croma_manifest(t: pd.DataFrame) -> pd.DataFrame:
    """croma's manifest: it never reads slide_id, so the slide goes into group_id."""
    m = pd.DataFrame({"sample_id": [f"p{r}" for r in t.row], "image_path": [f"p{r}.png" for r in t.row],
                      "label": t.biological_class.to_numpy(), "group_id": t.slide_id.to_numpy(),
                      "medical_center": t.medical_center.to_numpy()})
    if "subset" in t:
        m["subset"] = t.subset.to_numpy()
    return m


def pathorob_reference(x: np.ndarray, t: pd.DataFrame, k: int) -> tuple[int, int]:
    """PathoROB's code path in NumPy: Normalizer, Euclidean k-NN fetching k + largest slide,
    own-slide neighbours dropped, rows cut to the shortest, first k kept; pooled SO and OS."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    dist = np.sqrt(np.maximum(((xn[:, None, :] - xn[None, :, :]) ** 2).sum(-1), 0))
    slide = t.slide_id.to_numpy()
    fetch = min(k + int(t.slide_id.value_counts().max()), len(t))
    order = np.argsort(dist, axis=1, kind="stable")[:, :fetch]
    kept = [row[slide[row] != slide[i]] for i, row in enumerate(order)]
    nb = np.array([row[:min(map(len, kept))] for row in kept])[:, :k]
    lab, cen = t.biological_class.to_numpy(), t.medical_center.to_numpy()
    same_bio, same_cen = lab[nb] == lab[:, None], cen[nb] == cen[:, None]
    return int((same_bio & ~same_cen).sum()), int((~same_bio & same_cen).sum())


@pytest.mark.parametrize("k", [1, 11, 30])
def test_ri_equals_croma_and_pathorob_plain(k):
    from croma import RI

    x, t = fixture()
    r = P.robustness(x, t, "plain", k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = RI.compute_curve(x, croma_manifest(t), confounder_column="medical_center", k_values=[k])[k]
    assert abs(r.ri - want) < 1e-9
    so, os_ = pathorob_reference(x, t, k)
    assert (r.counts["SO"], r.counts["OS"]) == (so, os_)
    assert r.ri == pytest.approx(so / (so + os_), abs=1e-12)
    assert r.curve["RI"].iloc[k - 1] == pytest.approx(r.ri, abs=1e-15)


@pytest.mark.parametrize("k", [1, 11, 30])
def test_ri_equals_croma_and_pathorob_paired(k):
    from croma import RI

    x, t = fixture(seed=1)
    occ = paired(t)
    r = P.robustness(x, occ, "paired", k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = RI.compute_curve(x[occ.row.to_numpy()], croma_manifest(occ), confounder_column="medical_center",
                                k_values=[k], evaluation_design="paired_2x2")[k]
    assert abs(r.ri - want) < 1e-9
    counts = [pathorob_reference(x[part.row.to_numpy()], part.reset_index(drop=True), k)
              for _, part in occ.groupby("subset")]
    so, os_ = map(sum, zip(*counts))
    assert (r.counts["SO"], r.counts["OS"]) == (so, os_)
    assert len(r.per_query) == len(occ)  # a patch counts once per subset it belongs to
    assert set(r.per_subset.subset) == set(occ.subset)


@pytest.mark.parametrize("design", ["plain", "paired"])
def test_mari_and_croma_equal_croma(design):
    from croma import CRoMa, MaRI

    x, t = fixture(seed=2)
    table = t if design == "plain" else paired(t)
    xs, man = x[table.row.to_numpy()], croma_manifest(table)
    cdesign = "all" if design == "plain" else "paired_2x2"
    r = P.robustness(x, table, design, 11, variants=("mari", "croma"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mari = MaRI.compute_curve(xs, man, confounder_column="medical_center", k_values=[11],
                                  evaluation_design=cdesign)[11]
        cr = CRoMa.compute(xs, man, confounder_column="medical_center", evaluation_design=cdesign)
    assert abs(r.variants["MaRI"]["value"] - mari) < 1e-9
    assert abs(r.variants["CRoMa"]["value"] - cr.value) < 1e-9
    assert abs(r.variants["CRoMa"]["ltm"] - cr.ltm_alpha) < 1e-9
    assert abs(r.variants["CRoMa"]["f0"] - cr.f0) < 1e-12
    assert r.variants["MaRI"]["definition"] == "croma 1.0.1"


def near_tie_embeddings(seed: int = 3, clusters: int = 6, members: int = 40, dims: int = 64):
    """Clusters along orthogonal axes; members = axis + 1e-4 · u with u in a subspace
    orthogonal to every axis, so all similarities a query sees inside its cluster differ by
    ~1e-9: decided in float64, never in float32. Members mix classes, centres and slides."""
    rng = np.random.default_rng(seed)
    x = np.zeros((clusters * members, dims))
    rows = []
    for c in range(clusters):
        for m in range(members):
            i = c * members + m
            x[i, c] = 1.0
            x[i, clusters:] = 1e-4 * rng.normal(size=dims - clusters) / np.sqrt(dims - clusters)
            rows.append((f"c{c}-s{m // 2}", ("normal", "tumor")[rng.integers(2)], f"C{rng.integers(2)}"))
    t = pd.DataFrame(rows, columns=["slide_id", "biological_class", "medical_center"])
    t.insert(0, "row", np.arange(len(t)))
    return x.astype(np.float32).astype(np.float64), t


def test_float32_input_gives_the_float64_answer():
    x, t = near_tie_embeddings()
    r64 = P.robustness(x, t, "plain", 10, curve_k_max=30, exact_curve=True)
    r32 = P.robustness(x.astype(np.float32), t, "plain", 10, curve_k_max=30, exact_curve=True)
    assert r32.counts == r64.counts
    pd.testing.assert_frame_equal(r32.curve, r64.curve)
    so, os_ = pathorob_reference(x, t, 10)
    assert (r64.counts["SO"], r64.counts["OS"]) == (so, os_)
    # plain float32 similarities would have decided differently
    xn = torch.nn.functional.normalize(torch.from_numpy(x).float(), dim=1)
    s = (xn @ xn.T).double().numpy()
    slide = t.slide_id.to_numpy()
    s[slide[:, None] == slide[None, :]] = -np.inf
    nb = np.argsort(-s, axis=1, kind="stable")[:, :10]
    lab, cen = t.biological_class.to_numpy(), t.medical_center.to_numpy()
    naive_so = int(((lab[nb] == lab[:, None]) & (cen[nb] != cen[:, None])).sum())
    assert naive_so != so


def test_k_selection_matches_pathorob():
    from scipy.stats import mode
    from sklearn.metrics import balanced_accuracy_score

    x, t = fixture(seed=4, slides=10)
    r = P.robustness(x, t, "plain", 11, select_k_max=60)
    assert P.k_grid(60) == [1, 3, 5, 7, 9, 11, 21, 31, 41, 51]
    # direct: k-NN vote over the exact neighbour lists, LabelEncoder codes, scipy mode
    hood = P.build_neighbourhoods(x, t, "plain", 51, order="exact")[0]
    codes = np.unique(t.biological_class, return_inverse=True)[1]
    for k, bacc in zip(r.k_selection.k, r.k_selection.balanced_accuracy):
        pred = mode(codes[hood.neighbours[:, :k]], axis=1).mode.ravel()
        assert bacc == pytest.approx(balanced_accuracy_score(codes, pred), abs=1e-12)
    best = r.k_selection.k[r.k_selection.balanced_accuracy.idxmax()]
    assert r.k == best and r.k_source == "selected"
    assert r.ri == pytest.approx(P.robustness(x, t, "plain", int(best)).ri, abs=1e-15)


def test_curve_and_per_query_tables_are_consistent():
    x, t = fixture(seed=5)
    r = P.robustness(x, t, "plain", 11, curve_k_max=25)
    assert list(r.curve.k) == list(range(1, 26))
    assert (r.curve[list(P.TYPES)].sum(axis=1) == r.curve.k * len(t)).all()
    assert r.per_query[list(P.TYPES)].to_numpy().sum(axis=1).tolist() == [11] * len(t)
    assert r.counts["SO"] == r.per_query.SO.sum() == r.curve.SO.iloc[10]


def test_ri_undefined_designs_are_user_errors():
    x, t = fixture(seed=6)
    lone = t.copy()
    lone.loc[lone.biological_class == "tumor", "medical_center"] = "C0"
    with pytest.raises(UserError, match="class 'tumor' occurs in centre 'C0' only"):
        P.robustness(x, lone, "plain", 5, source="manifest.csv")
    occ = paired(t)
    broken = occ[~((occ.subset == "C0_C1") & (occ.biological_class == "tumor") & (occ.medical_center == "C1"))]
    with pytest.raises(UserError, match="subset 'C0_C1'.*all 4 cells"):
        P.robustness(x, broken, "paired", 5)
    with pytest.raises(UserError, match="only 280 neighbours on other slides, fewer than k = 281"):
        P.robustness(x, t, "plain", 281)
    with pytest.raises(UserError, match="unknown bogus"):
        P.robustness(x, t, "plain", 5, variants=("bogus",))


def direct_clustering(x, t, trials):
    """PathoROB's clustering_score.compute, written out with scikit-learn."""
    from itertools import combinations, product

    from sklearn.cluster import KMeans
    from sklearn import metrics

    scores = {}
    bio, mc = t.biological_class.unique(), t.medical_center.unique()
    for (b1, b2), (m1, m2) in product(combinations(bio, 2), combinations(mc, 2)):
        parts = [t[(t.biological_class == b) & (t.medical_center == m)] for b, m in
                 ((b1, m1), (b1, m2), (b2, m1), (b2, m2))]
        sub = pd.concat(parts)
        z = x[sub.row.to_numpy()]
        z = z / np.sqrt((z ** 2).sum(axis=1))[:, None]
        ks = np.linspace(2, 30, 29, dtype=int)
        sil = [metrics.silhouette_score(z, KMeans(n_clusters=k, random_state=1337, init="random", n_init=20)
                                        .fit(z).labels_, metric="cosine") for k in ks]
        k_sel = ks[np.argmax(sil)]
        cs = []
        for tr in range(trials):
            lab = KMeans(n_clusters=k_sel, random_state=1337 + tr, n_init=5, init="random").fit(z).labels_
            cs.append(metrics.adjusted_rand_score(sub.biological_class, lab)
                      - metrics.adjusted_rand_score(sub.medical_center, lab))
        scores[f"{b1}-{b2}-{m1}-{m2}"] = cs
    return scores


def test_clustering_score_matches_direct_implementation_within_trial_spread():
    from threadpoolctl import threadpool_limits

    x, t = fixture(seed=7, centres=2, slides=5, per_slide=8)
    got = P.clustering_score(x.astype(np.float32), t, trials=8)
    with threadpool_limits(1):  # the thread count is not part of the protocol; one thread is fast here
        want = direct_clustering(x.astype(np.float32), t, trials=8)
    assert list(got.combinations.combination) == list(want)
    means = np.array([np.mean(v) for v in want.values()])
    spread = np.mean([np.std(v, ddof=1) for v in want.values()])
    assert abs(got.score - means.mean()) <= max(spread, 1e-12)
    assert got.score == pytest.approx(means.mean(), abs=1e-9)  # same seeds, same order: same clusters
    assert got.spread == pytest.approx(spread, abs=1e-9)
    assert set(got.silhouette.K) == set(range(2, 31))


def test_clustering_score_needs_a_complete_combination():
    x, t = fixture(seed=8, centres=2)
    lone = t[~((t.biological_class == "tumor") & (t.medical_center == "C1"))]
    with pytest.raises(UserError, match="no 2 classes x 2 centres"):
        P.clustering_score(x, lone, trials=1)


def test_apd_reductions_match_pathorob_and_pandas():
    from scipy import stats

    acc = np.array([[0.8, 0.9, 0.85], [0.7, 0.9, 0.8], [0.6, 0.45, 0.85]])
    per_it = ((acc[1:] / acc[0]).mean(axis=0)) - 1
    np.testing.assert_allclose(P.apd_per_iteration(acc), per_it, atol=1e-15)
    assert P.apd(acc) == pytest.approx(per_it.mean(), abs=1e-15)
    scores = {"a": [-0.1, -0.2, -0.15], "b": [0.01, -0.03, 0.0, 0.02]}
    df = pd.concat([pd.DataFrame({"dataset": n, "scores": v}) for n, v in scores.items()], ignore_index=True)
    overall = df.scores.mean()
    df["corrected"] = df.scores + overall - df.groupby("dataset").scores.transform("mean")
    mean, half = P.corrected_mean_ci(scores)
    assert mean == pytest.approx(df.corrected.mean(), abs=1e-15)
    assert half == pytest.approx(stats.t.ppf(0.975, df=len(df)) * df.corrected.sem(), abs=1e-15)
