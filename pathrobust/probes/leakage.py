"""Leakage probes: how well a linear probe predicts a nuisance label (scanner, staining,
centre) from features — folds grouped by tissue location, so the same tissue never sits in
train and test. Normalised with :func:`pathrobust.metrics.plism.normalized_balanced_accuracy`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pathrobust.metrics.plism import normalized_balanced_accuracy


def leakage_probe(features: np.ndarray, labels: Sequence[str], positions: Sequence[int], folds: int = 5,
                  alpha: float = 1.0, pca_dim: int | None = 64, seed: int = 0) -> dict[str, float]:
    """How well a linear probe predicts a nuisance label (scanner, staining) from features.

    ``features`` ``(m, d)``, ``labels`` ``(m,)``, ``positions`` ``(m,)`` tile location of each row:
    folds are grouped by location, so the same tissue never sits in train and test.
    Standardise, PCA to ``pca_dim`` (fitted in-fold; ``None``: none), a one-vs-rest ridge
    classifier (closed form: fast and deterministic); returns the pooled out-of-fold balanced
    accuracy and its normalisation (0 = chance, 1 = every row identified)."""
    from sklearn.linear_model import RidgeClassifier
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(labels)
    classes = np.unique(y)
    groups = np.asarray(positions)
    n_folds = min(folds, len(np.unique(groups)))
    if len(classes) < 2 or n_folds < 2:
        return {"balanced_accuracy": float("nan"), "normalized": float("nan"), "n_classes": int(len(classes))}
    pred = np.empty_like(y)
    for train, test in GroupKFold(n_splits=n_folds).split(features, y, groups):
        steps = [StandardScaler()]
        if pca_dim is not None and pca_dim < min(len(train), features.shape[1]):
            steps.append(PCA(pca_dim, random_state=seed))
        clf = make_pipeline(*steps, RidgeClassifier(alpha=alpha))
        clf.fit(features[train], y[train])
        pred[test] = clf.predict(features[test])
    bacc = float(balanced_accuracy_score(y, pred))
    return {"balanced_accuracy": bacc, "normalized": normalized_balanced_accuracy(bacc, len(classes)),
            "n_classes": int(len(classes))}
