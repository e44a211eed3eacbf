"""PathoROB's robustness metrics, as its reference code computes them, and croma's variants.

Reference: bifold-pathomics/PathoROB at commit 46594e9 (``robustness_index/*``,
``clustering_score/*``, ``apd/utils.py``); croma 1.0.1 (MaRI, CRoMa). Definitions:
reference/protocols.md, "PathoROB".

Robustness index (RI). Embeddings are L2-normalised; each query's k nearest neighbours by
cosine similarity are taken among the rows of *other slides* (:func:`pathrobust.metrics.knn.knn`
with the slide as group: PathoROB fetches k + largest-slide neighbours and drops the query's
slide). Each neighbour is SS, SO, OS or OO: same/other biological class, same/other medical
centre. RI(k) = ΣSO / (ΣSO + ΣOS), summed over all queries and ranks 1..k (pooled, not a
mean of per-query ratios). In the paired design (TCGA's default) the search runs inside each
2 × 2 subset (2 classes × 2 centres) and the counts of all subsets are pooled; a patch that
belongs to several subsets is a query once per subset. RI(k) for every k up to a maximum is
the curve; k defaults per dataset, or is chosen by k-NN balanced accuracy of the class over
PathoROB's grid (:func:`k_grid`, :func:`select_k`).

Variants (croma 1.0.1, labelled as such wherever reported): MaRI weights each SO/OS
neighbour by ``exp(-d / tau)`` with ``d`` the cosine distance (``tau`` defaults to the median
SO/OS distance within the k neighbours); CRoMa_i = (d̄_OS − d̄_SO) / (d̄_OS + d̄_SO) over the
``m`` nearest SO and the ``m`` nearest OS neighbours of other slides, reported as the median
over queries (paired: the median of the subsets' medians).

Clustering score: for every 2 classes × 2 centres, K by the best cosine silhouette over
K = 2..30 (k-means, random init, n_init 20, seed 1337), then 50 k-means trials (n_init 5,
seeds 1337 + t); score = ARI(class) − ARI(centre), averaged over trials, then combinations.

APD reductions: :func:`apd_per_iteration` and :func:`corrected_mean_ci` (the training that
produces the accuracies is in :mod:`pathrobust.probes.pathorob_apd`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations, product

import numpy as np
import pandas as pd

from pathrobust.errors import UserError
from pathrobust.metrics.classification import balanced_accuracy
from pathrobust.metrics.knn import Neighbours, TypedNeighbours, knn

TYPES = ("SS", "SO", "OS", "OO")
CROMA_LABEL = "croma 1.0.1"
SMALL_KMEANS = 2_000_000  # rows x dims below which k-means runs single-threaded


# -- neighbourhoods --------------------------------------------------------------------------
@dataclass
class Neighbourhood:
    """One k-NN search space: all RI rows (plain design) or one 2 × 2 subset (paired).

    ``rows`` ``(q,)`` index into the embeddings; ``labels``/``centres`` ``(q,)`` int codes
    (labels coded in sorted order, as PathoROB's LabelEncoder); ``neighbours`` ``(q, K)``
    *local* indices into ``rows``, nearest first; ``similarities`` ``(q, K)`` cosine."""

    subset: str
    rows: np.ndarray
    labels: np.ndarray
    centres: np.ndarray
    slides: np.ndarray
    neighbours: np.ndarray
    similarities: np.ndarray

    def types(self, k: int | None = None) -> dict[str, np.ndarray]:
        """Boolean ``(q, k)`` masks SS, SO, OS, OO of the first ``k`` neighbours (all: None)."""
        nb = self.neighbours if k is None else self.neighbours[:, :k]
        same_label = self.labels[nb] == self.labels[:, None]
        same_centre = self.centres[nb] == self.centres[:, None]
        return {"SS": same_label & same_centre, "SO": same_label & ~same_centre,
                "OS": ~same_label & same_centre, "OO": ~same_label & ~same_centre}


def check_design(table: pd.DataFrame, design: str, source: str) -> None:
    """RI is defined only if SO neighbours can exist: every class in two centres or more
    (plain), every subset a complete 2 × 2 of classes × centres (paired). UserError otherwise."""
    if design == "plain":
        centres_of = table.groupby("biological_class")["medical_center"].nunique()
        lone = centres_of[centres_of < 2]
        if len(lone):
            cls = lone.index[0]
            centre = table.loc[table["biological_class"] == cls, "medical_center"].iloc[0]
            raise UserError(f"{source}: class {cls!r} occurs in centre {centre!r} only, so it has no "
                            f"same-class neighbour in another centre: RI is undefined")
        if table["medical_center"].nunique() < 2:
            raise UserError(f"{source}: one medical centre only: RI is undefined")
        return
    if design != "paired":
        raise UserError(f"design {design!r}: expected 'plain' or 'paired'")
    for subset, rows in table.groupby("subset", sort=True):
        cells = rows.groupby(["biological_class", "medical_center"]).size()
        n_cls, n_cen = rows["biological_class"].nunique(), rows["medical_center"].nunique()
        if n_cls != 2 or n_cen != 2 or len(cells) != 4:
            raise UserError(f"{source}: subset {subset!r} has {n_cls} class(es) x {n_cen} centre(s) in {len(cells)} "
                            f"cell(s); the paired design needs 2 classes x 2 centres, all 4 cells filled")


def build_neighbourhoods(embeddings: np.ndarray, table: pd.DataFrame, design: str, k: int, *,
                         device: str = "cpu", chunk: int | None = None, order: str = "boundary",
                         boundaries: Sequence[int] = (), exact_values: bool = False,
                         source: str = "RI rows") -> list[Neighbourhood]:
    """k-NN (other slides only) of every RI row, per design.

    ``table`` needs ``row`` (index into ``embeddings``), ``slide_id``, ``biological_class``,
    ``medical_center`` and, for ``design="paired"``, ``subset``. UserError for a design
    where RI is undefined or a query with fewer than ``k`` neighbours on other slides."""
    check_design(table, design, source)
    groups = [("all", table)] if design == "plain" else list(table.groupby("subset", sort=True))
    out = []
    for subset, part in groups:
        rows = part["row"].to_numpy(np.int64)
        labels = np.unique(part["biological_class"].astype(str), return_inverse=True)[1]
        centres = np.unique(part["medical_center"].astype(str), return_inverse=True)[1]
        slides = part["slide_id"].astype(str).to_numpy()
        where = source if design == "plain" else f"{source}, subset {subset!r}"
        nb: Neighbours = knn(embeddings[rows], k, groups=slides, device=device, chunk=chunk, order=order,
                             boundaries=boundaries, exact_values=exact_values, source=where)
        out.append(Neighbourhood(str(subset), rows, labels, centres, slides, nb.indices, nb.similarities))
    return out


# -- robustness index ------------------------------------------------------------------------
def ri_from_counts(so: np.ndarray | float, os_: np.ndarray | float) -> np.ndarray | float:
    """SO / (SO + OS); NaN where both are 0."""
    so, os_ = np.asarray(so, np.float64), np.asarray(os_, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(so + os_ > 0, so / (so + os_), np.nan)
    return float(out) if out.ndim == 0 else out


def ri_curve(hoods: Sequence[Neighbourhood], k_max: int) -> pd.DataFrame:
    """Pooled cumulative counts and RI for k = 1..k_max (columns ``k, SS, SO, OS, OO, RI``)."""
    totals = {t: np.zeros(k_max, np.int64) for t in TYPES}
    for h in hoods:
        for t, mask in h.types(k_max).items():
            totals[t] += np.cumsum(mask.sum(axis=0, dtype=np.int64))
    df = pd.DataFrame({"k": np.arange(1, k_max + 1), **totals})
    df["RI"] = ri_from_counts(df["SO"].to_numpy(), df["OS"].to_numpy())
    return df


def per_query_counts(hoods: Sequence[Neighbourhood], k: int) -> pd.DataFrame:
    """One row per query (occurrence): ``subset, row, SS, SO, OS, OO, RI`` at ``k``."""
    parts = []
    for h in hoods:
        counts = {t: m.sum(axis=1) for t, m in h.types(k).items()}
        parts.append(pd.DataFrame({"subset": h.subset, "row": h.rows, **counts}))
    df = pd.concat(parts, ignore_index=True)
    df["RI"] = ri_from_counts(df["SO"].to_numpy(), df["OS"].to_numpy())
    return df


def robustness_index(hoods: Sequence[Neighbourhood], k: int) -> float:
    """Pooled RI(k) = ΣSO / (ΣSO + ΣOS) over all queries (occurrences) and ranks 1..k."""
    return float(ri_curve(hoods, k)["RI"].iloc[-1])


# -- k selection by k-NN balanced accuracy ---------------------------------------------------
def k_grid(max_k: int) -> list[int]:
    """PathoROB's candidate k: 1, 3, 5, 7, 9, then 11, 21, ... below ``max_k``
    (``robustness_index_utils.get_k_values``)."""
    return [1, 3, 5, 7, 9] + list(range(11, max_k, 10))


def knn_balanced_accuracy(hood: Neighbourhood, k_values: Sequence[int]) -> dict[int, float]:
    """Balanced accuracy of the class predicted by the majority of the first k neighbours
    (ties: the smallest class code, as ``scipy.stats.mode`` on LabelEncoder codes)."""
    n_cls = int(hood.labels.max()) + 1
    counts = np.zeros((len(hood.rows), n_cls), np.int64)
    out, q = {}, np.arange(len(hood.rows))
    wanted = set(int(k) for k in k_values)
    for r in range(max(wanted)):
        np.add.at(counts, (q, hood.labels[hood.neighbours[:, r]]), 1)
        if r + 1 in wanted:
            out[r + 1] = balanced_accuracy(hood.labels, counts.argmax(axis=1), n_cls)
    return out


def select_k(hoods: Sequence[Neighbourhood], max_k: int) -> tuple[int, pd.DataFrame]:
    """k with the best k-NN balanced accuracy over :func:`k_grid` (first best); the accuracy
    of several neighbourhoods (paired design) is their mean. Candidates are those every
    neighbourhood has neighbours for. Returns ``(k, table of k, balanced_accuracy)``."""
    available = min(h.neighbours.shape[1] for h in hoods)
    ks = [k for k in k_grid(max_k) if k <= available]
    scores = [knn_balanced_accuracy(h, ks) for h in hoods]
    table = pd.DataFrame({"k": ks, "balanced_accuracy": [float(np.mean([s[k] for s in scores])) for k in ks]})
    best = int(table["k"].iloc[int(np.argmax(table["balanced_accuracy"].to_numpy()))])
    return best, table


# -- croma's variants ------------------------------------------------------------------------
def typed_distances(hoods: Sequence[Neighbourhood], k: int) -> np.ndarray:
    """Cosine distances ``1 - cos`` of the SO and OS neighbours among the first k, pooled."""
    parts = []
    for h in hoods:
        t = h.types(k)
        parts.append((1.0 - h.similarities[:, :k])[t["SO"] | t["OS"]])
    return np.concatenate(parts) if parts else np.empty(0)


def mari(hoods: Sequence[Neighbourhood], k: int, tau: float | None = None) -> tuple[float, float]:
    """croma's MaRI at ``k``: Σ_SO w / Σ_(SO+OS) w, ``w = exp(-d / tau)``, pooled over queries
    and ranks (and subsets). ``tau=None``: the median SO/OS distance within the first k.
    Needs float64 similarities (``exact_values``). Returns ``(mari, tau)``."""
    if tau is None:
        d = typed_distances(hoods, k)
        tau = float(np.median(d)) if d.size else float("nan")
        if not np.isfinite(tau) or tau <= 0:
            tau = 0.2  # croma's TAU_FALLBACK: no typed neighbour, or all at distance 0
    so = os_ = 0.0
    for h in hoods:
        t = h.types(k)
        w = np.exp(-(1.0 - h.similarities[:, :k]) / tau)
        so += float(w[t["SO"]].sum())
        os_ += float(w[t["OS"]].sum())
    return (so / (so + os_) if so + os_ > 0 else 0.5), float(tau)


@dataclass
class CromaResult:
    value: float
    per_query: pd.DataFrame  # subset, row, d_SO, d_OS, CRoMa
    subset_medians: dict[str, float]
    ltm: float  # mean of the values at or below the alpha quantile
    f0: float  # fraction of queries with CRoMa <= 0
    m: int
    alpha: float


def croma_margin(embeddings: np.ndarray, table: pd.DataFrame, design: str, m: int = 5, alpha: float = 0.10, *,
                 device: str = "cpu", chunk: int | None = None, source: str = "RI rows") -> CromaResult:
    """croma's CRoMa: per query the mean cosine distance to its ``m`` nearest SO and ``m``
    nearest OS neighbours on other slides; ``(d_OS - d_SO) / (d_OS + d_SO)``; the median over
    queries (paired: the median of the subsets' medians). Every query must have ``m`` of each."""
    check_design(table, design, source)
    groups = [("all", table)] if design == "plain" else list(table.groupby("subset", sort=True))
    parts, medians = [], {}
    for subset, part in groups:
        rows = part["row"].to_numpy(np.int64)
        lab, cen, sl = (part[c].astype(str).to_numpy() for c in ("biological_class", "medical_center", "slide_id"))
        x = embeddings[rows]
        where = source if design == "plain" else f"{source}, subset {subset!r}"
        d = {}
        for kind in ("SO", "OS"):
            ex = TypedNeighbours(lab, cen, sl, kind)
            nb = knn(x, m, exclusion=ex, device=device, chunk=chunk, exact_values=True,
                     source=f"{where} ({kind} neighbours for CRoMa, m = {m})")
            d[kind] = (1.0 - nb.similarities).mean(axis=1)
        denom = d["OS"] + d["SO"]
        if (denom <= 0).any():
            raise UserError(f"{where}: a query has all its SO and OS neighbours at distance 0 "
                            f"(collapsed or duplicated embeddings): CRoMa is undefined")
        value = (d["OS"] - d["SO"]) / denom
        medians[str(subset)] = float(np.median(value))
        parts.append(pd.DataFrame({"subset": str(subset), "row": rows, "d_SO": d["SO"], "d_OS": d["OS"], "CRoMa": value}))
    per_query = pd.concat(parts, ignore_index=True)
    v = per_query["CRoMa"].to_numpy()
    q = float(np.percentile(v, alpha * 100))
    return CromaResult(float(np.median(list(medians.values()))), per_query, medians, float(v[v <= q].mean()),
                       float(np.mean(v <= 0.0)), m, alpha)


# -- clustering score ------------------------------------------------------------------------
@dataclass
class ClusteringResult:
    score: float  # mean over combinations of the mean over trials of ARI(class) - ARI(centre)
    spread: float  # mean over combinations of the std (ddof=1) over trials
    combinations: pd.DataFrame  # combination, K, score, std, ari_class, ari_centre
    trials: pd.DataFrame  # combination, trial, ari_class, ari_centre, score
    silhouette: pd.DataFrame  # combination, K, silhouette


def clustering_combinations(table: pd.DataFrame) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """PathoROB's 2 classes × 2 centres combinations, in its order: classes and centres in order
    of appearance, pairs by ``itertools.combinations``, rows cell by cell (c1-m1, c1-m2, c2-m1,
    c2-m2), each cell in table order. Combinations with an empty cell are skipped. Returns
    ``(name, rows, classes, centres)`` per combination."""
    classes = list(pd.unique(table["biological_class"]))
    centres = list(pd.unique(table["medical_center"]))
    cls, cen = table["biological_class"].to_numpy(), table["medical_center"].to_numpy()
    out = []
    for (b1, b2), (m1, m2) in product(combinations(classes, 2), combinations(centres, 2)):
        cells = [np.nonzero((cls == b) & (cen == m))[0] for b, m in ((b1, m1), (b1, m2), (b2, m1), (b2, m2))]
        if any(len(c) == 0 for c in cells):
            continue
        idx = np.concatenate(cells)
        out.append((f"{b1}-{b2}-{m1}-{m2}", table["row"].to_numpy()[idx], cls[idx], cen[idx]))
    return out


def clustering_score(embeddings: np.ndarray, table: pd.DataFrame, *, k_min: int = 2, k_max: int = 30,
                     fixed_k: int | None = None, silhouette_seed: int = 1337, silhouette_n_init: int = 20,
                     trials: int = 50, trial_seed: int = 1337, trial_n_init: int = 5,
                     source: str = "clustering rows") -> ClusteringResult:
    """PathoROB's clustering score (module doc). ``embeddings`` are the raw features (rows
    normalised here in their own dtype, as the reference); ``table`` needs ``row``,
    ``biological_class``, ``medical_center``."""
    from threadpoolctl import threadpool_limits

    combos = clustering_combinations(table)
    if not combos:
        raise UserError(f"{source}: no 2 classes x 2 centres combination with all four cells filled: "
                        f"the clustering score is undefined")
    sil_rows, trial_rows, combo_rows = [], [], []
    for name, rows, cls, cen in combos:
        # small problems: one BLAS/OpenMP thread is ~10x faster (thread start-up dominates)
        with threadpool_limits(1 if len(rows) * embeddings.shape[1] <= SMALL_KMEANS else None):
            k_sel = _cluster_combination(embeddings, name, rows, cls, cen, k_min, k_max, fixed_k, silhouette_seed,
                                         silhouette_n_init, trials, trial_seed, trial_n_init, sil_rows, trial_rows,
                                         source)
        combo_rows.append((name, k_sel))
    trials_df = pd.DataFrame(trial_rows, columns=["combination", "trial", "ari_class", "ari_centre", "score"])
    agg = trials_df.groupby("combination", sort=False).agg(score=("score", "mean"), std=("score", "std"),
                                                           ari_class=("ari_class", "mean"),
                                                           ari_centre=("ari_centre", "mean"))
    combos_df = pd.DataFrame(combo_rows, columns=["combination", "K"]).join(agg, on="combination")
    return ClusteringResult(float(combos_df["score"].mean()), float(combos_df["std"].mean()), combos_df, trials_df,
                            pd.DataFrame(sil_rows, columns=["combination", "K", "silhouette"]))


def _cluster_combination(embeddings, name, rows, cls, cen, k_min, k_max, fixed_k, silhouette_seed, silhouette_n_init,
                         trials, trial_seed, trial_n_init, sil_rows, trial_rows, source) -> int:
    """K selection and trials of one combination; appends to ``sil_rows``/``trial_rows``."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, silhouette_score

    z = np.asarray(embeddings[rows])
    z = z / np.sqrt((z ** 2).sum(axis=1))[:, None]
    if fixed_k is None:
        top = min(k_max, len(rows) - 1)
        if top < k_min:
            raise UserError(f"{source}: combination {name} has {len(rows)} rows, too few for K >= {k_min}")
        ks = list(range(k_min, top + 1))
        sil = [silhouette_score(z, KMeans(n_clusters=kk, random_state=silhouette_seed, init="random",
                                          n_init=silhouette_n_init).fit(z).labels_, metric="cosine") for kk in ks]
        sil_rows.extend((name, kk, float(s)) for kk, s in zip(ks, sil))
        k_sel = ks[int(np.argmax(sil))]
    else:
        k_sel = fixed_k
    for t in range(trials):
        labels = KMeans(n_clusters=k_sel, random_state=trial_seed + t, n_init=trial_n_init, init="random").fit(z).labels_
        a_cls, a_cen = adjusted_rand_score(cls, labels), adjusted_rand_score(cen, labels)
        trial_rows.append((name, t, a_cls, a_cen, a_cls - a_cen))
    return k_sel


# -- APD reductions --------------------------------------------------------------------------
def apd_per_iteration(accuracies: np.ndarray) -> np.ndarray:
    """``(n_splits, n_iterations)`` accuracies (split 0 balanced) -> ``(n_iterations,)``
    mean over splits s >= 1 of acc_s / acc_0, minus 1 (PathoROB ``compute_apd``)."""
    acc = np.asarray(accuracies, np.float64)
    if acc.ndim != 2 or acc.shape[0] < 2:
        raise ValueError(f"accuracies must be (n_splits >= 2, n_iterations), got {acc.shape}")
    return (acc[1:] / acc[0]).mean(axis=0) - 1


def apd(accuracies: np.ndarray) -> float:
    """Average performance drop: mean over iterations of :func:`apd_per_iteration`."""
    return float(np.mean(apd_per_iteration(accuracies)))


def corrected_mean_ci(scores: Mapping[str, Sequence[float]], quantile: float = 0.975) -> tuple[float, float]:
    """PathoROB's cross-dataset APD: per-iteration scores of each dataset, shifted so each
    dataset's mean equals the overall mean (Masson & Loftus), then mean ± t(quantile, df=N)·sem
    over all N scores (pandas ``sem``, ddof 1; df = N as the reference). Returns (mean, half-width)."""
    from scipy import stats

    values = {name: np.asarray(v, np.float64) for name, v in scores.items()}
    everything = np.concatenate(list(values.values()))
    overall = everything.mean()
    corrected = np.concatenate([v + overall - v.mean() for v in values.values()])
    n = len(corrected)
    sem = corrected.std(ddof=1) / np.sqrt(n) if n > 1 else float("nan")
    return float(corrected.mean()), float(stats.t.ppf(quantile, df=n) * sem)


@dataclass
class RobustnessResult:
    """RI of one dataset at its headline k, with the tables behind it."""

    k: int
    k_source: str  # "default" | "selected"
    ri: float
    counts: dict[str, int]  # pooled SS, SO, OS, OO at k
    curve: pd.DataFrame
    per_query: pd.DataFrame
    per_subset: pd.DataFrame
    k_selection: pd.DataFrame | None = None
    variants: dict[str, dict] = field(default_factory=dict)


def min_eligible(table: pd.DataFrame, design: str) -> int:
    """Fewest other-slide rows any query has (per subset in the paired design)."""
    parts = [table] if design == "plain" else [p for _, p in table.groupby("subset")]
    return int(min(len(p) - p["slide_id"].astype(str).value_counts().max() for p in parts))


def robustness(embeddings: np.ndarray, table: pd.DataFrame, design: str, k: int, *, curve_k_max: int = 0,
               select_k_max: int | None = None, exact_curve: bool = False, variants: Sequence[str] = (),
               mari_tau: float | None = None, croma_m: int = 5, croma_alpha: float = 0.10,
               device: str = "cpu", chunk: int | None = None, source: str = "RI rows") -> RobustnessResult:
    """RI of one dataset's RI rows (module doc), plus the curve, k selection and variants.

    Args:
        embeddings: raw features ``(n, d)``; ``table["row"]`` indexes them.
        table: the RI rows: ``row, slide_id, biological_class, medical_center`` (+ ``subset``
            for the paired design); a row may appear in several subsets.
        design: ``"plain"`` (one search over all rows) or ``"paired"`` (per 2 × 2 subset).
        k: headline k (the dataset's default), used unless ``select_k_max`` is given.
        curve_k_max: RI(k) for k = 1..this (capped at the neighbours every query has); 0: up to k.
        select_k_max: choose k by k-NN balanced accuracy over :func:`k_grid` below this instead.
        exact_curve: decide near-ties at every rank in float64, so every point of the curve is
            the float64 answer; otherwise the neighbour sets at k and at the k-selection grid
            are (RI(k) and the k-NN votes), the other curve points use the compute order.
        variants: any of ``"mari"``, ``"croma"`` (croma 1.0.1's definitions, labelled).
    """
    unknown = set(variants) - {"mari", "croma"}
    if unknown:
        raise UserError(f"variants: unknown {', '.join(sorted(unknown))} (choose from mari, croma)")
    check_design(table, design, source)
    available = min_eligible(table, design)
    if available < k:
        raise UserError(f"{source}: a query has only {available} neighbours on other slides, fewer than k = {k}")
    grid = [g for g in k_grid(select_k_max) if g <= available] if select_k_max else []
    fetch = max(k, min(max([curve_k_max, *grid]), available))
    hoods = build_neighbourhoods(embeddings, table, design, fetch, device=device, chunk=chunk,
                                 order="exact" if exact_curve else "boundary", boundaries=[k, *grid],
                                 exact_values="mari" in variants, source=source)
    selection = None
    k_source = "default"
    if select_k_max:
        k, selection = select_k(hoods, select_k_max)
        k_source = "selected"
    curve = ri_curve(hoods, min(max(k, curve_k_max), fetch))
    per_query = per_query_counts(hoods, k)
    per_subset = per_query.groupby("subset", sort=True)[list(TYPES)].sum()
    per_subset.insert(0, "queries", per_query.groupby("subset", sort=True).size())
    per_subset["RI"] = ri_from_counts(per_subset["SO"].to_numpy(), per_subset["OS"].to_numpy())
    per_subset = per_subset.reset_index()
    totals = {t: int(per_query[t].sum()) for t in TYPES}
    result = RobustnessResult(k, k_source, float(ri_from_counts(totals["SO"], totals["OS"])), totals, curve,
                              per_query, per_subset, selection)
    if "mari" in variants:
        value, tau = mari(hoods, k, mari_tau)
        result.variants["MaRI"] = {"value": value, "tau": tau, "k": k,
                                   "tau_source": "given" if mari_tau else "median SO/OS distance",
                                   "definition": CROMA_LABEL}
    if "croma" in variants:
        cr = croma_margin(embeddings, table, design, croma_m, croma_alpha, device=device, chunk=chunk, source=source)
        result.variants["CRoMa"] = {"value": cr.value, "ltm": cr.ltm, "f0": cr.f0, "m": cr.m, "alpha": cr.alpha,
                                    "definition": CROMA_LABEL, "per_query": cr.per_query}
    return result
