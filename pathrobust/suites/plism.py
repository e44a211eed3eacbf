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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pathrobust import atomic
from pathrobust.config import at_least, each, in_range, non_empty, non_negative, one_of, positive
from pathrobust.data import plism as pdata
from pathrobust.errors import UserError
from pathrobust.metrics import plism as pm
from pathrobust.suites.base import (Features, FeaturesMode, RunContext, Suite, SuiteResult, TaskRow, option,
                                   register_suite)

SUITE = "plism"
PAIRS_FILE = "pairs.jsonl"
BOOT_FILE = "pairs_bootstrap.npy"
BATCH_ELEMENTS = 2**24  # cross-block elements per call when several small pairs are batched


# -- the protocol (suites/plism.toml) ----------------------------------------------------------
@dataclass(frozen=True)
class PairProtocol:
    reference: str
    topk: list[int] = field(metadata={**non_empty(), "check": lambda v: None if v and min(v) >= 1
                                      else f"must be a non-empty list of k >= 1, got {v}"})
    metric_precision: str = field(metadata=one_of(*pm.DTYPES))
    chunk_rows: int = field(metadata=positive())


@dataclass(frozen=True)
class MemoryProtocol:
    resident_features_gib: float = field(metadata=non_negative())


@dataclass(frozen=True)
class BootstrapProtocol:
    replicates: int = field(metadata=non_negative())
    level: float = field(metadata=in_range(0.5, 0.999))
    seed: int


@dataclass(frozen=True)
class ProbeProtocol:
    enabled: bool
    max_positions: int = field(metadata=at_least(2))
    folds: int = field(metadata=at_least(2))
    pca_dim: int = field(metadata=positive())
    alpha: float = field(metadata=positive())
    seed: int


@dataclass(frozen=True)
class SyntheticPlism:
    tiles_per_slide: int = field(metadata=at_least(2))
    stainings: list[str] = field(metadata={**each(one_of(*pdata.STAININGS))})
    scanners: list[str] = field(metadata={**each(one_of(*pdata.SCANNERS))})
    tile_size: int = field(metadata=at_least(16))
    seed: int


@dataclass(frozen=True)
class PlismProtocol:
    protocol: PairProtocol
    memory: MemoryProtocol
    bootstrap: BootstrapProtocol
    probes: ProbeProtocol
    synthetic: SyntheticPlism


def parse_topk(value: str | None) -> tuple[int, ...] | None:
    if not value:
        return None
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise UserError(f"--topk {value}: expected comma-separated integers such as 1,3,5,10") from None


@dataclass(frozen=True)
class PlismRunOptions:
    """``pathrobust run plism`` options (None = the protocol's value)."""

    tile_subset: Path | None = option("--tile-subset", "plismbench tile subset (.npy of int64 indices into the "
                                      "(x, y)-sorted tiles), e.g. tiles_subset_8139.npy.", variant=False,
                                      parse=Path)
    n_tiles: int | None = option("--n-tiles", "Use N evenly spaced tiles of the (x, y)-sorted tiles "
                                 "(deterministic). Default: all tiles.", min=2, variant=False)
    topk: tuple[int, ...] | None = option("--topk", "Comma-separated k values of the top-k accuracies "
                                          "(default 1,3,5,10; the leaderboard needs 10).", parse=parse_topk,
                                          variant=False)
    bootstrap: int | None = option("--bootstrap", "Tile bootstrap replicates for the leaderboard metric's 95% "
                                   "interval (default from suites/plism.toml; 0 = off).", min=0, variant=False)
    probes: bool = option("--no-probes", "Skip the scanner-ID / staining-ID leakage probes.", True, invert=True,
                          variant=False)
    metric_precision: str | None = option("--metric-precision", "Similarity precision of the pair metrics: fp32 "
                                          "(default, the reference definition), fp64, bf16 or fp16 (GPU).")


@dataclass
class PlismOptions:
    """How one evaluation runs: the protocol with the run's options applied."""

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
    def resolve(cls, protocol: PlismProtocol, run: PlismRunOptions, device: str = "auto") -> PlismOptions:
        p, b, pr = protocol.protocol, protocol.bootstrap, protocol.probes
        opts = cls(topk=tuple(run.topk or p.topk), metric_precision=run.metric_precision or p.metric_precision,
                   device=device, chunk_rows=p.chunk_rows, resident_gib=protocol.memory.resident_features_gib,
                   bootstrap=b.replicates if run.bootstrap is None else run.bootstrap, bootstrap_level=b.level,
                   bootstrap_seed=b.seed, probes=pr.enabled and run.probes,
                   probe={"max_positions": pr.max_positions, "folds": pr.folds, "pca_dim": pr.pca_dim,
                          "alpha": pr.alpha, "seed": pr.seed})
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
    atomic.write_text(path, "".join(g + "\n" for g in good))
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
            atomic.save_npy(path, top.cpu().numpy())
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
            boot = _reserved_memmap(boot_path, shape)
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
    atomic.write_csv(df, out_dir / "metrics.csv")
    aggs = pm.group_aggregates(df["group"].tolist(), {m: df[m].to_numpy() for m in names})
    table = pd.DataFrame({g: {m: pm.format_cell(aggs[g][m]) for m in names} for g in pm.GROUPS}).T
    atomic.write_csv(table, out_dir / "results.csv", index=True)
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
            atomic.write_csv(mat, out_dir / f"heatmap_{factor}_{metric}.csv", index=True)
            im = ax.imshow(mat.to_numpy(dtype=float), vmin=0, vmax=1, cmap="viridis")
            ax.set_xticks(range(len(mat)), mat.columns, rotation=90, fontsize=7)
            ax.set_yticks(range(len(mat)), mat.index, fontsize=7)
            ax.set_title(f"{metric} by {factor} pair", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        path = out_dir / f"heatmap_{factor}.png"
        atomic.save_figure(fig, path, dpi=110)
        plt.close(fig)
        written[factor] = path.name
    return written


def _probes(features: pdata.FeatureSet, subset: np.ndarray, params: dict[str, Any], log=None) -> dict[str, Any]:
    """Scanner-ID and staining-ID leakage on up to ``max_positions`` evenly spaced tile
    locations of the evaluated subset, folds grouped by location."""
    from pathrobust.probes.leakage import leakage_probe

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
        out[name] = leakage_probe(x, labels, g, **kw)
        if log:
            log.info("probe %s: %s", name, out[name])
    return out


def _reserved_memmap(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """A float32 ``.npy`` memmap whose blocks are allocated now: a sparse file on a full
    disk would die with SIGBUS at the first write into a hole; this fails here, as one line."""
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    try:
        with open(path, "r+b") as fh:
            os.posix_fallocate(fh.fileno(), 0, os.path.getsize(path))
    except OSError as exc:
        del mm
        path.unlink(missing_ok=True)
        raise atomic.disk_error(exc, path) or exc from None
    return mm


# -- the suite -----------------------------------------------------------------------------------
@register_suite
class PlismSuite(Suite):
    """PLISM stain/scanner robustness with plismbench's protocol (see the module doc)."""

    name = SUITE
    summary = "PLISM stain/scanner robustness (plismbench): cosine and top-k retrieval across 91 slides."
    description = """PLISM stain/scanner robustness (plismbench protocol): cosine similarity and top-k
    retrieval of the same tile across 91 stainings x scanners, per pair and per group, the
    leaderboard metric (mean of 4 medians), plus heatmaps, leakage probes and a bootstrap CI.

    Writes <out>/plism/<model>/<run-id>/ (metrics.csv, results.csv, summary.json, heatmaps)
    and a row in <out>/results.sqlite. Interrupted? Rerun the same command: extraction and
    finished pairs are reused."""
    examples = (
        "pathrobust run plism --model efficientnet-lite0-imagenet",
        "pathrobust run plism --model h0-mini --data plism-dataset-tiles/ --tile-subset tiles_subset_8139.npy --device cuda",
        "pathrobust run plism --features features/h0_mini/ --out runs/",
        "pathrobust run plism --model rgb-histogram --n-tiles 32 --bootstrap 0 --no-probes",
    )
    data_help = ("PLISM tiles: folder of owkin/plism-dataset-tiles parquet shards or of owkin/plism-dataset "
                 "<slide_id>.h5 files, or a fetched dataset name. Default: synthetic PLISM data (built once into "
                 "the cache).")
    features = FeaturesMode(
        help="Precomputed features in plismbench's layout: DIR/<slide_id>/features.npy, float32 (n, 3+d). "
             "--model then only names the row (default: the folder name).")
    Protocol = PlismProtocol
    Options = PlismRunOptions

    def build_synthetic(self, root: Path, overrides: dict[str, Any], progress: bool) -> Path:
        from pathrobust.data.synth_plism import SynthPlismConfig, build_synthetic_plism

        values = {**asdict(self.protocol.synthetic), **overrides}
        config = SynthPlismConfig(tiles_per_slide=int(values["tiles_per_slide"]),
                                  stainings=tuple(values["stainings"]), scanners=tuple(values["scanners"]),
                                  tile_size=int(values["tile_size"]), seed=int(values["seed"]))
        return build_synthetic_plism(root, config, progress=progress)

    def open_data(self, path: Path, options: PlismRunOptions, embed: bool) -> dict[str, Any]:
        return pdata.open_plism(path)

    def data_fingerprint(self, path: Path, data: dict[str, Any], options: PlismRunOptions) -> str:
        from pathrobust.data.identity import fingerprint_tree

        return fingerprint_tree(path, suffixes=(".parquet", ".h5"))

    def open_features(self, path: Path, data: Any, options: PlismRunOptions) -> Features:
        from pathrobust.data.identity import fingerprint_files

        features = pdata.FeatureSet.plismbench(path)
        return Features(features, path.resolve().name, fingerprint_files(path, features.paths.values()),
                        record={"pooling": "", "precision": ""})

    def identity(self, options: PlismRunOptions) -> dict[str, Any]:
        subset = b""
        if options.tile_subset is not None and Path(options.tile_subset).is_file():
            subset = Path(options.tile_subset).read_bytes()
        return {"options": PlismOptions.resolve(self.protocol, options).identity(), "n_tiles": options.n_tiles,
                "tile_subset_sha": hashlib.sha256(subset).hexdigest()[:16] if subset else ""}

    def evaluate(self, ctx: RunContext) -> SuiteResult:
        opts = PlismOptions.resolve(self.protocol, ctx.options, device=str(ctx.device or "auto"))
        features = ctx.features
        if features is None:
            features = pdata.FeatureSet.h5({sid: ctx.cache.embed(source, sid) for sid, source in ctx.data.items()})
        xy, _ = features.dim_and_tiles()
        subset = pdata.tile_subset(len(xy), ctx.options.tile_subset, ctx.options.n_tiles)
        if ctx.overwrite:
            import shutil

            for name in (PAIRS_FILE, BOOT_FILE):
                (ctx.dir / name).unlink(missing_ok=True)
            shutil.rmtree(ctx.dir / "slide_topk", ignore_errors=True)
        summary = evaluate_features(features, ctx.dir, opts, subset, progress=ctx.progress, log=ctx.log)
        ci = summary.get("leaderboard_bootstrap")
        row = TaskRow("", record_metrics(summary), options={
            "topk": list(opts.topk), "n_tiles": int(len(subset)), "bootstrap": opts.bootstrap,
            "metric_precision": opts.metric_precision})
        return SuiteResult(headline=summary.get("leaderboard_unrounded"), rows=[row], summary=summary,
                           ci=(ci["low"], ci["high"]) if ci else None,
                           artefacts={f"heatmap_{k}": v for k, v in summary.get("heatmaps", {}).items()})


def run_plism(*, model: Any = None, out: str | os.PathLike = "runs", data: str | os.PathLike | None = None,
              features_dir: str | os.PathLike | None = None, **kwargs: Any) -> dict[str, Any]:
    """Run the PLISM suite: :func:`pathrobust.suites.base.run_suite` with plismbench's
    features layout as ``features_dir`` (see ``run_suite`` for the other arguments)."""
    from pathrobust.suites.base import run_suite

    return run_suite(SUITE, model, data, out, features=features_dir, **kwargs)


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


