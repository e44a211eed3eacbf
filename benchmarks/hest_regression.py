"""HEST regression stage: pathrobust's fold vs the plain scikit-learn pipeline, same embeddings.

Prints the time ratio (pathrobust / scikit-learn; target <= 1.0) and the largest per-gene
Pearson difference (must be <= 1e-6). The plain pipeline is HEST's
``Pipeline([StandardScaler(), PCA(256, random_state=1)])`` -> ``Ridge(solver='lsqr',
fit_intercept=False, alpha=100/(256*50))`` -> ``scipy.stats.pearsonr`` per gene.

    python benchmarks/hest_regression.py                   # IDC-sized synthetic embeddings
    python benchmarks/hest_regression.py --train 2000 --dim 768 --repeats 5
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def embeddings(n_train: int, n_test: int, dim: int, genes: int, seed: int = 0):
    """Low-rank embeddings plus noise (as foundation-model features are), and log1p counts
    driven by a few latent factors."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n_train + n_test, 48))
    X = (latent @ rng.normal(size=(48, dim)) + rng.normal(size=(n_train + n_test, dim))).astype(np.float32)
    Y = np.log1p(rng.poisson(np.exp(0.3 * latent[:, :8] @ rng.normal(size=(8, genes)) + 1.0))).astype(np.float64)
    return X[:n_train].astype(np.float64), Y[:n_train], X[n_train:].astype(np.float64), Y[n_train:]


def sklearn_fold(X_tr, Y_tr, X_te, Y_te):
    from scipy.stats import pearsonr
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    pipe = Pipeline([("scaler", StandardScaler()), ("PCA", PCA(n_components=256, random_state=1))])
    Z_tr, Z_te = pipe.fit_transform(X_tr), pipe.transform(X_te)
    reg = Ridge(solver="lsqr", alpha=100 / (Z_tr.shape[1] * Y_tr.shape[1]), random_state=1, fit_intercept=False,
                max_iter=1000)
    pred = reg.fit(Z_tr, Y_tr).predict(Z_te)
    return np.array([pearsonr(Y_te[:, g], pred[:, g])[0] for g in range(Y_te.shape[1])])


def main() -> None:
    from pathrobust.probes.ridge import fit_predict_fold

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=4000, help="train spots (IDC folds: ~3-4k)")
    ap.add_argument("--test", type=int, default=1500)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--genes", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    data = embeddings(args.train, args.test, args.dim, args.genes)
    t_sk, t_pr = [], []
    for _ in range(args.repeats):  # interleaved, best of N: robust to other load on the machine
        t0 = time.perf_counter()
        want = sklearn_fold(*data)
        t1 = time.perf_counter()
        got = fit_predict_fold(*data).pearson
        t2 = time.perf_counter()
        t_sk.append(t1 - t0)
        t_pr.append(t2 - t1)
    diff = float(np.nanmax(np.abs(got - want)))
    print(f"embeddings: train {args.train} x {args.dim}, test {args.test}, {args.genes} genes; best of {args.repeats}")
    print(f"scikit-learn pipeline : {min(t_sk):.3f} s")
    print(f"pathrobust            : {min(t_pr):.3f} s")
    print(f"max |pearson diff|    : {diff:.2e}  (must be <= 1e-6)")
    print(f"ratio pathrobust/sklearn: {min(t_pr) / min(t_sk):.3f}  (target <= 1.0)")


if __name__ == "__main__":
    main()
