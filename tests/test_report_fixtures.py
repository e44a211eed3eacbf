"""A fixture results database with the names the suites record (shared by the report tests)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from pathrobust.store import ResultsDB, RunRecord

XSS = "<script>alert(1)</script>"
STAININGS = ["GIV", "GM", "GMH", "HR"]
SCANNERS = ["AT2", "GT450", "S60"]
ENV = {"pathrobust": "0.1.0", "torch": "2.14.1", "timm": "1.0.31", "device": "cpu (2 cores)"}


def _plism_metrics(lb: float) -> dict[str, float]:
    """Four medians whose mean is ``lb`` (+ per-group stats and a CI), as the plism suite records."""
    cos, sc, st, both = lb + 0.25, lb + 0.2, lb - 0.2, lb - 0.25
    m = {"leaderboard": (cos + sc + st + both) / 4, "cosine_all_median": cos, "top10_inter_scanner_median": sc,
         "top10_inter_staining_median": st, "top10_both_median": both, "lb_ci_low": lb - 0.01, "lb_ci_high": lb + 0.01}
    m["leaderboard_rounded"] = round(sum(round(v, 3) for v in (cos, sc, st, both)) / 4, 3)
    for metric, base in (("cosine", cos), ("top10", sc)):
        for k, group in enumerate(("all", "inter_scanner", "inter_staining", "both")):
            value = base - 0.05 * k
            m.update({f"{metric}_{group}_mean": value, f"{metric}_{group}_std": 0.02,
                      f"{metric}_{group}_median": value, f"{metric}_{group}_iqr": 0.04})
    return m


def _write_pair_csv(run_dir: Path, quality: float) -> None:
    """The plism run dir's per-pair metrics.csv (for the staining x scanner heatmaps)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    slides = list(itertools.product(STAININGS, SCANNERS))
    rng = np.random.default_rng(0)
    lines = ["slide_a,slide_b,staining_a,scanner_a,staining_b,scanner_b,group,cosine_similarity,top_1_accuracy,top_10_accuracy"]
    for (sa, ca), (sb, cb) in itertools.combinations(slides, 2):
        group = ("inter-scanner" if sa == sb else "inter-staining" if ca == cb else "inter-scanner, inter-staining")
        penalty = 0.1 * (sa != sb) + 0.05 * (ca != cb) + 0.1 * (ca == "AT2" or cb == "AT2")
        cos, top10 = quality - penalty + rng.normal(0, 0.01), quality - 1.5 * penalty
        lines.append(f"{sa}_{ca},{sb}_{cb},{sa},{ca},{sb},{cb},\"{group}\",{cos:.4f},{top10 / 2:.4f},{top10:.4f}")
    (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")


def fixture_records(run_root: Path | None = None) -> list[RunRecord]:
    """Runs covering: distinct pooling/precision rows, a superseded run, a protocol variant,
    a model name that is markup, missing metrics, all three suites."""
    recs: list[RunRecord] = []

    def plism(run_id, model, lb, pooling="cls", precision="fp32", when="2025-01-02T00:00:00+00:00", params=None,
              tiles=None, metrics=None):
        run_dir = str(run_root / "plism" / run_id) if run_root else ""
        if run_root:
            _write_pair_csv(Path(run_dir), 0.4 + lb)
        recs.append(RunRecord(suite="plism", model=model, run_id=run_id, pooling=pooling, precision=precision,
                              input_size=224, params=params, metrics=metrics or _plism_metrics(lb),
                              spec_hash="spec-" + model[:4], data_fingerprint="plismfp0123456789",
                              options={"tile_subset": 8139}, timings={"wall_s": 12.5, **({"tiles_per_s": tiles} if tiles else {})},
                              environment=ENV, run_dir=run_dir, created_at=when))

    plism("p-old", "h0-mini", 0.30, when="2025-01-01T00:00:00+00:00", params=86_000_000)  # superseded
    plism("p1", "h0-mini", 0.52, params=86_000_000, tiles=270.0)
    plism("p2", "h0-mini", 0.5456, pooling="cls+mean", params=86_000_000, tiles=250.0)
    plism("p3", "h0-mini", 0.51, precision="bf16", params=86_000_000, tiles=900.0)
    plism("p4", "efficientnet-lite0-imagenet", 0.21, params=3_400_000, tiles=1500.0)
    plism("p5", XSS, 0.11, pooling="mean", params=1_000)
    plism("p6", "hed-histogram", 0.0, metrics={"cosine_all_median": 0.99})  # no leaderboard metric recorded

    def tasks(suite, run_id, model, scores, metric, pooling="cls", options=None, when="2025-01-03T00:00:00+00:00",
              params=None, tiles=None):
        for task, (mean, std) in scores.items():
            recs.append(RunRecord(suite=suite, task=task, model=model, run_id=f"{run_id}:{task}", pooling=pooling,
                                  precision="fp32", input_size=224, params=params,
                                  metrics={f"{metric}_mean": mean, **({f"{metric}_std": std} if std is not None else {})},
                                  data_fingerprint=f"{suite}fp", options=options or {},
                                  timings={"wall_s": 30.0, **({"tiles_per_s": tiles} if tiles else {})},
                                  environment=ENV, run_dir=f"/runs/{suite}/{run_id}", created_at=when))

    tasks("hest", "h1", "h0-mini", {"IDC": (0.59, 0.01), "LUNG": (0.55, 0.02), "average": (0.57, None)}, "pearson",
          params=86_000_000, tiles=260.0, options={"alpha": "fixed", "pca": 256})
    tasks("hest", "h2", "h0-mini", {"IDC": (0.61, 0.01), "LUNG": (0.56, 0.02), "average": (0.585, None)}, "pearson",
          params=86_000_000, options={"alpha": "cv", "pca": 256})
    tasks("hest", "h3", "efficientnet-lite0-imagenet", {"IDC": (0.45, 0.03), "LUNG": (0.40, 0.01),
                                                        "average": (0.425, None)}, "pearson",
          params=3_400_000, options={"alpha": "fixed", "pca": 256})
    tasks("eva", "e1", "h0-mini", {"bach": (0.70, 0.02), "crc": (0.95, 0.01), "pcam": (0.90, 0.01),
                                   "average": (0.925, 0.01)}, "balanced_accuracy", params=86_000_000)
    tasks("eva", "e2", "efficientnet-lite0-imagenet", {"bach": (0.60, 0.02), "crc": (0.90, 0.02),
                                                       "pcam": (0.80, 0.03)}, "balanced_accuracy", params=3_400_000)
    tasks("eva", "e3", XSS, {"crc": (0.5, None), "average": (0.5, None)}, "balanced_accuracy", pooling="mean")
    return recs


def fixture_db(path: Path, run_root: Path | None = None) -> Path:
    db = ResultsDB(path)
    for rec in fixture_records(run_root):
        db.record(rec)
    return path
