"""The HEST linear probe equals a direct scikit-learn version of the reference."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from pathrobust.probes import ridge as R


def _data(n_train, n_test, d, g, seed=0):
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n_train + n_test, 16))
    X = latent @ rng.normal(size=(16, d)) + 0.5 * rng.normal(size=(n_train + n_test, d)) + 2.0
    X *= rng.uniform(0.2, 4.0, size=d)
    counts = rng.poisson(np.exp(0.4 * latent[:, :4] @ rng.normal(size=(4, g))))
    Y = np.log1p(counts).astype(np.float64)
    return X[:n_train], Y[:n_train], X[n_train:], Y[n_train:]


def sklearn_reference(X_train, Y_train, X_test, Y_test, pca=True):
    """HEST benchmark.py + trainer.py, written directly with scikit-learn and scipy."""
    if pca:
        k = min(256, *X_train.shape)  # sklearn's PCA(256) would raise below 256 (documented cap)
        pipe = Pipeline([("scaler", StandardScaler()), ("PCA", PCA(n_components=k, random_state=1))])
        X_train, X_test = pipe.fit_transform(X_train), pipe.transform(X_test)
    alpha = 100 / (X_train.shape[1] * Y_train.shape[1])
    reg = Ridge(solver="lsqr", alpha=alpha, random_state=1, fit_intercept=False, max_iter=1000)
    pred = reg.fit(X_train, Y_train).predict(X_test)
    return np.array([pearsonr(Y_test[:, g], pred[:, g])[0] for g in range(Y_test.shape[1])]), alpha


@pytest.mark.parametrize("n_train,d,pca", [
    (1100, 520, True),    # randomized PCA solver, 256 components, batched LSQR
    (600, 520, True),     # 256 components but < 4 spots per component: per-gene LSQR
    (120, 300, True),     # fewer train spots than 256: 120 components
    (400, 64, True),      # fewer features than 256: 64 components
    (300, 40, False),     # --no-pca: raw embeddings, no scaler
    (2000, 96, False),    # --no-pca, ill-conditioned: LSQR needs many iterations
])
def test_fold_equals_sklearn_reference(n_train, d, pca):
    X_tr, Y_tr, X_te, Y_te = _data(n_train, 300, d, 50, seed=n_train)
    want, alpha = sklearn_reference(X_tr, Y_tr, X_te, Y_te, pca=pca)
    got = R.fit_predict_fold(X_tr, Y_tr, X_te, Y_te, pca=pca)
    assert got.alpha == pytest.approx(alpha, rel=1e-15)
    assert got.n_components == (min(256, n_train, d) if pca else d)
    np.testing.assert_allclose(got.pearson, want, atol=1e-6, rtol=0)
    assert abs(got.mean - want.mean()) < 1e-6
    assert got.mean > 0.2  # the data carry signal: a broken fit cannot pass by being flat


def test_per_gene_ridge_is_bitwise_sklearn_and_batched_agrees():
    rng = np.random.default_rng(1)
    Z = rng.normal(size=(300, 20))
    Y = Z @ rng.normal(size=(20, 9)) + rng.normal(size=(300, 9))
    Y[:, 3] = 0.0  # an all-zero target: coefficients 0 at once, as scipy returns
    per_gene, it1 = R.ridge_predict(Z, Y, Z[:50], 0.5)
    sk = Ridge(solver="lsqr", alpha=0.5, fit_intercept=False, max_iter=1000).fit(Z, Y)
    assert np.array_equal(per_gene, sk.predict(Z[:50])) and it1 == sk.n_iter_.max() > 1
    batched, it2 = R.ridge_predict(Z, Y, Z[:50], 0.5, batched=True)
    np.testing.assert_allclose(batched, per_gene, atol=1e-9)
    coef, iters = R.ridge_lsqr(Z, Y, 0.5)
    assert list(iters) == list(sk.n_iter_) and not coef[3].any()


def test_batched_path_is_taken_on_large_pca_folds_only(monkeypatch):
    calls = []
    real = R.ridge_predict
    monkeypatch.setattr(R, "ridge_predict", lambda *a, **k: calls.append(k["batched"]) or real(*a, **k))
    for n, d, pca in ((600, 300, True), (1100, 300, True), (1100, 60, True), (1100, 300, False)):
        X_tr, Y_tr, X_te, Y_te = _data(n, 50, d, 50, seed=7)
        R.fit_predict_fold(X_tr, Y_tr, X_te, Y_te, pca=pca)
    # 600 < 4 * 256 spots; 1100 x 256 x 50 >= 4e6; 1100 x 60 x 50 < 4e6; no PCA: always per gene
    assert calls == [False, True, False, False]


def test_pearson_per_gene_matches_scipy_and_flags_constant_genes():
    rng = np.random.default_rng(2)
    y, p = rng.normal(size=(40, 5)), rng.normal(size=(40, 5))
    p[:, 1] = y[:, 1] * 3 + 1
    y[:, 4] = 2.0
    r = R.pearson_per_gene(y, p)
    for g in range(4):
        assert r[g] == pytest.approx(pearsonr(y[:, g], p[:, g])[0], abs=1e-12)
    assert r[1] == pytest.approx(1.0)
    assert np.isnan(r[4])


def test_fold_summary_is_mean_and_population_std():
    mean, std = R.fold_summary([0.2, 0.4])
    assert mean == pytest.approx(0.3) and std == pytest.approx(0.1)


def test_alpha_cv_prefers_strong_ridge_on_noise_and_weak_on_clean_signal():
    rng = np.random.default_rng(3)
    groups = np.repeat(["a", "b", "c", "d"], 50)
    alphas = [1e-3, 1e-1, 1e1, 1e3, 1e5]
    # few spots, many pure-noise features, weak signal in one feature: shrinkage helps
    X = rng.normal(size=(200, 150))
    Y = 0.3 * X[:, :1] + rng.normal(size=(200, 4))
    best_noisy, scores = R.choose_alpha_cv(X, Y, groups, alphas, pca=False)
    assert scores.shape == (5,)
    assert best_noisy >= 1e1
    # clean linear signal in all features, many spots: the least shrinkage wins
    X = rng.normal(size=(200, 5))
    Y = X @ rng.normal(size=(5, 4))
    best_clean, _ = R.choose_alpha_cv(X, Y + 0.01 * rng.normal(size=Y.shape), groups, alphas, pca=False)
    assert best_clean <= 1e-1
    with pytest.raises(ValueError, match="at least 2"):
        R.choose_alpha_cv(X, Y, np.repeat(["a"], 200), alphas)


def test_constant_gene_is_left_out_of_the_fold_mean_visibly():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(60, 8))
    Y = X[:, :3] @ rng.normal(size=(3, 4)) + rng.normal(0, 0.1, size=(60, 4))
    Y[40:, 2] = 1.0  # gene 2 is constant over the test spots
    score = R.fit_predict_fold(X[:40], Y[:40], X[40:], Y[40:], n_components=4)
    assert score.undefined_genes == 1 and np.isnan(score.pearson[2])
    assert score.mean == pytest.approx(np.mean(score.pearson[[0, 1, 3]]))
