"""Gene-expression regression metrics: the HEST-Benchmark linear probe, as pure functions.

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

* Everything runs in float64. HEST wraps the PCA output in ``torch.Tensor`` (float32) before
  the ridge; that cast moves per-gene Pearson by ~1e-5, far below fold-to-fold spread.
* Fewer than 256 features or train spots: sklearn's ``PCA(256)`` raises; we keep
  ``min(256, n_train_spots, n_features)`` components and alpha uses that dimension.
* The ridge makes sklearn's own per-gene LSQR calls (bitwise its result; see
  :func:`ridge_predict` for why nothing cleverer is faithful), on several threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

def pearson_per_gene(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Pearson r of each column: ``y_true``, ``y_pred`` ``(N, G)`` -> ``(G,)``.

    Matches ``scipy.stats.pearsonr`` per column; a constant column gives NaN (as scipy does)."""
    yt = np.asarray(y_true, dtype=np.float64)
    yp = np.asarray(y_pred, dtype=np.float64)
    if yt.shape != yp.shape or yt.ndim != 2:
        raise ValueError(f"y_true {yt.shape} and y_pred {yp.shape} must be the same (N, G) shape")
    yt = yt - yt.mean(axis=0)
    yp = yp - yp.mean(axis=0)
    # scipy normalises each centred vector before the dot product; do the same for rounding.
    nt = np.linalg.norm(yt, axis=0)
    np_ = np.linalg.norm(yp, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.einsum("ng,ng->g", yt / nt, yp / np_)
    r = np.clip(r, -1.0, 1.0)
    r[(nt == 0) | (np_ == 0)] = np.nan
    return r


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


def _lsqr_gene(Z_train: np.ndarray, y: np.ndarray, damp: float, tol: float, max_iter: int):
    from scipy.sparse.linalg import lsqr

    out = lsqr(Z_train, y, damp=damp, atol=tol, btol=tol, iter_lim=max_iter)
    return out[0], out[2]


def ridge_predict(Z_train: np.ndarray, Y_train: np.ndarray, Z_test: np.ndarray, alpha: float, *,
                  tol: float = 1e-4, max_iter: int = 1000, threads: int = 0) -> tuple[np.ndarray, int]:
    """sklearn's ``Ridge(solver='lsqr', fit_intercept=False, tol, max_iter).fit(Z_train,
    Y_train).predict(Z_test)``: ``(N, k)``, ``(N, G)``, ``(M, k)`` -> ``(M, G)`` predictions and
    the largest LSQR iteration count.

    It makes the very calls sklearn makes (``scipy.sparse.linalg.lsqr`` per gene with
    ``damp = sqrt(alpha)``, ``atol = btol = tol``; the same array layout; ``X @ coef_.T`` to
    predict), so the result is bitwise sklearn's. That matters: LSQR stops early, and on
    folds that need many iterations its answer is rounding-sensitive (a 1e-14 change of the
    input, or running all genes as one matrix product, moves a gene's Pearson by up to
    ~1e-3). What it skips is sklearn's validation copies; the genes are solved on ``threads``
    threads (0 = one per CPU, at most 8; BLAS releases the GIL, results do not depend on it)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    Z_train = np.asarray(Z_train, dtype=np.float64)
    Y_train = np.asarray(Y_train, dtype=np.float64)
    if Y_train.ndim == 1:
        Y_train = Y_train[:, None]
    n_genes = Y_train.shape[1]
    damp = float(np.sqrt(alpha))
    workers = min(n_genes, threads or min(8, os.cpu_count() or 1))
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda g: _lsqr_gene(Z_train, Y_train[:, g], damp, tol, max_iter), range(n_genes)))
    else:
        results = [_lsqr_gene(Z_train, Y_train[:, g], damp, tol, max_iter) for g in range(n_genes)]
    coef = np.empty((n_genes, Z_train.shape[1]), dtype=np.float64)
    for g, (x, _) in enumerate(results):
        coef[g] = x
    iters = max((it for _, it in results), default=0)
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
    def mean(self) -> float:
        return float(np.mean(self.pearson))


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
    pred, iters = ridge_predict(Z_train, Y_train, Z_test, a, tol=tol, max_iter=max_iter)
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


def fold_summary(fold_means: Sequence[float]) -> tuple[float, float]:
    """HEST ``merge_fold_results``: ``(np.mean, np.std)`` (population std) over fold scores."""
    arr = np.asarray(fold_means, dtype=np.float64)
    return float(np.mean(arr)), float(np.std(arr))
