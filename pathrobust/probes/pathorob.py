"""PathoROB evaluation of one dataset's embeddings: robustness index (and its curve, k
selection and croma's variants), clustering score and average performance drop.

This composes :mod:`pathrobust.metrics.pathorob` (nothing trained) and
:mod:`pathrobust.probes.pathorob_apd` (logistic-regression probes). The protocol's numbers
(k, designs, seeds, grids, split schedules) come in as :class:`PathorobParams`, built from the
suite TOML by :meth:`PathorobParams.from_mapping`; the rows of each metric come in as the long
view table of :mod:`pathrobust.data.pathorob` (:data:`~pathrobust.data.pathorob.VIEW_COLUMNS`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from pathrobust.data.pathorob import VIEW_COLUMNS
from pathrobust.errors import UserError
from pathrobust.metrics import pathorob as M
from pathrobust.probes.pathorob_apd import ApdDesign, ApdResult, run_apd

REFERENCE = "bifold-pathomics/PathoROB@46594e9"


@dataclass(frozen=True)
class ClusteringParams:
    k_min: int = 2
    k_max: int = 30
    fixed_k: int | None = None
    silhouette_seed: int = 1337
    silhouette_n_init: int = 20
    trials: int = 50
    trial_seed: int = 1337
    trial_n_init: int = 5


@dataclass(frozen=True)
class PathorobParams:
    """One dataset's protocol (see the proposed ``suites/pathorob.toml``).

    ``k``: headline k; ``design``: ``plain``/``paired``; ``curve_k_max``: RI(k) for k up to
    this; ``select_k``: choose k by k-NN balanced accuracy over PathoROB's grid below
    ``k_grid_max`` (a labelled variant; the reference reports the default k); ``variants``:
    ``mari``/``croma``; ``clustering``/``apd``: None to skip."""

    k: int
    design: str = "plain"
    curve_k_max: int = 0
    select_k: bool = False
    k_grid_max: int = 600
    exact_curve: bool = False
    variants: tuple[str, ...] = ()
    mari_tau: float | None = None
    croma_m: int = 5
    croma_alpha: float = 0.10
    clustering: ClusteringParams | None = ClusteringParams()
    apd: ApdDesign | None = None
    device: str = "cpu"
    chunk: int | None = None

    @classmethod
    def from_mapping(cls, d: Mapping, source: str = "pathorob", search: Sequence = ()) -> "PathorobParams":
        """From one ``[datasets.<name>]`` TOML table (sub-tables ``ri``, ``clustering``, ``apd``;
        other keys, such as ``views``, belong to the reader). ``search``: folders where a
        ``case_splits`` file named in ``[apd]`` is looked up (the PathoROB metadata folder)."""
        ri = dict(d.get("ri", {}))
        if "k" not in ri:
            raise UserError(f"{source}: [ri] needs k")
        known = {"k", "design", "curve_k_max", "select_k", "k_grid_max", "exact_curve", "variants", "mari_tau",
                 "croma_m", "croma_alpha"}
        extra = set(ri) - known
        if extra:
            raise UserError(f"{source}: [ri] has unknown key(s) {', '.join(sorted(extra))}")
        clustering = d.get("clustering")
        if clustering is not None and clustering.get("enabled", True):
            fields = {k: v for k, v in clustering.items() if k != "enabled"}
            extra = set(fields) - set(ClusteringParams.__dataclass_fields__)
            if extra:
                raise UserError(f"{source}: [clustering] has unknown key(s) {', '.join(sorted(extra))}")
            clustering = ClusteringParams(**fields)
        else:
            clustering = None
        apd = d.get("apd")
        apd = (ApdDesign.from_mapping({k: v for k, v in apd.items() if k != "enabled"}, f"{source}.apd", search)
               if apd is not None and apd.get("enabled", True) else None)
        ri["variants"] = tuple(ri.get("variants", ()))
        return cls(clustering=clustering, apd=apd, **ri)


@dataclass
class PathorobResult:
    dataset: str
    params: PathorobParams
    robustness: M.RobustnessResult
    clustering: M.ClusteringResult | None = None
    apd: ApdResult | None = None
    sources: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """Headline numbers: RI at k (its k and how it was chosen), pooled counts, variants,
        clustering score ± mean trial std, APD in/out of domain."""
        r = self.robustness
        out = {"dataset": self.dataset, "design": self.params.design, "k": r.k, "k_source": r.k_source,
               "robustness_index": r.ri, **{f"count_{t}": v for t, v in r.counts.items()},
               "queries": int(len(r.per_query))}
        for name, v in r.variants.items():
            out[name] = v["value"]
            out[f"{name}_definition"] = v["definition"]
            if name == "MaRI":
                out["MaRI_tau"] = v["tau"]
            if name == "CRoMa":
                out["CRoMa_ltm"], out["CRoMa_f0"] = v["ltm"], v["f0"]
        if self.clustering is not None:
            out["clustering_score"] = self.clustering.score
            out["clustering_score_std"] = self.clustering.spread
            out["clustering_K"] = [int(k) for k in self.clustering.combinations["K"]]
        if self.apd is not None:
            out["apd_id"], out["apd_ood"] = self.apd.apd_id, self.apd.apd_ood
            out["apd_not_converged_fits"] = self.apd.not_converged
        return out

    def tables(self) -> dict[str, pd.DataFrame]:
        """Per-item tables for the run directory."""
        r = self.robustness
        out = {"ri_curve": r.curve, "ri_per_query": r.per_query, "ri_per_subset": r.per_subset}
        if r.k_selection is not None:
            out["k_selection"] = r.k_selection
        if "CRoMa" in r.variants:
            out["croma_per_query"] = r.variants["CRoMa"]["per_query"]
        if self.clustering is not None:
            out["clustering_combinations"] = self.clustering.combinations
            out["clustering_trials"] = self.clustering.trials
            out["clustering_silhouette"] = self.clustering.silhouette
        if self.apd is not None:
            out["apd_splits"] = self.apd.split_table()
            s, it = self.apd.id_accuracy.shape
            out["apd_accuracies"] = pd.DataFrame({
                "split": np.repeat(np.arange(s), it), "iteration": np.tile(np.arange(it), s),
                "id_accuracy": self.apd.id_accuracy.ravel(), "ood_accuracy": self.apd.ood_accuracy.ravel(),
                "C": self.apd.best_c.ravel()})
        return out

    def provenance(self) -> dict:
        p = asdict(self.params)
        if self.params.apd is not None and self.params.apd.case_splits is not None:
            p["apd"]["case_splits"] = "given"
        labels = {"robustness_index": f"{REFERENCE} (robustness_index)",
                  "clustering_score": f"{REFERENCE} (clustering_score)", "apd": f"{REFERENCE} (apd)"}
        if self.robustness.k_source == "selected":
            labels["k"] = "selected by k-NN balanced accuracy over PathoROB's grid (variant; reference: default k)"
        for name in self.robustness.variants:
            labels[name] = M.CROMA_LABEL
        if self.apd is not None:
            labels["apd_test_case_order"] = self.apd.provenance.get("test_case_order")
        return {"params": p, "definitions": labels, "sources": self.sources}


def check_view_table(meta: pd.DataFrame, source: str) -> None:
    missing = [c for c in VIEW_COLUMNS if c not in meta.columns]
    if missing:
        raise UserError(f"{source}: missing column(s) {', '.join(missing)} (expected {', '.join(VIEW_COLUMNS)})")


def check_rows(embeddings: np.ndarray, rows: np.ndarray, source: str) -> None:
    """One-line UserError for rows out of range or with NaN/inf/all-zero embeddings."""
    if embeddings.ndim != 2:
        raise UserError(f"{source}: embeddings must be (n, d), got shape {embeddings.shape}")
    if len(rows) and (rows.min() < 0 or rows.max() >= len(embeddings)):
        raise UserError(f"{source}: row {int(rows.max())} is outside the {len(embeddings)} embeddings")
    x = embeddings[rows]
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise UserError(f"{source}: the embedding of row {int(rows[np.argmax(bad)])} contains NaN or inf")
    zero = ~(x != 0).any(axis=1)
    if zero.any():
        raise UserError(f"{source}: the embedding of row {int(rows[np.argmax(zero)])} is all zeros (no direction)")


def evaluate_pathorob(embeddings: np.ndarray, meta: pd.DataFrame, dataset: str, params: PathorobParams,
                      progress: Callable[[str], None] | None = None) -> PathorobResult:
    """Every PathoROB metric of one dataset.

    Args:
        embeddings: raw features ``(n, d)`` of the dataset's tiles (float32 as extracted, or
            float64); ``meta["row"]`` indexes them.
        meta: the long view table (``view`` in ``ri``/``apd``/``clustering``, ``subset``,
            ``row``, ``slide_id``, ``patch_id``, ``biological_class``, ``medical_center``).
        dataset: its name (labels messages and results).
        params: the protocol.
        progress: optional callable receiving a short stage name.
    """
    embeddings = np.asarray(embeddings)
    check_view_table(meta, dataset)
    check_rows(embeddings, np.unique(meta["row"].to_numpy(np.int64)), f"{dataset} embeddings")
    say = progress or (lambda stage: None)
    ri_rows = meta[meta["view"] == "ri"].reset_index(drop=True)
    if ri_rows.empty:
        raise UserError(f"{dataset}: no RI rows (view 'ri')")
    say("robustness index")
    rob = M.robustness(embeddings, ri_rows, params.design, params.k, curve_k_max=params.curve_k_max,
                       select_k_max=params.k_grid_max if params.select_k else None, exact_curve=params.exact_curve,
                       variants=params.variants, mari_tau=params.mari_tau, croma_m=params.croma_m,
                       croma_alpha=params.croma_alpha, device=params.device, chunk=params.chunk,
                       source=f"{dataset} RI rows")
    result = PathorobResult(dataset, params, rob)
    if params.clustering is not None:
        rows = meta[meta["view"] == "clustering"].reset_index(drop=True)
        if rows.empty:
            raise UserError(f"{dataset}: no clustering rows (view 'clustering'); disable clustering or add them")
        say("clustering score")
        c = params.clustering
        result.clustering = M.clustering_score(embeddings, rows, k_min=c.k_min, k_max=c.k_max, fixed_k=c.fixed_k,
                                               silhouette_seed=c.silhouette_seed, silhouette_n_init=c.silhouette_n_init,
                                               trials=c.trials, trial_seed=c.trial_seed, trial_n_init=c.trial_n_init,
                                               source=f"{dataset} clustering rows")
    if params.apd is not None:
        rows = meta[meta["view"] == "apd"].reset_index(drop=True)
        if rows.empty:
            raise UserError(f"{dataset}: no APD rows (view 'apd'); disable APD or add them")
        say("average performance drop")
        result.apd = run_apd(embeddings, rows, params.apd, source=f"{dataset} APD rows")
    return result


def aggregate(results: Mapping[str, PathorobResult], quantile: float = 0.975) -> dict:
    """Across datasets: mean RI (PathoROB's leaderboard average), mean clustering score, and
    APD as PathoROB's corrected mean ± t·sem over all per-iteration scores (ID and OOD)."""
    out: dict = {"datasets": list(results), "robustness_index": float(np.mean([r.robustness.ri for r in results.values()]))}
    clus = [r.clustering.score for r in results.values() if r.clustering is not None]
    if clus:
        out["clustering_score"] = float(np.mean(clus))
    apds = {n: r.apd for n, r in results.items() if r.apd is not None}
    if apds:
        for dom, attr in (("id", "per_iteration_id"), ("ood", "per_iteration_ood")):
            mean, half = M.corrected_mean_ci({n: getattr(a, attr) for n, a in apds.items()}, quantile)
            out[f"apd_{dom}"], out[f"apd_{dom}_ci"] = mean, half
    return out
