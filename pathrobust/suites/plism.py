"""The PLISM robustness suite: plismbench's protocol, fast and resumable, plus extras.

``run_plism(...)``: features (extracted with the shared extractor into a cache under the
output dir, or read from ``--features`` in plismbench's layout) -> per-pair metrics for all
C(slides, 2) pairs (:mod:`pathrobust.metrics.plism`) -> the run directory:

* ``metrics.csv`` — one row per pair (slides, staining/scanner of each, group, metrics);
* ``results.csv`` — groups × metrics as ``"mean (std) ; median (iqr)"`` (plismbench's table);
* ``summary.json`` — every unrounded aggregate, the leaderboard metric (rounded as the
  reference and unrounded), its bootstrap interval, leakage probes, provenance;
* ``heatmap_staining.png`` / ``heatmap_scanner.png`` (+ CSVs) — staining × staining and
  scanner × scanner means of cosine and top-10 (pathrobust's own).

Resumable per pair: each finished pair is appended to ``pairs.jsonl`` (its bootstrap
replicates to ``pairs_bootstrap.npy``) before the next starts; a rerun skips finished pairs.
Memory: two slides, one chunk of the cross block, and at most ``resident_features_gib`` of
resident slides — not growing with the number of slides.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
import tomllib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pathrobust.data import plism as pdata
from pathrobust.errors import UserError
from pathrobust.metrics import plism as pm
from pathrobust.store import safe_name
from pathrobust.suites.base import SuiteRun, encoder_record_fields

CONFIG_FILE = Path(__file__).resolve().parents[1] / "configs" / "suites" / "plism.toml"
SUITE = "plism"
PAIRS_FILE = "pairs.jsonl"
BOOT_FILE = "pairs_bootstrap.npy"
BATCH_ELEMENTS = 2**24  # cross-block elements per call when several small pairs are batched


def load_protocol(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The suite TOML (protocol parameters)."""
    path = Path(path) if path else CONFIG_FILE
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"{path}: cannot read suite config ({exc})") from None


@dataclass
class PlismOptions:
    """How one evaluation runs (defaults from the suite TOML)."""

    topk: tuple[int, ...] = pm.DEFAULT_TOPK
    metric_precision: str = "fp32"
    device: str = "auto"
    chunk_rows: int = pm.DEFAULT_CHUNK
    resident_gib: float = 4.0
    bootstrap: int = 200
    bootstrap_level: float = 0.95
    bootstrap_seed: int = 0
    probes: bool = True
    probe: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_protocol(cls, protocol: dict[str, Any], **overrides: Any) -> PlismOptions:
        p, b, pr = protocol.get("protocol", {}), protocol.get("bootstrap", {}), protocol.get("probes", {})
        opts = cls(topk=tuple(p.get("topk", pm.DEFAULT_TOPK)), metric_precision=p.get("metric_precision", "fp32"),
                   chunk_rows=int(p.get("chunk_rows", pm.DEFAULT_CHUNK)),
                   resident_gib=float(protocol.get("memory", {}).get("resident_features_gib", 4.0)),
                   bootstrap=int(b.get("replicates", 200)), bootstrap_level=float(b.get("level", 0.95)),
                   bootstrap_seed=int(b.get("seed", 0)), probes=bool(pr.get("enabled", True)),
                   probe={k: pr[k] for k in ("max_positions", "folds", "pca_dim", "alpha", "seed") if k in pr})
        for key, value in overrides.items():
            if value is not None:
                setattr(opts, key, value)
        if not opts.topk or min(opts.topk) < 1:
            raise UserError(f"--topk {','.join(map(str, opts.topk))}: k values must be >= 1")
        opts.topk = tuple(sorted(set(int(k) for k in opts.topk)))
        if opts.metric_precision not in pm.DTYPES:
            raise UserError(f"--metric-precision {opts.metric_precision}: expected one of {', '.join(pm.DTYPES)}")
        if opts.bootstrap < 0:
            raise UserError(f"--bootstrap {opts.bootstrap}: must be >= 0")
        return opts

    def identity(self) -> dict[str, Any]:
        """What changes the numbers (part of the run id); device and memory do not."""
        d = asdict(self)
        for key in ("device", "chunk_rows", "resident_gib"):
            d.pop(key)
        return d


# -- evaluation --------------------------------------------------------------------------------
class _SlideCache:
    """Unit-normalised subset features per slide on the device; the first slides up to a byte
    budget stay resident, the others are re-read when needed (bounded memory)."""

    def __init__(self, features: pdata.FeatureSet, subset: np.ndarray, dtype: torch.dtype, device: torch.device,
                 budget_bytes: float) -> None:
        self.features, self.subset, self.dtype, self.device = features, subset, dtype, device
        self.budget = budget_bytes
        self.used = 0
        self.resident: dict[str, torch.Tensor] = {}
        self.recent: dict[str, torch.Tensor] = {}  # the last two non-resident slides (the pair in hand)
        self.tops: dict[str, torch.Tensor] = {}

    def keep_top(self, slide_id: str, top: torch.Tensor) -> None:
        size = top.numel() * top.element_size()
        if self.used + size <= self.budget:
            self.tops[slide_id] = top
            self.used += size

    def get(self, slide_id: str) -> torch.Tensor:
        if slide_id in self.resident:
            return self.resident[slide_id]
        if slide_id in self.recent:
            return self.recent[slide_id]
        sf = self.features.load(slide_id)
        x = pm.normalize_rows(np.asarray(sf.features[self.subset], dtype=np.float32), self.dtype, self.device)
        size = x.numel() * x.element_size()
        if self.used + size <= self.budget:
            self.resident[slide_id] = x
            self.used += size
        else:
            if len(self.recent) >= 2:
                self.recent.pop(next(iter(self.recent)))
            self.recent[slide_id] = x
        return x


def _slide_meta(slide_id: str) -> tuple[str, str]:
    return pdata.parse_slide_id(slide_id)


def _read_done_pairs(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Finished pairs of an interrupted run; a torn last line (killed mid-write) is dropped
    and the file rewritten without it."""
    if not path.is_file():
        return {}
    done: dict[tuple[str, str], dict[str, Any]] = {}
    good: list[str] = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            done[(row["slide_a"], row["slide_b"])] = row
            good.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(g + "\n" for g in good))
    os.replace(tmp, path)
    return done


def evaluate_features(features: pdata.FeatureSet, out_dir: str | os.PathLike, options: PlismOptions,
                      subset: np.ndarray | None = None, progress: bool = True, log=None) -> dict[str, Any]:
    """Evaluate every slide pair of ``features`` into ``out_dir`` (see the module doc).

    ``subset``: indices into the coordinate-sorted tiles (default all). Returns the summary
    (aggregates, leaderboard, bootstrap, probes) without provenance."""
    from pathrobust.extract import resolve_device
    from pathrobust.progress import tile_progress

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slides = features.slide_ids
    if len(slides) < 2:
        raise UserError(f"features: {len(slides)} slide(s); PLISM pairs need at least 2")
    pdata.warn_partial_grid(slides)
    xy, dim = features.dim_and_tiles()
    subset = np.arange(len(xy)) if subset is None else np.asarray(subset, dtype=np.int64)
    if len(subset) and subset.max() >= len(xy):
        raise UserError(f"tile subset: index {int(subset.max())} out of range for {len(xy)} tiles per slide")
    n = len(subset)
    if n < 2:
        raise UserError(f"tile subset: {n} tile(s); need at least 2")
    device = resolve_device(options.device)
    dtype = pm.DTYPES[options.metric_precision]
    if dtype in (torch.float16,) and device.type == "cpu":
        raise UserError("--metric-precision fp16: needs a GPU; use fp32 or bf16 on CPU")
    kmax = max(options.topk)
    cache = _SlideCache(features, subset, dtype, device, options.resident_gib * 2**30)

    # within-slide structure, once per slide (kept on disk: memory bounded in the slide count)
    topk_dir = out_dir / "slide_topk"
    topk_dir.mkdir(exist_ok=True)

    def slide_top(slide_id: str) -> torch.Tensor:
        if slide_id in cache.tops:
            return cache.tops[slide_id]
        path = topk_dir / f"{slide_id}.k{kmax}.npy"
        if path.is_file():
            top = torch.from_numpy(np.load(path)).to(device)
        else:
            top = pm.slide_topk(cache.get(slide_id), kmax, options.chunk_rows)
            tmp = path.with_name(path.name + ".tmp.npy")
            np.save(tmp, top.cpu().numpy())
            os.replace(tmp, path)
        cache.keep_top(slide_id, top)
        return top

    pairs = list(itertools.combinations(slides, 2))
    pairs_path = out_dir / PAIRS_FILE
    done = _read_done_pairs(pairs_path)
    n_boot = options.bootstrap
    if n_boot and done and not (out_dir / BOOT_FILE).is_file():
        done = {}  # bootstrap replicates of the finished pairs are gone: start over
    weights = pm.bootstrap_weights(n, n_boot, options.bootstrap_seed) if n_boot else None
    boot_path = out_dir / BOOT_FILE
    boot = None
    if n_boot:
        shape = (len(pairs), 2, n_boot)
        if boot_path.is_file() and done:
            boot = np.load(boot_path, mmap_mode="r+")
            if boot.shape != shape:
                raise UserError(f"{boot_path}: shape {boot.shape} does not match this run {shape}; remove the run dir")
        else:
            boot = np.lib.format.open_memmap(boot_path, mode="w+", dtype=np.float32, shape=shape)
    todo = [(i, a, b) for i, (a, b) in enumerate(pairs) if (a, b) not in done]
    if log:
        log.info("plism: %d slides, %d tiles, dim %d, %d pairs (%d finished)", len(slides), n, dim, len(pairs), len(done))
    last_sync = time.monotonic()

    def sync(fh) -> None:
        # a killed process loses nothing written (page cache); fsync/msync guard against power loss
        fh.flush()
        os.fsync(fh.fileno())
        if boot is not None:
            boot.flush()

    with open(pairs_path, "a") as fh, tile_progress("plism pairs", total=len(pairs), completed=len(done),
                                                    unit="pairs", enabled=progress) as advance:
        # small slides: several partners per call (bounded: m·n·max(n, d) <= BATCH_ELEMENTS)
        per_call = max(1, BATCH_ELEMENTS // (n * max(n, dim)))
        for a, group in itertools.groupby(todo, key=lambda t: t[1]):
            group = list(group)
            for g0 in range(0, len(group), per_call):
                batch = group[g0:g0 + per_call]
                xb = torch.stack([cache.get(b) for _, _, b in batch])
                tb = torch.stack([slide_top(b) for _, _, b in batch])
                results = pm.pair_metrics_batch(cache.get(a), xb, slide_top(a), tb, options.topk, options.chunk_rows)
                del xb, tb
                for (i, _, b), res in zip(batch, results):
                    if boot is not None:
                        boot[i, 0] = pm.bootstrap_means(weights, res.tile_cosine)
                        boot[i, 1] = pm.bootstrap_means(weights, res.tile_hits[10]) if 10 in options.topk else np.nan
                    st_a, sc_a = _slide_meta(a)
                    st_b, sc_b = _slide_meta(b)
                    row = {"slide_a": a, "slide_b": b, "staining_a": st_a, "scanner_a": sc_a, "staining_b": st_b,
                           "scanner_b": sc_b, "group": pm.pair_group(st_a, sc_a, st_b, sc_b), "n_tiles": n,
                           **res.as_dict()}
                    fh.write(json.dumps(row) + "\n")  # after the bootstrap row: a listed pair is complete
                    done[(a, b)] = row
                fh.flush()
                if time.monotonic() - last_sync > 5:
                    sync(fh)
                    last_sync = time.monotonic()
                advance(len(batch))
        sync(fh)
    rows = [done[p] for p in pairs]
    summary = _write_outputs(out_dir, rows, options, boot)
    summary.update(n_slides=len(slides), n_tiles=n, n_pairs=len(pairs), feature_dim=dim)
    if options.probes:
        summary["probes"] = _nan_to_none(_probes(features, subset, options.probe, log))
    return summary


def _write_outputs(out_dir: Path, rows: list[dict[str, Any]], options: PlismOptions, boot) -> dict[str, Any]:
    import pandas as pd

    names = pm.metric_names(options.topk)
    df = pd.DataFrame(rows)
    _atomic_csv(df, out_dir / "metrics.csv", index=False)
    aggs = pm.group_aggregates(df["group"].tolist(), {m: df[m].to_numpy() for m in names})
    table = pd.DataFrame({g: {m: pm.format_cell(aggs[g][m]) for m in names} for g in pm.GROUPS}).T
    _atomic_csv(table, out_dir / "results.csv", index=True)
    summary: dict[str, Any] = {"aggregates": _nan_to_none(aggs), "topk": list(options.topk),
                               "group_sizes": {g: int(m.sum()) for g, m in pm.group_masks(df["group"]).items()}}
    if 10 in options.topk:
        summary["leaderboard"] = pm.leaderboard_metric(aggs, rounded=True)
        summary["leaderboard_unrounded"] = pm.leaderboard_metric(aggs, rounded=False)
        if boot is not None:
            summary["leaderboard_bootstrap"] = _nan_to_none(pm.bootstrap_leaderboard(
                df["group"].tolist(), np.asarray(boot[:, 0]), np.asarray(boot[:, 1]), options.bootstrap_level))
        summary["leaderboard"], summary["leaderboard_unrounded"] = _nan_to_none(
            [summary["leaderboard"], summary["leaderboard_unrounded"]])
    summary["heatmaps"] = _heatmaps(out_dir, df, [m for m in ("cosine_similarity", "top_10_accuracy") if m in df])
    return summary


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, float) and np.isnan(obj):
        return None
    return obj


def _atomic_csv(df, path: Path, index: bool) -> None:
    tmp = path.with_name(path.name + ".tmp")
    df.to_csv(tmp, index=index)
    os.replace(tmp, path)


def factor_matrix(df, factor: str, metric: str, order: Sequence[str]):
    """Mean ``metric`` over pairs per (level_a, level_b) of ``factor`` (staining or scanner),
    symmetric; NaN where no pair exists. Diagonal = pairs sharing that level."""
    import pandas as pd

    a, b, v = df[f"{factor}_a"].to_numpy(), df[f"{factor}_b"].to_numpy(), df[metric].to_numpy(float)
    both = pd.DataFrame({"x": np.concatenate([a, b[a != b]]), "y": np.concatenate([b, a[a != b]]),
                         "v": np.concatenate([v, v[a != b]])})
    levels = [lv for lv in order if lv in set(a) | set(b)]
    return both.pivot_table(index="x", columns="y", values="v", aggfunc="mean").reindex(index=levels, columns=levels)


def _heatmaps(out_dir: Path, df, metrics: Sequence[str]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = {}
    for factor, order in (("staining", pdata.STAININGS), ("scanner", pdata.SCANNERS)):
        fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.4), squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            mat = factor_matrix(df, factor, metric, order)
            _atomic_csv(mat, out_dir / f"heatmap_{factor}_{metric}.csv", index=True)
            im = ax.imshow(mat.to_numpy(dtype=float), vmin=0, vmax=1, cmap="viridis")
            ax.set_xticks(range(len(mat)), mat.columns, rotation=90, fontsize=7)
            ax.set_yticks(range(len(mat)), mat.index, fontsize=7)
            ax.set_title(f"{metric} by {factor} pair", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        path = out_dir / f"heatmap_{factor}.png"
        tmp = path.with_name(path.stem + ".tmp.png")
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        os.replace(tmp, path)
        written[factor] = path.name
    return written


def _probes(features: pdata.FeatureSet, subset: np.ndarray, params: dict[str, Any], log=None) -> dict[str, Any]:
    """Scanner-ID and staining-ID leakage on up to ``max_positions`` evenly spaced tile
    locations of the evaluated subset, folds grouped by location."""
    max_pos = int(params.get("max_positions", 128))
    positions = subset[np.unique(np.round(np.linspace(0, len(subset) - 1, min(max_pos, len(subset)))).astype(int))]
    xs, scanners, stainings, groups = [], [], [], []
    for sid in features.slide_ids:
        sf = features.load(sid)
        xs.append(np.asarray(sf.features[positions], np.float32))
        st, sc = pdata.parse_slide_id(sid)
        scanners += [sc] * len(positions)
        stainings += [st] * len(positions)
        groups.append(np.arange(len(positions)))
    x = np.concatenate(xs)
    g = np.concatenate(groups)
    kw = {"folds": int(params.get("folds", 5)), "alpha": float(params.get("alpha", 1.0)),
          "pca_dim": params.get("pca_dim", 64),
          "seed": int(params.get("seed", 0))}
    out = {"positions": int(len(positions)), "rows": int(len(x))}
    for name, labels in (("scanner", scanners), ("staining", stainings)):
        out[name] = pm.leakage_probe(x, labels, g, **kw)
        if log:
            log.info("probe %s: %s", name, out[name])
    return out


# -- the suite run -----------------------------------------------------------------------------
def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def extract_plism_features(encoder, slides: dict[str, Any], cache_dir: Path, batch_size: int, workers: int,
                           precision: str, device: str, progress: bool) -> pdata.FeatureSet:
    """Shared extractor, one resumable h5 per slide under ``cache_dir`` (reused across runs)."""
    from pathrobust.extract import extract_features

    paths = {}
    for sid, source in slides.items():
        paths[sid] = extract_features(encoder, source, cache_dir / f"{sid}.h5", batch_size=batch_size,
                                      num_workers=workers, precision=precision, device=device, progress=progress)
    return pdata.FeatureSet.h5(paths)


def run_plism(*, model: str | None, out: str | os.PathLike = "runs", data: str | os.PathLike | None = None,
              features_dir: str | os.PathLike | None = None, pooling: str | None = None, weights: str | None = None,
              device: str = "auto", precision: str = "auto", batch_size: int = 64, workers: int = 2,
              tile_subset: str | os.PathLike | None = None, n_tiles: int | None = None,
              topk: Sequence[int] | None = None, bootstrap: int | None = None, probes: bool | None = None,
              metric_precision: str | None = None, overwrite: bool = False, progress: bool = True,
              protocol_file: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run the PLISM suite for one encoder (or precomputed plismbench-layout features).

    Returns the summary (also in ``<out>/plism/<model>/<run-id>/summary.json``); a finished
    run with the same configuration is returned as-is unless ``overwrite``."""
    import shutil

    from pathrobust.store import RunRecord

    protocol = load_protocol(protocol_file)
    options = PlismOptions.from_protocol(protocol, topk=tuple(topk) if topk else None, bootstrap=bootstrap,
                                         probes=probes, metric_precision=metric_precision, device=device)
    out = Path(out)
    provenance: dict[str, Any] = {"suite_config": str(protocol_file or CONFIG_FILE)}
    record_fields: dict[str, Any] = {}
    if features_dir is not None:
        if data is not None:
            raise UserError("--features and --data: give one, not both")
        features = pdata.FeatureSet.plismbench(features_dir)
        model_name = model or Path(features_dir).resolve().name
        provenance["features"] = str(Path(features_dir).resolve())
        data_fp = _fingerprint({sid: [str(p), os.path.getsize(p), os.path.getmtime(p)] for sid, p in features.paths.items()})
        record_fields.update(pooling="", precision="")
    else:
        if not model:
            raise UserError("--model: required unless --features is given")
        from pathrobust.encoders.base import build_encoder
        from pathrobust.extract import resolve_device, resolve_precision

        if data is None:
            from pathrobust.data.synth_plism import SynthPlismConfig, default_plism_data

            syn = protocol.get("synthetic", {})
            data = default_plism_data(SynthPlismConfig(tiles_per_slide=int(syn.get("tiles_per_slide", 48)),
                                                       seed=int(syn.get("seed", 0))), progress=progress)
            provenance["data_note"] = "synthetic PLISM (pathrobust data synth-plism), not the real PLISM slides"
        slides = pdata.open_plism(data)
        dev = resolve_device(device)
        encoder = build_encoder(model, pooling=pooling, weights=weights, device=dev)
        precision = resolve_precision(precision, dev, encoder.spec)
        enc_prov = encoder.provenance()
        data_fp = _fingerprint({sid: s.fingerprint() for sid, s in slides.items()} | {"data": str(Path(data).resolve())})
        key = _fingerprint([enc_prov["spec_hash"], enc_prov["pooling"], enc_prov["weights_sha256"], precision, data_fp])
        cache_dir = out / SUITE / "_features" / f"{safe_name(encoder.name)}-{key}"
        features = extract_plism_features(encoder, slides, cache_dir, batch_size, workers, precision, device, progress)
        model_name = encoder.name
        provenance.update(encoder=enc_prov, data=str(Path(data).resolve()), feature_cache=str(cache_dir))
        record_fields.update(encoder_record_fields(encoder, precision))
    xy, _ = features.dim_and_tiles()
    subset = pdata.tile_subset(len(xy), tile_subset, n_tiles)
    config = {"model": model_name, **{k: record_fields.get(k, "") for k in ("spec_hash", "pooling", "precision", "weights_sha256")},
              "data_fingerprint": data_fp, "tile_subset_sha": hashlib.sha256(subset.tobytes()).hexdigest()[:16],
              "n_tiles": int(len(subset)), "options": options.identity()}
    run = SuiteRun(out, SUITE, model_name, config, provenance)
    if run.finished and not overwrite:
        run.log.info("already finished; returning the stored summary")
        return run.summary()
    if overwrite:
        for name in (PAIRS_FILE, BOOT_FILE):
            (run.dir / name).unlink(missing_ok=True)
        shutil.rmtree(run.dir / "slide_topk", ignore_errors=True)
    summary = evaluate_features(features, run.dir, options, subset, progress=progress, log=run.log)
    summary["data_fingerprint"] = data_fp
    metrics = record_metrics(summary)
    record = RunRecord(suite=SUITE, model=model_name, metrics=metrics, data_fingerprint=data_fp,
                       options={"topk": list(options.topk), "n_tiles": int(len(subset)), "bootstrap": options.bootstrap,
                                "metric_precision": options.metric_precision},
                       run_id="auto", **record_fields)
    return run.finish(summary, [record])


# Metric names in the results DB (the contract pathrobust.reports reads): short metric,
# group, statistic — e.g. ``top10_inter_scanner_median``, ``cosine_all_median``.
DB_METRIC = {"cosine_similarity": "cosine"}
DB_GROUP = {"all": "all", "inter-scanner": "inter_scanner", "inter-staining": "inter_staining",
            "inter-scanner, inter-staining": "both"}


def db_metric_name(metric: str, group: str, stat: str) -> str:
    short = DB_METRIC.get(metric) or metric.replace("top_", "top").replace("_accuracy", "")
    return f"{short}_{DB_GROUP[group]}_{stat}"


def record_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """Flat metrics for the results DB: ``leaderboard`` (unrounded; it ranks rows),
    ``leaderboard_rounded`` (as the reference rounds), its bootstrap interval
    ``lb_ci_low``/``lb_ci_high``, ``<metric>_<group>_<stat>`` for every aggregate, and the
    normalised leakage of the probes."""
    out: dict[str, float] = {}
    if "leaderboard_unrounded" in summary:
        out["leaderboard"] = summary["leaderboard_unrounded"]
        out["leaderboard_rounded"] = summary["leaderboard"]
    if "leaderboard_bootstrap" in summary:
        out["lb_ci_low"] = summary["leaderboard_bootstrap"]["low"]
        out["lb_ci_high"] = summary["leaderboard_bootstrap"]["high"]
    for group, per_metric in summary["aggregates"].items():
        for metric, stats in per_metric.items():
            for stat, value in stats.items():
                out[db_metric_name(metric, group, stat)] = value
    for name in ("scanner", "staining"):
        probe = summary.get("probes", {}).get(name)
        if probe:
            out[f"{name}_leakage"] = _nan_to_none(probe["normalized"])
            out[f"{name}_probe_bacc"] = _nan_to_none(probe["balanced_accuracy"])
    return out


