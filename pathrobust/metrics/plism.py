"""PLISM robustness metrics (plismbench's definitions), computed fast and in bounded memory.

For a slide pair (A, B) with row i of A and row i of B at the same tile location, n tiles:

* cosine similarity — mean over i of cos(A_i, B_i) (plismbench ``metrics/cosine_similarity.py``:
  the diagonal of the normalised cross block, averaged).
* top-k accuracy — stack M = [A; B] (2n rows). For query row r the gallery is the other 2n−1
  rows (the query's own slide included: same-slide tiles are distractors); a hit when r's
  partner is among the k rows most similar by cosine; the score is the mean of the A→B and
  B→A hit rates (plismbench ``metrics/retrieval.py`` / ``engine/evaluate.py``:
  ``argpartition(-cos, range(1, kmax+1))[:, 1:kmax+1]`` on the 2n×2n matrix, i.e. the query
  itself dropped as its own nearest neighbour, then any partner hit in the first k, averaged
  over both directions).

Ties. plismbench breaks ties by whatever order ``argpartition`` leaves (unspecified), and it
drops the query by assuming it sorts first. pathrobust drops the query by index and scores a
tie as the expected hit under a uniformly random tie-break: with ``g`` gallery rows strictly
more similar than the partner and ``t`` others tied with it, the hit is
``clip((k - g) / (t + 1), 0, 1)``. Without ties this is exactly the reference's 0/1 hit; with
ties a collapsed encoder (all features equal) scores ``k / (2n - 1)``, never 1. Two
similarities closer than a precision-dependent tolerance (:data:`TIE_TOL`, a few ulps of the
compute dtype) count as tied, so rounding noise between kernels cannot decide a tie.

Cost. plismbench builds the 2n×2n matrix per pair. Here the within-slide blocks A·Aᵀ and
B·Bᵀ do not depend on the partner, so :func:`slide_topk` keeps, once per slide, only each
row's ``kmax`` largest within-slide similarities (enough to count within-slide competitors
of any partner similarity, exactly; a row whose ``kmax``-th value ties the partner is
recounted from its full row). Per pair only the cross block A·Bᵀ is computed, in row chunks
(:func:`pair_metrics`): one n×n×d GEMM, the floor, and O(chunk·n) memory. Small slides are
evaluated several partners at a time (:func:`pair_metrics_batch`) so that per-call overhead
does not dominate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_TOPK: tuple[int, ...] = (1, 3, 5, 10)
# Robustness groups, in plismbench's order (utils/aggregate.py ``get_results``).
GROUPS: tuple[str, ...] = ("inter-scanner", "inter-staining", "inter-scanner, inter-staining", "all")
LEADERBOARD_PARTS: tuple[tuple[str, str], ...] = (
    ("all", "cosine_similarity"),
    ("inter-scanner", "top_10_accuracy"),
    ("inter-staining", "top_10_accuracy"),
    ("inter-scanner, inter-staining", "top_10_accuracy"),
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
# Similarities within this distance of the partner's count as tied (a few ulps of cosines in [-1, 1]).
TIE_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DEFAULT_CHUNK = 2048


def metric_names(topk: Sequence[int] = DEFAULT_TOPK) -> list[str]:
    """Column names of the per-pair metrics: ``cosine_similarity``, ``top_{k}_accuracy``..."""
    return ["cosine_similarity"] + [f"top_{k}_accuracy" for k in topk]


def normalize_rows(x: np.ndarray | torch.Tensor, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """Features ``(n, d)`` -> unit rows ``(n, d)`` in ``dtype`` on ``device`` (normalised in
    float32 or better, then cast). Zero rows stay zero (cosine 0 with everything)."""
    t = torch.as_tensor(np.ascontiguousarray(x)) if not torch.is_tensor(x) else x
    work = torch.float64 if dtype == torch.float64 else torch.float32
    t = t.to(device=device, dtype=work)
    return F.normalize(t, dim=1, eps=1e-12).to(dtype)


def slide_topk(xn: torch.Tensor, kmax: int, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Each row's ``kmax`` largest within-slide cosines, self excluded.

    ``xn`` unit rows ``(n, d)`` -> ``(n, kmax)`` float32, descending, padded with ``-inf`` when
    ``n - 1 < kmax``. Computed in row chunks: memory O(chunk · n)."""
    n = xn.shape[0]
    out = torch.full((n, kmax), float("-inf"), dtype=torch.float32, device=xn.device)
    keep = min(kmax, n - 1)
    if keep <= 0:
        return out
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        sims = (xn[r0:r1] @ xn.T).float()
        rows = torch.arange(r1 - r0, device=xn.device)
        sims[rows, rows + r0] = float("-inf")
        out[r0:r1, :keep] = sims.topk(keep, dim=1).values
    return out


@dataclass
class PairMetrics:
    """Metrics of one slide pair, plus the per-tile values they average (for bootstraps).

    ``tile_cosine`` ``(n,)``: cos(A_i, B_i); ``tile_hits[k]`` ``(n,)``: mean of the A_i→B and
    B_i→A hits (fractional under ties)."""

    cosine_similarity: float
    topk_accuracy: dict[int, float]
    tile_cosine: np.ndarray
    tile_hits: dict[int, np.ndarray]

    def as_dict(self) -> dict[str, float]:
        out = {"cosine_similarity": self.cosine_similarity}
        out.update({f"top_{k}_accuracy": v for k, v in self.topk_accuracy.items()})
        return out


def _competitors_within(x: torch.Tensor, top: torch.Tensor, partner: torch.Tensor, tol: float,
                        chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Within-slide competitors of each row's partner similarity: (#strictly above, #tied).

    ``x`` unit rows ``(s, n, d)`` of ``s`` slides (``s`` = 1 broadcasts over the pairs),
    ``top`` their :func:`slide_topk` ``(s, n, kmax)``, ``partner`` ``(m, n)``. Uses the stored
    top-``kmax`` values; a row whose last stored value ties the partner (the tie group may
    continue past what is stored) is recounted from its full row."""
    p = partner[..., None]
    greater = (top > p + tol).sum(-1).float()  # (m, n)
    tied = ((top - p).abs() <= tol).sum(-1).float()
    n, kmax = top.shape[-2:]
    if kmax < n - 1:
        unsure = ((top[..., -1] - partner).abs() <= tol).nonzero()  # (u, 2): pair, row
        for c0 in range(0, len(unsure), chunk):
            pair, rows = unsure[c0:c0 + chunk].unbind(1)
            slide = pair if x.shape[0] > 1 else torch.zeros_like(pair)
            sims = torch.einsum("ud,und->un", x[slide, rows], x[slide]).float()
            sims[torch.arange(len(rows), device=x.device), rows] = float("nan")  # self: never counted
            d = sims - partner[pair, rows, None]
            greater[pair, rows] = (d > tol).sum(1).float()
            tied[pair, rows] = (d.abs() <= tol).sum(1).float()
    return greater, tied


def _count(mask: torch.Tensor, dim: int) -> torch.Tensor:
    # bool -> int64 sums are slow on CPU; uint8 summed into int32 is exact here (n < 2**31)
    return mask.view(torch.uint8).sum(dim, dtype=torch.int32)


def pair_metrics_batch(an: torch.Tensor, bns: torch.Tensor, top_a: torch.Tensor, tops_b: torch.Tensor,
                       topk: Sequence[int] = DEFAULT_TOPK, chunk: int = DEFAULT_CHUNK,
                       tie_tol: float | None = None) -> list[PairMetrics]:
    """Cosine similarity and top-k accuracies of the pairs (A, B_j), j < m (see the module doc).

    Args:
        an: unit rows ``(n, d)`` of slide A (:func:`normalize_rows`).
        bns: unit rows ``(m, n, d)`` of m partner slides, same device/dtype; row i of every
            slide at the same tile location.
        top_a, tops_b: :func:`slide_topk` of A ``(n, kmax)`` and of each B ``(m, n, kmax)``,
            ``kmax >= max(topk)``.
        topk: the k values.
        chunk: rows of A per cross-block step (memory O(m · chunk · n)).
        tie_tol: similarity tolerance for ties (default: :data:`TIE_TOL` of the dtype).
    """
    m, n = bns.shape[:2]
    if an.shape[0] != n:
        raise ValueError(f"number of tiles must match: {an.shape[0]} and {n}")
    if top_a.shape[-1] < max(topk) or tops_b.shape[-1] < max(topk):
        raise ValueError(f"slide_topk kept {min(top_a.shape[-1], tops_b.shape[-1])} values; need max(topk)={max(topk)}")
    tol = TIE_TOL[an.dtype] if tie_tol is None else tie_tol
    dev = an.device
    partner = (an[None] * bns).float().sum(-1)  # (m, n): cos(A_i, B_j,i)
    greater_a = torch.zeros(m, n, device=dev)  # A_i queries: competitors in B (cross block rows)
    tied_a = torch.zeros(m, n, device=dev)
    greater_b = torch.zeros(m, n, device=dev)  # B_i queries: competitors in A (cross block columns)
    tied_b = torch.zeros(m, n, device=dev)
    hi, lo = partner + tol, partner - tol
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        cross = torch.matmul(an[r0:r1], bns.transpose(1, 2)).float()  # (m, c, n)
        rows = torch.arange(r1 - r0, device=dev)
        cross[:, rows, rows + r0] = float("nan")  # the partner itself is not a competitor
        # strictly above = cross > p + tol; tied = (cross >= p - tol) - strictly above
        above_a = _count(cross > hi[:, r0:r1, None], 2)
        greater_a[:, r0:r1] += above_a
        tied_a[:, r0:r1] += _count(cross >= lo[:, r0:r1, None], 2) - above_a
        above_b = _count(cross > hi[:, None, :], 1)
        greater_b += above_b
        tied_b += _count(cross >= lo[:, None, :], 1) - above_b
    ga, ta = _competitors_within(an[None], top_a[None], partner, tol, chunk)
    gb, tb = _competitors_within(bns, tops_b, partner, tol, chunk)
    greater_a, tied_a, greater_b, tied_b = ((t + u).double().cpu() for t, u in
                                            ((greater_a, ga), (tied_a, ta), (greater_b, gb), (tied_b, tb)))
    tile_cos = partner.double().cpu().numpy()
    hits = {}
    for k in topk:
        hit_a = ((k - greater_a) / (tied_a + 1)).clamp_(0, 1)
        hit_b = ((k - greater_b) / (tied_b + 1)).clamp_(0, 1)
        hits[k] = ((hit_a + hit_b) / 2).numpy()  # (m, n)
    return [PairMetrics(float(tile_cos[j].mean()), {k: float(hits[k][j].mean()) for k in topk}, tile_cos[j],
                        {k: hits[k][j] for k in topk}) for j in range(m)]


def pair_metrics(an: torch.Tensor, bn: torch.Tensor, top_a: torch.Tensor, top_b: torch.Tensor,
                 topk: Sequence[int] = DEFAULT_TOPK, chunk: int = DEFAULT_CHUNK,
                 tie_tol: float | None = None) -> PairMetrics:
    """One pair: :func:`pair_metrics_batch` with ``bn`` ``(n, d)`` and ``top_b`` ``(n, kmax)``."""
    return pair_metrics_batch(an, bn[None], top_a, top_b[None], topk, chunk, tie_tol)[0]


def pair_metrics_from_features(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor,
                               topk: Sequence[int] = DEFAULT_TOPK, dtype: torch.dtype = torch.float32,
                               device: str | torch.device = "cpu", chunk: int = DEFAULT_CHUNK) -> PairMetrics:
    """Convenience for one pair of raw feature matrices ``(n, d)`` (normalises, builds the
    within-slide structures, evaluates)."""
    an, bn = normalize_rows(a, dtype, device), normalize_rows(b, dtype, device)
    kmax = max(topk)
    return pair_metrics(an, bn, slide_topk(an, kmax, chunk), slide_topk(bn, kmax, chunk), topk, chunk)


# -- groups and aggregation ----------------------------------------------------------------
def pair_group(staining_a: str, scanner_a: str, staining_b: str, scanner_b: str) -> str:
    """plismbench's robustness type of a pair: same staining -> ``inter-scanner``; same
    scanner -> ``inter-staining``; both differ -> ``inter-scanner, inter-staining``."""
    if staining_a == staining_b and scanner_a == scanner_b:
        raise ValueError(f"a pair of the same staining and scanner ({staining_a}, {scanner_a}) has no group")
    if staining_a == staining_b:
        return "inter-scanner"
    if scanner_a == scanner_b:
        return "inter-staining"
    return "inter-scanner, inter-staining"


def aggregate(values: np.ndarray | Sequence[float]) -> dict[str, float]:
    """``(m,)`` -> mean, std (population, ``np.std``), median, IQR (75th − 25th percentile,
    linear interpolation), as plismbench ``utils/aggregate.py``. NaN for an empty group."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "median": float("nan"), "iqr": float("nan")}
    return {"mean": float(np.mean(x)), "std": float(np.std(x)), "median": float(np.median(x)),
            "iqr": float(np.quantile(x, 0.75) - np.quantile(x, 0.25))}


def group_masks(groups: Sequence[str]) -> dict[str, np.ndarray]:
    """Pair group labels ``(m,)`` -> boolean mask per entry of :data:`GROUPS` (``all``: every pair)."""
    g = np.asarray(groups, dtype=object)
    return {name: (np.ones(len(g), bool) if name == "all" else g == name) for name in GROUPS}


def group_aggregates(groups: Sequence[str], metrics: Mapping[str, np.ndarray]) -> dict[str, dict[str, dict[str, float]]]:
    """Per-pair metrics ``{name: (m,)}`` and group labels ``(m,)`` -> ``{group: {metric: aggregate}}``."""
    masks = group_masks(groups)
    return {grp: {name: aggregate(np.asarray(vals)[mask]) for name, vals in metrics.items()}
            for grp, mask in masks.items()}


def _reference_round(x: float) -> float:
    # pandas DataFrame.round(3) -> numpy.round (round half to even on the scaled binary value)
    return float(np.round(x, 3))


def format_cell(agg: Mapping[str, float]) -> str:
    """``"mean (std) ; median (iqr)"`` exactly as plismbench ``format_results``: values rounded
    to 3 decimals, ``str()``-ed and right-padded with ``0`` to 5 characters. ``"empty"`` when the
    group has no pairs."""
    if any(np.isnan(agg[k]) for k in ("mean", "std", "median", "iqr")):
        return "empty"

    def pad(v: float) -> str:
        return str(_reference_round(v)).ljust(5, "0")

    return f"{pad(agg['mean'])} ({pad(agg['std'])}) ; {pad(agg['median'])} ({pad(agg['iqr'])})"


def leaderboard_metric(aggregates: Mapping[str, Mapping[str, Mapping[str, float]]], rounded: bool = True) -> float:
    """Mean of the four medians: cosine (all), top-10 (inter-scanner), top-10 (inter-staining),
    top-10 (both differ). ``rounded``: each median rounded to 3 decimals first, as the
    reference's results table does. NaN when a part is missing or empty."""
    parts = []
    for group, metric in LEADERBOARD_PARTS:
        try:
            value = aggregates[group][metric]["median"]
        except KeyError:
            return float("nan")
        parts.append(_reference_round(value) if rounded else value)
    return float(np.mean(parts))


# -- bootstrap over tiles --------------------------------------------------------------------
def bootstrap_weights(n_tiles: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """``(n_boot, n_tiles)`` float32 resampling counts (tiles drawn with replacement), shared
    by all pairs so one replicate resamples the same tile locations in every pair."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_tiles, size=(n_boot, n_tiles))
    weights = np.zeros((n_boot, n_tiles), np.float32)
    for b in range(n_boot):
        weights[b] = np.bincount(idx[b], minlength=n_tiles)
    return weights


def bootstrap_means(weights: np.ndarray, per_tile: np.ndarray) -> np.ndarray:
    """Resampled means ``(n_boot,)`` of per-tile values ``(n,)`` under ``weights`` ``(n_boot, n)``."""
    return (weights.astype(np.float64) @ np.asarray(per_tile, np.float64)) / weights.shape[1]


def bootstrap_leaderboard(groups: Sequence[str], cosine_boot: np.ndarray, top10_boot: np.ndarray,
                          level: float = 0.95) -> dict[str, float]:
    """Percentile interval of the (unrounded) leaderboard metric over tile bootstrap replicates.

    ``cosine_boot``, ``top10_boot``: ``(m pairs, n_boot)`` per-pair resampled metrics."""
    masks = group_masks(groups)
    parts = [np.median((cosine_boot if metric == "cosine_similarity" else top10_boot)[masks[group]], axis=0)
             if masks[group].any() else np.full(cosine_boot.shape[1], np.nan)
             for group, metric in LEADERBOARD_PARTS]
    values = np.mean(parts, axis=0)
    alpha = (1 - level) / 2
    return {"low": float(np.quantile(values, alpha)), "high": float(np.quantile(values, 1 - alpha)),
            "std": float(np.std(values)), "n_boot": int(values.size), "level": level}


# -- leakage probes ------------------------------------------------------------------------------
def normalized_balanced_accuracy(balanced_accuracy: float, n_classes: int) -> float:
    """``(bacc − 1/C) / (1 − 1/C)``: 0 = chance, 1 = perfect."""
    chance = 1.0 / n_classes
    return (balanced_accuracy - chance) / (1 - chance)
