"""Exact chunked k-NN (pathrobust.metrics.knn) against brute-force float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pathrobust.errors import UserError
from pathrobust.metrics.knn import TypedNeighbours, dot_error_bound, knn


def brute_force(x: np.ndarray, k: int, groups: np.ndarray | None = None, allowed=None) -> np.ndarray:
    """Full float64 similarity matrix, own group (and self) excluded, sorted by similarity
    then index — the definition the search must reproduce."""
    xn = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    s = xn @ xn.T
    n = len(x)
    excluded = np.eye(n, dtype=bool) if groups is None else groups[:, None] == groups[None, :]
    if allowed is not None:
        excluded |= ~allowed
    s[excluded] = -np.inf
    return np.array([np.lexsort((np.arange(n), -s[i]))[:k] for i in range(n)])


def near_tie_data(n: int = 600, d: int = 48, seed: int = 0):
    """Rows exactly representable in float32, with clusters of near-ties for every other query:
    rows equal to a base row plus 1e-8 noise (similarities differing by ~1e-9: decided in
    float64, not in float32) and exact duplicates. A cluster shares one group, so its members
    never rank each other (their mutual similarities differ only at float64 rounding)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    groups = rng.integers(0, 40, n)
    for c, base in enumerate(range(0, min(60, n - 6), 6)):
        x[base + 1] = x[base]  # exact duplicate
        x[base + 2:base + 6] = x[base] + 1e-8 * rng.normal(size=(4, d))
        groups[base:base + 6] = 40 + c
    return x.astype(np.float32).astype(np.float64), groups


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_exact_order_matches_float64_brute_force(dtype):
    x, g = near_tie_data()
    ref = brute_force(x, 15, g)
    got = knn(x.astype(dtype), 15, groups=g, order="exact", chunk=97)
    np.testing.assert_array_equal(got.indices, ref)


def test_float32_without_resolution_would_differ():
    """The fixture's near-ties really are undecidable in float32 (so the test above can fail)."""
    x, g = near_tie_data()
    ref = brute_force(x, 15, g)
    xn = torch.nn.functional.normalize(torch.from_numpy(x).float(), dim=1)
    s = (xn @ xn.T).double().numpy()
    s[g[:, None] == g[None, :]] = -np.inf
    naive = np.argsort(-s, axis=1, kind="stable")[:, :15]
    assert (naive != ref).any(axis=1).sum() >= 5


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_boundary_order_gives_float64_sets(dtype):
    x, g = near_tie_data(seed=1)
    for k in (1, 4, 15):
        ref = brute_force(x, k, g)
        got = knn(x.astype(dtype), k, groups=g, chunk=128, boundaries=(2,))
        np.testing.assert_array_equal(np.sort(got.indices, axis=1), np.sort(ref, axis=1))
        if k > 2:  # the extra boundary is decided too
            np.testing.assert_array_equal(np.sort(got.indices[:, :2], axis=1), np.sort(brute_force(x, 2, g), axis=1))


def test_boundary_cluster_longer_than_the_fetch_is_refetched():
    """A block of 30 identical rows straddles rank k: with pad=1 the search must widen."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 16))
    x[10:40] = x[5] + 0.01  # 30 identical rows, all equally close to row 5
    g = np.arange(300) // 3
    ref = brute_force(x, 12, g)
    got = knn(x.astype(np.float32), 12, groups=g, pad=1)
    np.testing.assert_array_equal(got.indices, ref)


def test_similarities_and_exclusion():
    x, g = near_tie_data(n=300, seed=3)
    got = knn(x, 10, groups=g, exact_values=True)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    want = np.einsum("id,ikd->ik", xn, xn[got.indices])
    np.testing.assert_allclose(got.similarities, want, atol=1e-14)
    assert not (g[got.indices] == g[:, None]).any()
    assert np.all(np.diff(got.similarities, axis=1) <= 0)


def test_queries_subset_and_self_only():
    x = np.random.default_rng(4).normal(size=(200, 24))
    full = knn(x, 5, order="exact")
    np.testing.assert_array_equal(full.indices, brute_force(x, 5))
    part = knn(x, 5, queries=np.array([3, 150, 7]), order="exact")
    np.testing.assert_array_equal(part.indices, full.indices[[3, 150, 7]])


def test_typed_neighbours_match_brute_force():
    rng = np.random.default_rng(5)
    n = 240
    x = rng.normal(size=(n, 12))
    lab = rng.integers(0, 2, n)
    cen = rng.integers(0, 3, n)
    grp = rng.integers(0, 30, n)
    for kind, allowed in (("SO", (lab[:, None] == lab) & (cen[:, None] != cen)),
                          ("OS", (lab[:, None] != lab) & (cen[:, None] == cen))):
        ex = TypedNeighbours(lab, cen, grp, kind)
        want_counts = (allowed & (grp[:, None] != grp)).sum(1)
        np.testing.assert_array_equal(ex.eligible_counts(np.arange(n)), want_counts)
        got = knn(x, 3, exclusion=ex, order="exact")
        np.testing.assert_array_equal(got.indices, brute_force(x, 3, grp, allowed))


def test_error_bound_is_rigorous_in_practice():
    """Observed |float32 - float64| on unit vectors stays far inside the bound."""
    rng = np.random.default_rng(6)
    x = rng.normal(size=(400, 1536))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    s64 = x @ x.T
    x32 = torch.from_numpy(x).float()
    s32 = (x32 @ x32.T).double().numpy()
    assert np.abs(s32 - s64).max() < dot_error_bound(1536, torch.float32) / 4


def test_bad_input_is_one_line_user_error():
    x, g = near_tie_data(n=50, seed=7)
    bad = x.copy()
    bad[7, 3] = np.nan
    with pytest.raises(UserError, match="row 7"):
        knn(bad, 3, groups=g, source="feats.h5")
    zero = x.copy()
    zero[9] = 0
    with pytest.raises(UserError, match="all-zero"):
        knn(zero, 3, groups=g)
    few = np.repeat(np.arange(2), 25)  # two slides of 25 rows: 25 eligible neighbours
    with pytest.raises(UserError, match="fewer than k = 26"):
        knn(x, 26, groups=few)
    for err in (UserError,):
        with pytest.raises(err) as info:
            knn(bad, 3, groups=g, source="feats.h5")
        assert "\n" not in str(info.value) and "feats.h5" in str(info.value)


def test_typed_counts_with_groups_spanning_cells():
    """Cases holding several classes (Tolkach ESCA): own-group rows of the wanted type are not eligible."""
    lab = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    cen = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    grp = np.array([0, 0, 1, 1, 2, 2, 2, 3])
    so = TypedNeighbours(lab, cen, grp, "SO").eligible_counts(np.arange(8))
    os_ = TypedNeighbours(lab, cen, grp, "OS").eligible_counts(np.arange(8))
    np.testing.assert_array_equal(so, [2, 2, 2, 2, 2, 2, 2, 2])
    np.testing.assert_array_equal(os_, [1, 1, 1, 1, 1, 0, 1, 2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cuda_search_equals_cpu_and_brute_force(dtype):
    x, g = near_tie_data(seed=8)
    ref = brute_force(x, 15, g)
    got = knn(x.astype(dtype), 15, groups=g, order="exact", device="cuda", chunk=100)
    np.testing.assert_array_equal(got.indices, ref)
    cpu = knn(x.astype(dtype), 15, groups=g, device="cpu")
    np.testing.assert_array_equal(np.sort(got.indices, axis=1), np.sort(cpu.indices, axis=1))
