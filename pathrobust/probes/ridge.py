"""The HEST-Benchmark linear probe: scaler + PCA + ridge per fold, scored by per-gene Pearson.

The reference is mahmoodlab/HEST ``src/hest/bench/benchmark.py`` (``predict_single_split``)
and ``src/hest/bench/trainer.py`` (``train_test_reg``). Per fold it does, and so do we:

1. ``Pipeline([StandardScaler(), PCA(n_components=256, random_state=seed=1)])`` fitted on the
   train embeddings, applied to train and test (``args.dimreduce == 'PCA'``; without PCA the
   embeddings go to the ridge as they are, with no scaler either);
2. ``Ridge(solver='lsqr', alpha=100 / (X_train.shape[1] * y_train.shape[1]),
   fit_intercept=False, max_iter=1000)`` where ``X_train.shape[1]`` is the dimension *after*
   PCA (256 -> alpha = 100 / (256 * 50));
3. ``scipy.stats.pearsonr`` per gene between the pooled test targets and predictions; the fold
   score is the mean over genes (NaN for a constant gene propagates, as in the reference);
4. ``merge_fold_results``: task score = ``np.mean`` over folds, std = ``np.std`` (ddof 0).

Differences, on purpose and documented:

* Everything runs in float64. HEST feeds float32 embeddings through the pipeline and wraps the
  PCA output in ``torch.Tensor`` (float32) before the ridge. Measured effect of running
  HEST's float32 path instead: a 3000 x 1024 fold moves per-gene Pearson by <= 3e-6 (mean
  1e-7); a 400 x 300 fold, where LSQR amplifies rounding, by <= 1.2e-3 (mean 2e-5) — far
  below fold-to-fold spread either way.
* Fewer than 256 features or train spots: sklearn's ``PCA(256)`` raises; we keep
  ``min(256, n_train_spots, n_features)`` components and alpha uses that dimension.
* The ridge is sklearn's LSQR: on small folds and without PCA the very per-gene calls
  sklearn makes (bitwise its result), on large PCA-reduced folds the same iteration for all
  genes at once (agrees to ~1e-14, 3-5x faster); see :func:`ridge_predict`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pathrobust.metrics.regression import fold_summary, pearson_per_gene  # noqa: F401 (part of this API)

def ridge_exact_path(X: np.ndarray, Y: np.ndarray, alphas: Sequence[float]) -> np.ndarray:
    """Exact no-intercept ridge solutions for several alphas from one SVD.

    ``X`` ``(N, D)``, ``Y`` ``(N, G)`` -> coefficients ``(len(alphas), D, G)``. Used to choose
    alpha by cross-validation, where the same factorisation serves every candidate."""
    Uf, s, Vt = np.linalg.svd(np.asarray(X, dtype=np.float64), full_matrices=False)
    UtY = Uf.T @ np.asarray(Y, dtype=np.float64)
    return np.stack([Vt.T @ ((s / (s * s + a))[:, None] * UtY) for a in alphas])


def reference_alpha(n_features: int, n_genes: int, numerator: float = 100.0) -> float:
    """HEST ``trainer.train_test_reg``: ``alpha = 100 / (X_train.shape[1] * y_train.shape[1])``."""
    return numerator / (n_features * n_genes)


def project(X_train: np.ndarray, X_test: np.ndarray, *, pca: bool = True, n_components: int = 256,
            random_state: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """HEST's ``Pipeline([StandardScaler(), PCA(n_components, random_state)])``:
    ``fit_transform`` on ``X_train`` ``(N, D)``, ``transform`` on ``X_test`` ``(M, D)`` ->
    ``(N, k)``, ``(M, k)`` with ``k = min(n_components, N, D)`` (sklearn would raise above that).

    Both steps are sklearn's own objects, so the constant-feature handling and PCA's solver
    choice (``'auto'``: covariance eigh, full or randomized SVD by shape) are the reference's.
    Note ``fit_transform`` returns ``U * S`` for the SVD solvers, which for the randomized solver
    is not exactly ``X_train @ components.T``; the reference trains on ``fit_transform``'s
    output, and so do we. ``pca=False`` returns the embeddings as they are (no scaler either,
    as the reference does when ``dimreduce`` is None)."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    X_train = np.asarray(X_train, dtype=np.float64)
    X_test = np.asarray(X_test, dtype=np.float64)
    if not pca:
        return X_train, X_test
    scaler = StandardScaler()
    k = int(min(n_components, X_train.shape[0], X_train.shape[1]))
    model = PCA(n_components=k, random_state=random_state)
    Z_train = model.fit_transform(scaler.fit_transform(X_train))
    Z_test = model.transform(scaler.transform(X_test))
    return Z_train, Z_test


_EPS = np.finfo(np.float64).eps


def _sym_ortho(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised stable Givens rotation (scipy ``lsqr._sym_ortho``): ``c, s, r`` per column."""
    c, s, r = np.empty_like(a), np.empty_like(a), np.empty_like(a)
    b0 = b == 0
    a0 = (a == 0) & ~b0
    big_b = (np.abs(b) > np.abs(a)) & ~b0 & ~a0
    big_a = ~(b0 | a0 | big_b)
    c[b0], s[b0], r[b0] = np.sign(a[b0]), 0.0, np.abs(a[b0])
    c[a0], s[a0], r[a0] = 0.0, np.sign(b[a0]), np.abs(b[a0])
    tau = a[big_b] / b[big_b]
    s_b = np.sign(b[big_b]) / np.sqrt(1 + tau * tau)
    c[big_b], s[big_b], r[big_b] = s_b * tau, s_b, b[big_b] / s_b
    tau = b[big_a] / a[big_a]
    c_a = np.sign(a[big_a]) / np.sqrt(1 + tau * tau)
    c[big_a], s[big_a], r[big_a] = c_a, c_a * tau, a[big_a] / c_a
    return c, s, r


def ridge_lsqr(X: np.ndarray, Y: np.ndarray, alpha: float, *, tol: float = 1e-4, max_iter: int | None = 1000,
               conlim: float = 1e8) -> tuple[np.ndarray, np.ndarray]:
    """No-intercept ridge by damped LSQR for every target at once.

    ``X`` ``(N, D)``, ``Y`` ``(N, G)`` -> coefficients ``(G, D)`` and iterations ``(G,)``. The
    iteration and its stopping tests are scipy's ``lsqr(X, y, damp=sqrt(alpha), atol=tol,
    btol=tol, iter_lim=max_iter, conlim=conlim)`` (Paige & Saunders), vectorised over targets
    with matrix-matrix products; a target leaves the batch at the iteration scipy would stop."""
    A = np.asarray(X, dtype=np.float64)
    B = np.asarray(Y, dtype=np.float64)
    if B.ndim == 1:
        B = B[:, None]
    n = A.shape[1]
    T = B.shape[1]
    iter_lim = 2 * n if max_iter is None else int(max_iter)
    damp = float(np.sqrt(alpha))
    dampsq = damp * damp
    ctol = 1.0 / conlim if conlim > 0 else 0.0
    coef = np.zeros((n, T))
    n_iter = np.zeros(T, dtype=np.int64)
    bnorm = np.linalg.norm(B, axis=0)
    beta = bnorm.copy()
    U = np.divide(B, beta, out=np.zeros_like(B), where=beta > 0)
    V = A.T @ U
    alfa = np.linalg.norm(V, axis=0)
    V = np.divide(V, alfa, out=V, where=alfa > 0)
    active = np.flatnonzero(alfa * beta != 0)  # arnorm == 0: x = 0 is the answer
    U, V, alfa, beta, bnorm = U[:, active], V[:, active], alfa[active], beta[active], bnorm[active]
    W = V.copy()
    x = np.zeros((n, len(active)))
    k = len(active)
    rhobar, phibar = alfa.copy(), beta.copy()
    anorm, ddnorm, res2, xxnorm, z = (np.zeros(k) for _ in range(5))
    cs2, sn2 = -np.ones(k), np.zeros(k)
    itn = 0
    while k and itn < iter_lim:
        itn += 1
        U = A @ V - alfa * U
        beta = np.linalg.norm(U, axis=0)
        pos = beta > 0
        U = np.divide(U, beta, out=U, where=pos)
        anorm = np.where(pos, np.sqrt(anorm ** 2 + alfa ** 2 + beta ** 2 + dampsq), anorm)
        V_new = A.T @ U - beta * V
        alfa_new = np.linalg.norm(V_new, axis=0)
        V_new = np.divide(V_new, alfa_new, out=V_new, where=alfa_new > 0)
        V = np.where(pos, V_new, V)
        alfa = np.where(pos, alfa_new, alfa)
        if damp > 0:
            rhobar1 = np.sqrt(rhobar ** 2 + dampsq)
            cs1, sn1 = rhobar / rhobar1, damp / rhobar1
            psi = sn1 * phibar
            phibar = cs1 * phibar
        else:
            rhobar1, psi = rhobar, np.zeros(k)
        cs, sn, rho = _sym_ortho(rhobar1, beta)
        theta = sn * alfa
        rhobar = -cs * alfa
        phi = cs * phibar
        phibar = sn * phibar
        tau = sn * phi
        t1, t2 = phi / rho, -theta / rho
        ddnorm = ddnorm + (np.linalg.norm(W, axis=0) / rho) ** 2
        x = x + t1 * W
        W = V + t2 * W
        delta = sn2 * rho
        gambar = -cs2 * rho
        rhs = phi - delta * z
        zbar = rhs / gambar
        xnorm = np.sqrt(xxnorm + zbar ** 2)
        gamma = np.sqrt(gambar ** 2 + theta ** 2)
        cs2, sn2 = gambar / gamma, theta / gamma
        z = rhs / gamma
        xxnorm = xxnorm + z ** 2
        acond = anorm * np.sqrt(ddnorm)
        res2 = res2 + psi ** 2
        rnorm = np.sqrt(phibar ** 2 + res2)
        arnorm = alfa * np.abs(tau)
        test1 = rnorm / bnorm
        test2 = arnorm / (anorm * rnorm + _EPS)
        test3 = 1 / (acond + _EPS)
        t1n = test1 / (1 + anorm * xnorm / bnorm)
        rtol = tol + tol * anorm * xnorm / bnorm
        stop = ((itn >= iter_lim) | (1 + test3 <= 1) | (1 + test2 <= 1) | (1 + t1n <= 1)
                | (test3 <= ctol) | (test2 <= tol) | (test1 <= rtol))
        if stop.any():
            done = active[stop]
            coef[:, done] = x[:, stop]
            n_iter[done] = itn
            keep = ~stop
            active, k = active[keep], int(keep.sum())
            U, V, W, x = (M[:, keep] for M in (U, V, W, x))
            (alfa, beta, bnorm, rhobar, phibar, anorm, ddnorm, res2, xxnorm, z, cs2, sn2) = (
                v[keep] for v in (alfa, beta, bnorm, rhobar, phibar, anorm, ddnorm, res2, xxnorm, z, cs2, sn2))
    if k:
        coef[:, active] = x
        n_iter[active] = itn
    return np.ascontiguousarray(coef.T), n_iter


def _lsqr_gene(Z_train: np.ndarray, y: np.ndarray, damp: float, tol: float, max_iter: int):
    from scipy.sparse.linalg import lsqr

    out = lsqr(Z_train, y, damp=damp, atol=tol, btol=tol, iter_lim=max_iter)
    return out[0], out[2]


# PCA-reduced folds with at least 4 train spots per component and this many multiply-adds per
# product (spots x components x genes) take the batched path; measured: with 256 components,
# 400 spots -> LSQR needs 40-50 iterations and batching moves a gene's Pearson by ~1e-3,
# 600 -> 1e-7, >= 1000 -> 1e-14 (15-25 iterations).
BATCHED_LSQR_FROM = 4_000_000
BATCHED_MIN_SPOTS_PER_COMPONENT = 4


def ridge_predict(Z_train: np.ndarray, Y_train: np.ndarray, Z_test: np.ndarray, alpha: float, *,
                  tol: float = 1e-4, max_iter: int = 1000, batched: bool = False) -> tuple[np.ndarray, int]:
    """sklearn's ``Ridge(solver='lsqr', fit_intercept=False, tol, max_iter).fit(Z_train,
    Y_train).predict(Z_test)``: ``(N, k)``, ``(N, G)``, ``(M, k)`` -> ``(M, G)`` predictions and
    the largest LSQR iteration count.

    Two paths. Per gene: the very calls sklearn makes (``scipy.sparse.linalg.lsqr`` per gene,
    ``damp = sqrt(alpha)``, ``atol = btol = tol``, the same array layout, ``X @ coef_.T``), so
    the result is bitwise sklearn's. Batched (:func:`ridge_lsqr`): the same iteration for all
    genes at once with matrix products, 3-5x faster on real fold sizes, where it agrees with
    sklearn to ~1e-14. Why not always batched: LSQR stops early, and on small or
    ill-conditioned problems that need many iterations its answer is rounding-sensitive (a
    1e-14 change of the input moves sklearn's own per-gene Pearson by up to ~1e-3), so only
    the bitwise path reproduces the reference there. :func:`fit_predict_fold` takes the
    batched path only for large PCA-reduced folds (see ``BATCHED_LSQR_FROM``), where PCA output
    is well-conditioned and LSQR stops after ~15-25 iterations."""
    # sklearn's Ridge copies X in "K" order (_preprocess_data): F stays F, a strided view (as
    # PCA.fit_transform returns) becomes C. Same layout, same BLAS calls, same bits — and a
    # contiguous matrix, without which every LSQR product would first copy it.
    Z_train = np.array(Z_train, dtype=np.float64, order="K", copy=True)
    Y_train = np.asarray(Y_train, dtype=np.float64)
    if Y_train.ndim == 1:
        Y_train = Y_train[:, None]
    if batched:
        coef, its = ridge_lsqr(Z_train, Y_train, alpha, tol=tol, max_iter=max_iter)
        iters = int(its.max(initial=0))
    else:
        damp = float(np.sqrt(alpha))
        coef = np.empty((Y_train.shape[1], Z_train.shape[1]), dtype=np.float64)
        iters = 0
        for g in range(Y_train.shape[1]):
            coef[g], it = _lsqr_gene(Z_train, Y_train[:, g], damp, tol, max_iter)
            iters = max(iters, it)
    return np.asarray(Z_test, dtype=np.float64) @ coef.T, int(iters)


@dataclass
class FoldScore:
    """One fold's result: per-gene Pearson ``(G,)``, their mean, and what was fitted."""

    pearson: np.ndarray
    alpha: float
    n_components: int
    n_train: int
    n_test: int
    lsqr_iterations: int
    predictions: np.ndarray = field(repr=False, default=None)

    @property
    def undefined_genes(self) -> int:
        """Genes whose Pearson is undefined (constant over the test spots, or predicted constant)."""
        return int(np.isnan(self.pearson).sum())

    @property
    def mean(self) -> float:
        """Mean Pearson over the genes where it is defined. The reference's ``np.mean`` would be
        NaN as soon as one gene is constant over a fold's test spots; pathrobust leaves such
        genes out and says so (:attr:`undefined_genes`, a warning, the run's summary)."""
        finite = self.pearson[np.isfinite(self.pearson)]
        return float(np.mean(finite)) if finite.size else float("nan")


def fit_predict_fold(X_train: np.ndarray, Y_train: np.ndarray, X_test: np.ndarray, Y_test: np.ndarray, *,
                     pca: bool = True, n_components: int = 256, random_state: int = 1,
                     alpha: float | None = None, alpha_numerator: float = 100.0, tol: float = 1e-4,
                     max_iter: int = 1000) -> FoldScore:
    """The HEST linear probe on one fold (see module doc).

    ``X_*`` embeddings ``(N, D)``, ``Y_*`` targets ``(N, G)`` (already log1p). ``alpha=None``
    is the reference's ``alpha_numerator / (n_features_after_pca * G)``."""
    Y_train = np.asarray(Y_train, dtype=np.float64)
    Y_test = np.asarray(Y_test, dtype=np.float64)
    Z_train, Z_test = project(X_train, X_test, pca=pca, n_components=n_components, random_state=random_state)
    a = reference_alpha(Z_train.shape[1], Y_train.shape[1], alpha_numerator) if alpha is None else float(alpha)
    n, k = Z_train.shape
    batched = pca and n >= BATCHED_MIN_SPOTS_PER_COMPONENT * k and n * k * Y_train.shape[1] >= BATCHED_LSQR_FROM
    pred, iters = ridge_predict(Z_train, Y_train, Z_test, a, tol=tol, max_iter=max_iter, batched=batched)
    return FoldScore(pearson_per_gene(Y_test, pred), a, Z_train.shape[1], len(Z_train), len(Z_test), iters, pred)


def choose_alpha_cv(X: np.ndarray, Y: np.ndarray, groups: Sequence[str], alphas: Sequence[float], *,
                    n_splits: int = 5, pca: bool = True, n_components: int = 256,
                    random_state: int = 1) -> tuple[float, np.ndarray]:
    """Alpha by inner cross-validation grouped by sample (patient): ``GroupKFold`` with
    ``min(n_splits, n_groups)`` folds over the train spots; each inner fold refits the scaler
    and PCA on its own train part, solves every alpha exactly, and scores the mean per-gene
    Pearson over its pooled held-out spots. Returns the best alpha and the mean score per
    alpha ``(len(alphas),)`` (ties -> the larger alpha, the more regularised model)."""
    from sklearn.model_selection import GroupKFold

    groups = np.asarray(groups)
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise ValueError("alpha cross-validation needs at least 2 train samples (groups)")
    scores = np.zeros(len(alphas))
    splits = list(GroupKFold(n_splits=min(n_splits, n_groups)).split(X, Y, groups))
    for inner_train, inner_val in splits:
        Z_tr, Z_val = project(X[inner_train], X[inner_val], pca=pca, n_components=n_components,
                              random_state=random_state)
        for i, coef in enumerate(ridge_exact_path(Z_tr, Y[inner_train], alphas)):
            scores[i] += np.nanmean(pearson_per_gene(Y[inner_val], Z_val @ coef)) / len(splits)
    order = np.argsort(np.asarray(alphas))[::-1]  # larger alpha first so argmax prefers it on ties
    best = order[int(np.nanargmax(scores[order]))]
    return float(alphas[best]), scores
