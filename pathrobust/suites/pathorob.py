"""The PathoROB suite: are an encoder's neighbours chosen by biology or by the hospital?

``pathrobust run pathorob`` embeds each PathoROB dataset (:mod:`pathrobust.data.pathorob`: the
hub parquet with PathoROB's metadata views, or a user's manifest CSV) through the run's feature
cache, or reads PathoROB's own feature files (``--features``), and runs
:func:`pathrobust.probes.pathorob.evaluate_pathorob` per dataset with the protocol of
``suites/pathorob.toml``: the robustness index (RI) at the dataset's k and its curve RI(k), the
clustering score and the average performance drop (APD) in- and out-of-domain.

Results: one results-DB row per dataset (``ri`` with its slide-bootstrap interval, ``apd_id``,
``apd_ood`` with their spread over iterations, ``clustering_score`` with its trial spread, the
pooled neighbour counts) and an ``average`` row (the mean RI, PathoROB's leaderboard number;
APD as PathoROB's corrected mean ± t·sem over datasets; the mean clustering score). The run
directory holds the per-item tables (``ri_per_query.csv``, ``ri_per_subset.csv``,
``ri_curve.csv``, clustering and APD tables; a ``dataset`` column in each) and
``ri_curve.png``, RI as a function of k.

Variants (options; a non-default value labels the row and its provenance): ``--select-k`` (k
by k-NN balanced accuracy over PathoROB's grid, as croma chooses it), ``--mari`` and
``--croma`` (croma 1.0.1's distance-weighted RI and margin, reported beside RI).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pathrobust import atomic
from pathrobust.config import at_least, in_range, non_empty, one_of, positive, to_dict
from pathrobust.data import pathorob as D
from pathrobust.errors import UserError
from pathrobust.probes.pathorob import PathorobParams, PathorobResult, aggregate, check_rows, evaluate_pathorob, validate
from pathrobust.suites.base import (Features, FeaturesMode, RunContext, Suite, SuiteResult, TaskRow, option,
                                   register_suite)

SUITE = "pathorob"
MANIFEST = "manifest"  # the [datasets.*] table of a user's manifest CSV
CURVE_PNG = "ri_curve.png"
APD_FROM_DATA = ("id_centres", "ood_centres", "classes", "patches_per_slide")


# -- the protocol (suites/pathorob.toml) -------------------------------------------------------
@dataclass(frozen=True)
class RunProtocol:
    reference: str
    datasets: list[str] = field(metadata=non_empty())
    metadata_source: str
    apd_ci_quantile: float = field(metadata=in_range(0.5, 0.9999))


@dataclass(frozen=True)
class BootstrapProtocol:
    replicates: int = field(metadata=at_least(0))
    level: float = field(metadata=in_range(0.5, 0.999))
    seed: int


@dataclass(frozen=True)
class RiProtocol:
    k: int = field(metadata=at_least(1))
    design: str = field(metadata=one_of("plain", "paired", "auto"))
    curve_k_max: int = field(metadata=at_least(0))
    k_grid_max: int = field(metadata=at_least(2))
    exact_curve: bool
    croma_m: int = field(metadata=at_least(1))
    croma_alpha: float = field(metadata=in_range(0.001, 1))
    mari_tau: float | None = field(default=None, metadata=positive())  # unset: croma's automatic tau


@dataclass(frozen=True)
class ClusteringProtocol:
    k_min: int = field(metadata=at_least(2))
    k_max: int = field(metadata=at_least(2))
    silhouette_seed: int
    silhouette_n_init: int = field(metadata=at_least(1))
    trials: int = field(metadata=at_least(1))
    trial_seed: int
    trial_n_init: int = field(metadata=at_least(1))


@dataclass(frozen=True)
class ApdProtocol:
    id_centres: list[str] = field(metadata=non_empty())
    ood_centres: list[str] = field(metadata=non_empty())
    classes: list[str] = field(metadata=non_empty())
    patches_per_slide: int = field(metadata=at_least(1))
    iterations: int = field(metadata=at_least(1))
    seed: int
    c_exponents: list[float]
    max_iter: int = field(metadata=at_least(1))
    train_slides: list[list[list[int]]]
    case_splits: str | None = None  # a JSON file (PathoROB's tolkach_splits.json), looked up beside the metadata


@dataclass(frozen=True)
class DatasetProtocol:
    ri: RiProtocol
    clustering: ClusteringProtocol
    apd: ApdProtocol | None = None       # no [apd]: the dataset has no APD design
    hub: str = ""                         # its Hugging Face dataset repo, if any
    views: dict[str, str] = field(default_factory=dict)  # metric -> metadata file (default: the reader's)


@dataclass(frozen=True)
class SyntheticPathorob:
    id_centres: list[str] = field(metadata={"flag": "--id-centres", "help": "In-domain centres, "
                                            "<PLISM staining>_<PLISM scanner> (RI, clustering, APD training)."})
    ood_centres: list[str] = field(metadata={"flag": "--ood-centres", "help": "Unseen centres (APD out-of-domain)."})
    slides_per_cell: int = field(metadata={**at_least(1), "help": "Slides per in-domain (centre, class) cell."})
    ood_slides_per_cell: int = field(metadata={**at_least(0), "help": "Slides per unseen-centre cell."})
    patches_per_slide: int = field(metadata={**at_least(1), "help": "Tiles per slide."})
    correlation: float = field(metadata={**in_range(0, 0.99), "help": "Centre-class correlation (phi) of the "
                                         "in-domain rows; 0 balances every cell."})
    class_quantile: float = field(metadata={**in_range(0.01, 0.5), "help": "Classes: the least / most "
                                            "anisotropic fraction of the candidate tiles."})
    tile_size: int = field(metadata={**in_range(16, 224), "help": "Tile side in pixels (PathoROB: 224)."})
    seed: int = field(metadata={"help": "Random seed."})


@dataclass(frozen=True)
class PathorobProtocol:
    protocol: RunProtocol
    bootstrap: BootstrapProtocol
    datasets: dict[str, DatasetProtocol]
    synthetic: SyntheticPathorob

    def __post_init__(self) -> None:
        missing = [d for d in self.protocol.datasets if d not in self.datasets]
        if missing:
            raise UserError(f"'protocol.datasets' names {missing[0]!r}, which has no [datasets.{missing[0]}] table")
        if MANIFEST not in self.datasets:
            raise UserError(f"[datasets.{MANIFEST}] is missing (the protocol of a user's manifest CSV)")


def _split_names(value: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in value.split(",") if t.strip())


@dataclass(frozen=True)
class PathorobOptions:
    """``pathrobust run pathorob`` options."""

    datasets: tuple[str, ...] | None = option("--datasets", "Comma-separated datasets under --data (tcga, camelyon, "
                                              "tolkach_esca); default: every PathoROB dataset found.",
                                              parse=_split_names, variant=False)
    metadata: Path | None = option("--metadata", "Folder of PathoROB's data/metadata/*.csv (and "
                                   "tolkach_splits.json); default: a metadata/ folder beside each dataset's data/ "
                                   "or above it.", parse=Path, variant=False)
    select_k: bool = option("--select-k", "Variant: k chosen per dataset by k-NN balanced accuracy over PathoROB's "
                            "grid (croma's choice) instead of the dataset's default k.", False)
    mari: bool = option("--mari", "Variant: also croma 1.0.1's MaRI (neighbours weighted by exp(-d/tau)).", False)
    croma: bool = option("--croma", "Variant: also croma 1.0.1's CRoMa margin (median over queries).", False)
    apd: bool = option("--no-apd", "Skip the average performance drop (the slowest part: 15 probes x splits x "
                       "20 iterations).", True, invert=True, variant=False)
    clustering: bool = option("--no-clustering", "Skip the clustering score.", True, invert=True, variant=False)


# -- data ----------------------------------------------------------------------------------------
@dataclass
class DatasetRun:
    """One dataset of a run: its data, the protocol table it follows and its parameters."""

    name: str                 # the task name of its results-DB row
    key: str                  # its [datasets.<key>] table
    data: D.PathorobData
    params: PathorobParams
    files: list[Path]         # what its numbers depend on (content fingerprint)
    root: Path


@dataclass
class PathorobRunData:
    path: Path
    datasets: list[DatasetRun]


def _design(rows: pd.DataFrame, design: str) -> str:
    """``auto``: paired when ``subset`` names anything but ID/OOD (2 x 2 subsets)."""
    if design != "auto":
        return design
    return "plain" if set(rows["subset"].astype(str)) <= {"ID", "OOD"} else "paired"


def dataset_params(protocol: DatasetProtocol, options: PathorobOptions, data: D.PathorobData, source: str,
                   search: Sequence[Path] = ()) -> PathorobParams:
    """The :class:`PathorobParams` of one dataset: its TOML table with the run's options."""
    ri = to_dict(protocol.ri)
    ri["design"] = _design(data.view("ri"), ri["design"])
    ri["select_k"] = options.select_k
    ri["variants"] = [v for v, on in (("mari", options.mari), ("croma", options.croma)) if on]
    if ri["mari_tau"] is None:
        del ri["mari_tau"]
    table: dict[str, Any] = {"ri": ri}
    if options.clustering:
        table["clustering"] = to_dict(protocol.clustering)
    if options.apd and protocol.apd is not None:
        # a generated dataset states its own centres, classes and slide size (its pathorob.json)
        apd = {**to_dict(protocol.apd), **{k: v for k, v in data.info.get("apd", {}).items() if k in APD_FROM_DATA}}
        if apd["case_splits"] is None:
            del apd["case_splits"]
        table["apd"] = apd
    return PathorobParams.from_mapping(table, source, search=[str(p) for p in search])


def _search_dirs(folder: Path, metadata: Path | None) -> list[Path]:
    """Where metadata files and PathoROB's tolkach_splits.json are looked up."""
    dirs = [Path(metadata)] if metadata else []
    return dirs + [p for p in (folder / "metadata", folder.parent / "metadata", folder) if p.is_dir()]


# -- features mode (PathoROB's FeatureDataManager layout) ----------------------------------------
def read_pathorob_features(folder: Path, data: D.PathorobData) -> np.ndarray:
    """PathoROB's feature files of one dataset, ``folder/<medical_center>.npz`` (spaces as
    ``_``) keyed ``<slide_id>-<patch_id>``, as an ``(n_tiles, d)`` array in tile order. Every
    tile a view uses needs a feature; the others are left at 0 (never read)."""
    table = data.table
    used = np.unique(data.views["row"].to_numpy(np.int64))
    out: np.ndarray | None = None
    for centre, rows in table.iloc[used].groupby("medical_center", sort=True):
        path = folder / f"{str(centre).replace(' ', '_')}.npz"
        if not path.is_file():
            raise UserError(f"--features {folder}: no {path.name} (PathoROB keeps one .npz per medical centre)")
        try:
            with np.load(path) as npz:
                keys = set(npz.files)
                for r, sid, pid in zip(rows.index, rows["slide_id"], rows["patch_id"]):
                    key = f"{sid}-{pid}"
                    if key not in keys:
                        raise UserError(f"{path}: no feature {key!r} (slide_id-patch_id of tile {int(r)})")
                    vec = np.asarray(npz[key])
                    if out is None:
                        out = np.zeros((len(table), vec.size), np.float32 if vec.dtype != np.float64 else np.float64)
                    if vec.size != out.shape[1]:
                        raise UserError(f"{path}: feature {key!r} has {vec.size} values, others {out.shape[1]}")
                    out[int(r)] = vec.reshape(-1)
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: not a readable .npz ({exc})") from None
    if out is None:
        raise UserError(f"--features {folder}: no features read")
    return out


# -- results -------------------------------------------------------------------------------------
def _num(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def dataset_metrics(result: PathorobResult) -> dict[str, float | None]:
    """The results-DB metrics of one dataset."""
    s = result.summary()
    out = {"ri": s["robustness_index"], "k": s["k"], "queries": s["queries"],
           **{t.lower(): s[f"count_{t}"] for t in ("SS", "SO", "OS", "OO")}}
    for key in ("ri_ci_low", "ri_ci_high", "ri_boot_std"):
        if key in s:
            out[key] = s[key]
    for name, key in (("MaRI", "mari"), ("CRoMa", "croma")):
        if name in s:
            out[key] = s[name]
    if "MaRI_tau" in s:
        out["mari_tau"] = s["MaRI_tau"]
    if "CRoMa_ltm" in s:
        out["croma_ltm"], out["croma_f0"] = s["CRoMa_ltm"], s["CRoMa_f0"]
    if result.clustering is not None:
        out["clustering_score"], out["clustering_score_std"] = s["clustering_score"], s["clustering_score_std"]
    if result.apd is not None:
        a = result.apd
        out.update(apd_id=a.apd_id, apd_ood=a.apd_ood, apd_id_std=_std(a.per_iteration_id),
                   apd_ood_std=_std(a.per_iteration_ood), apd_not_converged=a.not_converged)
    return {k: _num(v) for k, v in out.items()}


def _std(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def average_metrics(results: Mapping[str, PathorobResult], quantile: float) -> dict[str, float | None]:
    agg = aggregate(results, quantile)
    out: dict[str, Any] = {"ri": agg["robustness_index"], "n_datasets": len(results)}
    for key in ("ri_ci_low", "ri_ci_high", "ri_boot_std", "clustering_score", "apd_id", "apd_id_ci", "apd_ood",
                "apd_ood_ci"):
        if key in agg:
            out[key] = agg[key]
    for name, key in (("MaRI", "mari"), ("CRoMa", "croma")):
        if name in agg:
            out[key] = agg[name]
    return {k: _num(v) for k, v in out.items()}


def _with_dataset(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    frame = frame.copy()
    frame.insert(0, "dataset", name)
    return frame


def write_tables(runs: Sequence[DatasetRun], results: Mapping[str, PathorobResult]) -> dict[str, pd.DataFrame]:
    """Each per-item table of every dataset, stacked with a ``dataset`` column; the per-query
    table also names each query's patch, class and centre."""
    parts: dict[str, list[pd.DataFrame]] = {}
    for run in runs:
        for table, frame in results[run.name].tables().items():
            if table in ("ri_per_query", "croma_per_query"):
                meta = run.data.table.set_index("row")[["patch_id", "biological_class", "medical_center"]]
                frame = frame.join(meta, on="row")
            parts.setdefault(table, []).append(_with_dataset(frame, run.name))
    return {table: pd.concat(frames, ignore_index=True) for table, frames in parts.items()}


def plot_ri_curves(results: Mapping[str, PathorobResult], path: Path) -> Path:
    """RI(k) of every dataset on one axis, the reported k marked; 0.5 = neutral."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for name, result in results.items():
        curve, r = result.robustness.curve, result.robustness
        chosen = " (selected)" if r.k_source == "selected" else ""
        line, = ax.plot(curve["k"], curve["RI"], label=f"{name}: RI {r.ri:.3f} at k = {r.k}{chosen}")
        ax.plot([r.k], [r.ri], "o", color=line.get_color())
    ax.axhline(0.5, color="#999999", lw=0.8, ls="--")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("k (nearest neighbours on other slides)")
    ax.set_ylabel("robustness index  ΣSO / (ΣSO + ΣOS)")
    ax.set_title("PathoROB robustness index as a function of k", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return atomic.save_figure(fig, path, dpi=110)


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return _num(value)
    if isinstance(value, pd.DataFrame):
        return None
    return value


# -- the suite -----------------------------------------------------------------------------------
@register_suite
class PathorobSuite(Suite):
    """PathoROB robustness index, clustering score and average performance drop (module doc)."""

    name = SUITE
    summary = "PathoROB: robustness index (biology vs hospital among k-NN), clustering score, performance drop."
    description = """PathoROB (bifold-pathomics): are an encoder's nearest neighbours chosen by biology or by
    the hospital? Robustness index (RI = SO / (SO + OS) among each tile's k nearest neighbours on
    other slides) per dataset and as a function of k, clustering score (ARI class - ARI centre),
    average performance drop of logistic-regression probes trained on splits of growing
    centre-class correlation (in-domain and unseen centres). Leaderboard: mean RI over TCGA 2x2,
    Camelyon, Tolkach ESCA.

    Data: the hub datasets (bifold-pathomics/PathoROB-<name>, `pathrobust data fetch pathorob-<name>`)
    with PathoROB's data/metadata CSVs (--metadata), or a manifest CSV of your own multi-centre tiles
    (image_path, biological_class, medical_center, slide_id). Protocol values: suites/pathorob.toml.
    Results: one row per dataset + "average"; per-query, per-subset, RI(k), clustering and APD tables
    and ri_curve.png in the run directory."""
    examples = (
        "pathrobust run pathorob --model efficientnet-lite0-imagenet",
        "pathrobust run pathorob --model h0-mini --data pathorob/ --metadata PathoROB/data/metadata",
        "pathrobust run pathorob --model uni2-h --data pathorob-camelyon --datasets camelyon --no-apd",
        "pathrobust run pathorob --features PathoROB/data/features/uni2h_clsmean --data pathorob/ --metadata PathoROB/data/metadata",
        "pathrobust run pathorob --model h0-mini --data my_centres.csv --select-k --mari --croma",
    )
    data_help = ("Folder of PathoROB hub datasets (<root>/PathoROB-<name>/data/*.parquet, the hub cache, or one "
                 "dataset's folder), a fetched name (pathorob-camelyon...), or a manifest CSV. Default: the "
                 "synthetic set, built once into the cache.")
    features = FeaturesMode(help="Precomputed features in PathoROB's layout (its data/features/<model>/): "
                                 "DIR/<dataset>/<medical_center>.npz keyed <slide_id>-<patch_id>, instead of "
                                 "--model; --data still gives the metadata.", needs_data=True)
    Protocol = PathorobProtocol
    Options = PathorobOptions

    # data ---------------------------------------------------------------------------------------
    def synthetic_config(self, overrides: Mapping[str, Any]):
        from pathrobust.data.synth_pathorob import SynthPathorobConfig

        values = {**asdict(self.protocol.synthetic), **overrides}
        return SynthPathorobConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def build_synthetic(self, root: Path, overrides: Mapping[str, Any], progress: bool) -> Path:
        from pathrobust.data.synth_pathorob import _stamp, built_with, synth_pathorob

        config = self.synthetic_config(overrides)
        try:
            return synth_pathorob(root, config)
        except OSError:
            if built_with(root) == _stamp(config):  # another process finished it first
                return root
            raise

    def open_data(self, path: Path, options: PathorobOptions, embed: bool) -> PathorobRunData:
        if path.is_file():
            if path.suffix.lower() != ".csv":
                raise UserError(f"--data {path}: a file must be a manifest CSV (image_path, biological_class, "
                                "medical_center, slide_id)")
            if options.datasets:
                raise UserError(f"--datasets: --data {path} is a manifest (one dataset); leave --datasets out")
            data = D.read_manifest(path)
            files = [path] + list(getattr(data.tiles, "paths", []))
            runs = [self._dataset_run(data.name, MANIFEST, data, files, path.parent, options)]
            return PathorobRunData(path, runs)
        known = list(self.protocol.datasets)
        found = D.find_datasets(path, options.datasets)
        order = {name: i for i, name in enumerate(self.protocol.protocol.datasets)}
        runs = []
        for name, folder in sorted(found.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])):
            if name not in self.protocol.datasets or name == MANIFEST:
                raise UserError(f"--data {path}: dataset {name!r} has no protocol in {self.source.name} "
                                f"(known: {', '.join(k for k in known if k != MANIFEST)})")
            proto = self.protocol.datasets[name]
            data = D.load_dataset(name, folder, views=proto.views or None, metadata_dir=options.metadata)
            files = D.parquet_shards(folder) + [Path(s) for s in data.sources.values() if s != "parquet"]
            runs.append(self._dataset_run(name, name, data, files, folder, options))
        return PathorobRunData(path, runs)

    def _dataset_run(self, name: str, key: str, data: D.PathorobData, files: list[Path], folder: Path,
                     options: PathorobOptions) -> DatasetRun:
        search = _search_dirs(folder, options.metadata)
        params = dataset_params(self.protocol.datasets[key], options, data, f"{self.source.name} [datasets.{key}]",
                                search)
        validate(data.views, params, name)  # bad metadata fails here, before anything is embedded or written
        splits = self.protocol.datasets[key].apd.case_splits if params.apd is not None else None
        if splits:  # its numbers depend on the case splits too
            files += [d / splits for d in search if (d / splits).is_file()][:1]
        return DatasetRun(name, key, data, params, files, folder)

    def data_fingerprint(self, path: Path, data: PathorobRunData, options: PathorobOptions) -> str:
        import hashlib

        parts = ",".join(f"{run.name}={self._dataset_fingerprint(run)}" for run in data.datasets)
        return hashlib.sha256(parts.encode()).hexdigest()[:16]

    @staticmethod
    def _dataset_fingerprint(run: DatasetRun) -> str:
        from pathrobust.data.identity import fingerprint_files

        return fingerprint_files(run.root, run.files, extra=f"{run.name}:{len(run.data.tiles)}")

    def open_features(self, path: Path, data: PathorobRunData, options: PathorobOptions) -> Features:
        from pathrobust.data.identity import fingerprint_files

        if not path.is_dir():
            raise UserError(f"--features {path}: not a directory (PathoROB's data/features/<model>/)")
        features, files = {}, []
        for run in data.datasets:
            folder = path / run.name
            if not folder.is_dir():
                raise UserError(f"--features {path}: no folder {run.name}/ (PathoROB layout: <model>/<dataset>/"
                                "<medical_center>.npz)")
            emb = read_pathorob_features(folder, run.data)
            check_rows(emb, np.unique(run.data.views["row"].to_numpy(np.int64)), f"--features {folder}")
            features[run.name] = emb
            files += sorted(folder.glob("*.npz"))
        return Features(features, path.resolve().name, fingerprint_files(path, files),
                        record={"pooling": "", "precision": ""})

    # evaluation ---------------------------------------------------------------------------------
    def evaluate(self, ctx: RunContext) -> SuiteResult:
        runs: list[DatasetRun] = ctx.data.datasets
        boot = self.protocol.bootstrap
        device = "cuda" if ctx.device is not None and getattr(ctx.device, "type", "") == "cuda" else "cpu"
        results: dict[str, PathorobResult] = {}
        for run in runs:
            if ctx.features is not None:
                emb = ctx.features[run.name]
            else:
                ctx.log.info("embedding %s (%d tiles) with %s", run.name, len(run.data.tiles), ctx.encoder.name)
                emb = ctx.cache.load(run.data.tiles, run.name).features
                if len(emb) != len(run.data.tiles):
                    raise UserError(f"{run.root}: {len(emb)} cached embeddings for {len(run.data.tiles)} tiles; "
                                    "pass --overwrite")
            params = dataclasses.replace(run.params, device=device, bootstrap_replicates=boot.replicates,
                                         bootstrap_level=boot.level, bootstrap_seed=boot.seed)
            result = evaluate_pathorob(np.asarray(emb), run.data.views, run.name, params,
                                       progress=lambda stage, n=run.name: ctx.log.info("%s: %s", n, stage))
            ctx.log.info("%s: RI %.4f at k = %d (%s)", run.name, result.robustness.ri, result.robustness.k,
                         result.robustness.k_source)
            results[run.name] = result
        average = average_metrics(results, self.protocol.protocol.apd_ci_quantile)
        fingerprints = {run.name: self._dataset_fingerprint(run) for run in runs}
        row_options = {"k": {n: r.robustness.k for n, r in results.items()}}
        skipped = [m for m, on in (("apd", ctx.options.apd), ("clustering", ctx.options.clustering)) if not on]
        if skipped:
            row_options["skipped"] = skipped
        rows = [TaskRow(n, dataset_metrics(r), row_options, data_fingerprint=fingerprints[n]) for n, r in results.items()]
        rows.append(TaskRow("average", average, row_options))
        plot_ri_curves(results, ctx.dir / CURVE_PNG)
        summary = {
            "reference": self.protocol.protocol.reference,
            "datasets": {n: _json_ready(r.summary()) for n, r in results.items()},
            "average": average,
            "definitions": {n: _json_ready(r.provenance()) for n, r in results.items()},
            "data": {run.name: {"root": str(run.root), "views": run.data.sources, "tiles": len(run.data.tiles)}
                     for run in runs},
        }
        notes = [f"{m} skipped (--no-{m})" for m in skipped]
        notes += [f"{run.name}: no APD (its protocol has no split schedule)" for run in runs
                  if ctx.options.apd and run.params.apd is None]
        if notes:
            summary["notes"] = notes
        ci = (average.get("ri_ci_low"), average.get("ri_ci_high")) if "ri_ci_low" in average else None
        return SuiteResult(headline=average["ri"], rows=rows, summary=summary, ci=ci,
                           tables=write_tables(runs, results), artefacts={"ri_curve": CURVE_PNG})


def run_pathorob(model: Any = None, data: str | Path | None = None, out: str | Path = "runs", *,
                 datasets: Sequence[str] | None = None, features: str | Path | None = None,
                 **kwargs: Any) -> dict[str, Any]:
    """Run the PathoROB suite (:func:`pathrobust.suites.base.run_suite`; options as keywords:
    ``metadata``, ``select_k``, ``mari``, ``croma``, ``apd``, ``clustering``)."""
    from pathrobust.suites.base import run_suite

    return run_suite(SUITE, model, data, out, features=features, datasets=tuple(datasets) if datasets else None,
                     **kwargs)
