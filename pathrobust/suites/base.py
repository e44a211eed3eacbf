"""The suite contract: a new suite is one module, one TOML and one reader.

A suite is a :class:`Suite` subclass registered with :func:`register_suite` (built-ins live
in ``pathrobust/suites/``; installed packages use the entry-point group ``pathrobust.suites``;
a one-off suite is named as ``pkg.module:Class`` or ``path/to/file.py:Class``). It declares:

* ``name``, a one-line ``summary``, a ``description`` and ``examples`` for ``--help``;
* ``Protocol``: a dataclass of its TOML tables (``suites/<name>.toml``), loaded and validated
  by :mod:`pathrobust.config` (defaults live in the TOML only);
* ``Options``: a dataclass of its own run options (fields made with :func:`option`; the CLI
  builds ``pathrobust run <name>`` from them and the common options, declared once);
* how to build its synthetic default data, open real data, and ``evaluate`` a run into a
  :class:`SuiteResult`.

The TOML also holds ``[leaderboard]`` (how reports rank and show the suite; see
:class:`LeaderboardSpec`) and ``[demo]`` (what ``pathrobust demo`` runs; :class:`DemoSpec`).

:func:`run_suite` owns everything suites share: the encoder, device and precision, the one
feature cache (:class:`pathrobust.extract.FeatureCache`), the run directory and its lock,
provenance, the results-DB rows, and the run's log (a failure's one-line error included).
A run's id hashes what changes its numbers, so rerunning the same thing finds the same
directory: a finished run is reused (and says so), an interrupted one resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pathrobust import atomic, locks
from pathrobust.config import from_dict, one_of, read_toml, to_dict
from pathrobust.errors import UserError
from pathrobust.store import DB_FILENAME, ResultsDB, RunRecord, environment, run_dir_for

SUITE_DIR = Path(__file__).resolve().parents[1] / "configs" / "suites"
ENTRY_POINT_GROUP = "pathrobust.suites"
SUMMARY = "summary.json"
LOCK = ".lock"
ROLES = ("robustness", "accuracy")


# -- the [leaderboard] and [demo] tables -------------------------------------------------------
@dataclass(frozen=True)
class Column:
    metric: str   # metric name (kind "metrics") or canonical task name (kind "tasks")
    label: str

    @property
    def key(self) -> str:
        return self.metric


@dataclass(frozen=True)
class ScatterPlot:
    """A scatter of two metrics of the suite's measured rows."""

    name: str
    title: str
    x: str
    y: str | list[str]          # several metrics: their mean
    xlabel: str
    ylabel: str


@dataclass(frozen=True)
class BarPanel:
    """Grouped bars per measured row: ``metrics`` (labelled ``labels``), with optional
    ``errors`` metrics drawn as ± half their value (e.g. an IQR around a median)."""

    metrics: list[str]
    labels: list[str]
    ylabel: str
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class BarPlot:
    name: str
    title: str
    panels: list[BarPanel]


@dataclass(frozen=True)
class GridPlot:
    """A grid heatmap per measured row from a per-item table the run writes (``table`` in its
    run directory): the mean of ``value`` per (row key, column key) cell, where each table row
    counts once for every pair ``(rows[i], cols[i])`` of its key columns."""

    name: str
    title: str
    table: str
    value: str
    rows: list[str]
    cols: list[str]
    row_label: str
    col_label: str
    vmin: float = 0.0
    vmax: float = 1.0


@dataclass(frozen=True)
class Artefact:
    """A file each run of the suite writes into its run directory, shown by reports."""

    file: str
    title: str


@dataclass(frozen=True)
class LeaderboardSpec:
    """How reports rank and show a suite (``[leaderboard]`` of its TOML).

    ``kind = "metrics"``: one DB row per run (task ``""``); ``rank_metric`` ranks, ``columns``
    are metrics of that row. ``kind = "tasks"``: one row per task plus ``rank_task`` (the
    average); columns are the tasks' ``task_metric`` (± ``task_std``)."""

    title: str
    short: str  # column heading of the suite in the overall table and axis labels ("PLISM")
    role: str = field(metadata=one_of(*ROLES))
    kind: str = field(metadata=one_of("metrics", "tasks"))
    rule: str
    rank_metric: str = ""
    direction: str = field(default="higher", metadata=one_of("higher", "lower"))
    columns: list[Column] = field(default_factory=list)
    ci: list[str] = field(default_factory=list)
    task_metric: str = ""
    task_std: str = ""
    rank_task: str = ""
    task_order: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)
    # tasks scored with another metric (e.g. Dice of segmentation tasks): a row of such a task
    # records ``separate_metric`` instead of ``task_metric``; its column is labelled
    # "<task> (<separate_label>)" and it never enters the average; ``separate_tasks`` names
    # them in published tables
    separate_tasks: list[str] = field(default_factory=list)
    separate_metric: str = ""
    separate_std: str = ""
    separate_label: str = ""
    # a suite may also speak for the other role with one metric of its ranked row (e.g. a
    # slide-level suite: balanced accuracy ranks it, its mean CCC is robustness)
    secondary_role: str = field(default="", metadata=one_of("", *ROLES))
    secondary_metric: str = ""
    secondary_label: str = ""
    published: str = ""  # file of published rows, relative to the TOML
    scatter: list[ScatterPlot] = field(default_factory=list)
    bars: list[BarPlot] = field(default_factory=list)
    grids: list[GridPlot] = field(default_factory=list)
    artefacts: list[Artefact] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind == "metrics" and not self.rank_metric:
            raise UserError("'leaderboard.rank_metric' is missing (required for kind = \"metrics\")")
        if self.kind == "tasks" and not (self.task_metric and self.rank_task):
            raise UserError("'leaderboard.task_metric' and 'leaderboard.rank_task' are required for kind = \"tasks\"")
        if self.secondary_role and (self.secondary_role == self.role or not self.secondary_metric):
            raise UserError("'leaderboard.secondary_role' needs another role than 'role' and a 'secondary_metric'")
        if self.ci and len(self.ci) != 2:
            raise UserError("'leaderboard.ci' must name two metrics, [low, high]")

    @property
    def score_label(self) -> str:
        if self.kind == "metrics":
            return next((c.label for c in self.columns if c.metric == self.rank_metric), self.rank_metric)
        return self.rank_task.capitalize()

    def canonical_task(self, task: str) -> str:
        """``crc`` -> ``CRC``, ``LUNG`` -> ``LUAD``: the name published tables use."""
        for name in self.task_order:
            if name.lower() == task.lower():
                return name
        lowered = {k.lower(): v for k, v in self.aliases.items()}
        return lowered.get(task.lower(), task)

    def task_sort_key(self, task: str) -> tuple[int, str]:
        order = {t: i for i, t in enumerate(self.task_order)}
        return (order.get(task, len(order)), task)


@dataclass(frozen=True)
class DemoRun:
    synthetic: dict[str, Any] = field(default_factory=dict)  # overrides of the suite's [synthetic]
    options: dict[str, Any] = field(default_factory=dict)    # run options (Options fields)


@dataclass(frozen=True)
class DemoSpec:
    """``[demo]``: what ``pathrobust demo`` runs (``quick`` = the tests' reduced setting)."""

    order: int
    full: DemoRun = field(default_factory=DemoRun)
    quick: DemoRun = field(default_factory=DemoRun)


# -- options -------------------------------------------------------------------------------------
def option(flag: str, help: str, default: Any = None, *, names: Sequence[str] = (), parse: Callable | None = None,
           invert: bool = False, min: float | None = None, variant: bool = True, metavar: str | None = None):
    """A suite run option: a dataclass field that ``pathrobust run <suite>`` shows as ``flag``.

    ``parse`` turns the command-line string into the value (e.g. ``"1,3,5"`` -> ``(1, 3, 5)``);
    ``invert`` makes a ``--no-x`` flag set the field to False; ``variant`` marks options that
    change the protocol (a non-default value labels the run a variant)."""
    meta = {"flag": flag, "names": tuple(names), "help": help, "parse": parse, "invert": invert, "min": min,
            "variant": variant, "metavar": metavar}
    return field(default=default, metadata={"cli": meta})


@dataclass(frozen=True)
class NoOptions:
    pass


def options_variant(options: Any) -> str:
    """Label of the options that depart from the reference protocol ('' = reference):
    ``name=value`` for each variant option that differs from its default."""
    if isinstance(getattr(type(options), "variant", None), property):  # the suite's own label
        return options.variant
    parts = []
    for f in dataclasses.fields(options):
        meta = f.metadata.get("cli", {})
        value = getattr(options, f.name)
        if meta.get("variant", False) and value != f.default:
            parts.append(f.name if isinstance(value, bool) else f"{f.name}={_compact(value)}")
    return ",".join(parts)


def _compact(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(map(str, value))
    return str(value)


# -- results -------------------------------------------------------------------------------------
@dataclass
class TaskRow:
    """One results-DB row: a task (``""`` for a suite with one row per run) and its metrics."""

    task: str
    metrics: dict[str, float | None]
    options: dict[str, Any] = field(default_factory=dict)
    data_fingerprint: str | None = None  # a task's own data (default: the run's)


@dataclass
class SuiteResult:
    """What every suite's ``evaluate`` returns.

    ``headline`` is the number the suite is ranked by (with ``ci`` when it has one);
    ``rows`` become results-DB rows; ``tables`` are per-item tables written as
    ``<name>.csv`` in the run directory; ``summary`` is the suite's own JSON summary;
    ``artefacts`` maps a name to a file the suite wrote into the run directory."""

    headline: float | None
    rows: list[TaskRow]
    summary: dict[str, Any] = field(default_factory=dict)
    ci: tuple[float | None, float | None] | None = None
    tables: dict[str, Any] = field(default_factory=dict)
    artefacts: dict[str, str] = field(default_factory=dict)


# -- the suite -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeaturesMode:
    """A suite that can read precomputed features instead of running ``--model``."""

    help: str
    names: tuple[str, ...] = ("--features",)
    needs_data: bool = False  # the data is still needed (labels, splits) beside the features


@dataclass
class Features:
    """Precomputed features opened by a suite: the object ``evaluate`` reads, the model label
    to record, their fingerprint, and what they say about the encoder (RunRecord fields)."""

    value: Any
    label: str
    fingerprint: str
    record: dict[str, Any] = field(default_factory=dict)


class Suite:
    """Base class of every suite (see the module doc)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    description: ClassVar[str] = ""
    examples: ClassVar[tuple[str, ...]] = ()
    data_help: ClassVar[str] = "Data root in the suite's layout. Default: the synthetic set, built once into the cache."
    features: ClassVar[FeaturesMode | None] = None
    Protocol: ClassVar[type]
    Options: ClassVar[type] = NoOptions
    toml: ClassVar[Path | None] = None  # default: pathrobust's suites/<name>.toml

    def __init__(self, protocol: Any, leaderboard: LeaderboardSpec, demo: DemoSpec | None, source: Path) -> None:
        self.protocol = protocol
        self.leaderboard = leaderboard
        self.demo = demo
        self.source = source

    # data ---------------------------------------------------------------------------------------
    def build_synthetic(self, root: Path, overrides: Mapping[str, Any], progress: bool) -> Path:
        """Write the suite's synthetic dataset (protocol ``[synthetic]`` + ``overrides``) at
        ``root`` and return the data path; reuse it when it is already there."""
        raise UserError(f"suite {self.name}: no synthetic data; pass --data")

    def default_data(self, progress: bool) -> Path:
        """The synthetic set, built once into the cache."""
        from pathrobust.cache import cache_dir

        params = json.dumps(to_dict(getattr(self.protocol, "synthetic", None)), sort_keys=True)
        key = hashlib.sha256(params.encode()).hexdigest()[:12]
        return self.build_synthetic(cache_dir(f"synth-{self.name}", key), {}, progress)

    def open_data(self, path: Path, options: Any, embed: bool) -> Any:
        """Read (and validate) the dataset at ``path``; the object goes to :meth:`evaluate`.
        ``embed``: an encoder will embed its tiles (False with precomputed features)."""
        raise NotImplementedError

    def data_fingerprint(self, path: Path, data: Any, options: Any) -> str:
        """Content identity of what the run reads (:mod:`pathrobust.data.identity`)."""
        from pathrobust.data.identity import fingerprint_tree

        return fingerprint_tree(path)

    def open_features(self, path: Path, data: Any, options: Any) -> Features:
        """Features mode: read the precomputed features at ``path``."""
        raise UserError(f"suite {self.name}: no precomputed-features mode")

    # protocol -----------------------------------------------------------------------------------
    def identity(self, options: Any) -> dict[str, Any]:
        """What changes the numbers (part of the run id): the protocol but its synthetic data
        (identified by its fingerprint instead), and the options."""
        proto = to_dict(self.protocol)
        proto.pop("synthetic", None)
        return {"protocol": proto, "options": to_dict(options)}

    def evaluate(self, ctx: RunContext) -> SuiteResult:
        raise NotImplementedError


@dataclass(frozen=True)
class SuiteConfig:
    leaderboard: LeaderboardSpec
    demo: DemoSpec | None = None


_REGISTRY: dict[str, type[Suite]] = {}
_LOADED = {"builtins": False, "entry_points": False}


def register_suite(cls: type[Suite]) -> type[Suite]:
    """Class decorator: make ``cls`` available as ``pathrobust run <cls.name>``."""
    if not (isinstance(cls, type) and issubclass(cls, Suite)) or not cls.name:
        raise TypeError("register_suite expects a Suite subclass with a name")
    known = _REGISTRY.get(cls.name)
    if known is not None and known is not cls and known.__qualname__ != cls.__qualname__:
        raise ValueError(f"suite '{cls.name}' is already registered by {known.__module__}.{known.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    if _LOADED["builtins"]:
        return
    _LOADED["builtins"] = True
    import importlib
    import pkgutil

    import pathrobust.suites as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")


def _load_entry_points() -> None:
    if _LOADED["entry_points"]:
        return
    _LOADED["entry_points"] = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
            register_suite(cls)
        except Exception as exc:  # a broken plugin must not take the CLI down
            print(f"warning: suite plugin '{ep.name}' ({ep.value}) failed to load: {exc}", file=sys.stderr)


def suite_classes() -> dict[str, type[Suite]]:
    """Every registered suite class by name: built-ins first, then plugins."""
    _load_builtins()
    _load_entry_points()
    return dict(_REGISTRY)


def suite_class(name: str) -> type[Suite]:
    """A registered suite, or ``pkg.module:Class`` / ``file.py:Class``."""
    if ":" in name:
        from pathrobust.registry import import_object

        cls = import_object(name, option="suite")
        return register_suite(cls)
    classes = suite_classes()
    if name not in classes:
        raise UserError(f"suite {name}: unknown (known: {', '.join(classes)})")
    return classes[name]


def suite_toml(cls: type[Suite]) -> Path:
    return Path(cls.toml) if cls.toml else SUITE_DIR / f"{cls.name}.toml"


def load_suite(name: str | type[Suite], protocol: str | Path | None = None) -> Suite:
    """Instantiate a suite with its protocol (``protocol``: another TOML of the same shape)."""
    cls = suite_class(name) if isinstance(name, str) else name
    path = Path(protocol) if protocol else suite_toml(cls)
    data = read_toml(path)
    leaderboard = from_dict(LeaderboardSpec, data.pop("leaderboard", {}), str(path), "leaderboard.")
    demo = from_dict(DemoSpec, data.pop("demo"), str(path), "demo.") if "demo" in data else None
    proto = from_dict(cls.Protocol, data, str(path))
    return cls(proto, leaderboard, demo, path)


def list_suites() -> list[Suite]:
    """Every registered suite, loaded with its protocol."""
    return [load_suite(cls) for cls in suite_classes().values()]


def make_options(suite: Suite, values: Mapping[str, Any]) -> Any:
    """The suite's Options from keyword values (unknown names are one-line errors)."""
    names = {f.name for f in dataclasses.fields(suite.Options)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"run {suite.name}: unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    return suite.Options(**values)


# -- the run -------------------------------------------------------------------------------------
def run_key(config: Mapping[str, Any]) -> str:
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def encoder_record_fields(encoder, precision: str) -> dict[str, Any]:
    """The RunRecord fields that describe the encoder of a run, its throughput included."""
    fields: dict[str, Any] = dict(spec_hash=encoder.spec.hash, pooling=encoder.pooling, precision=precision,
                                  input_size=encoder.spec.input_size, params=encoder.spec.params,
                                  weights_sha256=encoder.weights_sha256 or "")
    if encoder.tiles_per_second is not None:
        fields["timings"] = {"tiles_per_s": round(encoder.tiles_per_second, 2)}
    return fields


class SuiteRun:
    """A run directory ``<out>/<suite>/<model>/<run-id>/`` with ``config.json``, ``log.txt``,
    ``provenance.json``, ``launch.json`` (what ``pathrobust merge`` reruns) and, once
    finished, ``summary.json`` and rows in the results DB.

    Every process of a launch (torchrun ranks, job-array shards) and any concurrent launch
    of the same run open it together and append to its log (lines tagged ``rank i/n`` or
    ``shard i/n``); their work is shared item by item under the items' own locks (feature
    chunks, PLISM pairs). Completing the run — evaluating and writing the summary and DB
    rows — happens under the run's lock (:meth:`completing`): one process at a time, and a
    second one waits, then finds the run finished."""

    def __init__(self, out: str | Path, suite: str, model: str, config: Mapping[str, Any],
                 provenance: Mapping[str, Any] | None = None, db_path: str | Path | None = None,
                 team: Any = None) -> None:
        from pathrobust.dist import Team

        self.out = Path(out)
        self.suite = suite
        self.model = model
        self.config = dict(config)
        self.run_id = run_key({"suite": suite, "model": model, **self.config})
        self.dir = run_dir_for(self.out, suite, model, self.run_id)
        self.db_path = Path(db_path) if db_path else self.out / DB_FILENAME
        self.provenance = {**(provenance or {}), "environment": environment()}
        self.team = team or Team()
        self.started = time.perf_counter()
        self.log = logging.getLogger(f"pathrobust.{suite}.{self.run_id}")
        self._lock: Path | None = None

    def open(self) -> SuiteRun:
        """Create the directory, write config and provenance (the main process), start the log."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise atomic.disk_error(exc, self.dir) or UserError(f"{self.dir}: cannot create ({exc.strerror})") from None
        if self.team.lead:
            atomic.write_json(self.dir / "config.json", self.config)
            atomic.write_json(self.dir / "provenance.json", self.provenance)
        self.log.setLevel(logging.INFO)
        if not self.log.handlers:
            handler = logging.FileHandler(self.dir / "log.txt")
            tag = f"[{self.team.label()}] " if self.team.label() else ""
            handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {tag}%(message)s"))
            self.log.addHandler(handler)
        if self.team.lead:
            self.log.info("run %s: suite=%s model=%s config=%s", self.run_id, self.suite, self.model,
                          json.dumps(self.config, default=str))
        return self

    def close(self) -> None:
        for handler in list(self.log.handlers):
            handler.close()
            self.log.removeHandler(handler)
        if self._lock is not None:
            locks.release(self._lock)
            self._lock = None

    def __enter__(self) -> SuiteRun:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def completing(self, say: Callable[[str], None] | None = None, poll: float = 1.0) -> Iterator[None]:
        """Hold the run's lock while evaluating and finishing; while another live process
        holds it (another launch completing the same run), wait for it. The lock's heartbeat
        is kept fresh, so a holder that died on another host is taken over after
        :data:`pathrobust.locks.ITEM_STALE_AFTER_S` seconds."""
        lock = self.dir / LOCK
        told = False
        while not locks.try_acquire(lock, locks.ITEM_STALE_AFTER_S):
            if not told and say is not None:
                owner = locks.owner(lock) or {}
                say(f"another process (pid {owner.get('pid')} on {owner.get('host')}) is completing {self.dir}; "
                    "waiting for it")
                told = True
            time.sleep(poll)
        self._lock = lock
        try:
            with locks.Heartbeat() as heartbeat:
                heartbeat.add(lock)
                yield
        finally:
            locks.release(lock)
            self._lock = None

    @property
    def finished(self) -> bool:
        return (self.dir / SUMMARY).is_file()

    def summary(self) -> dict[str, Any]:
        return json.loads((self.dir / SUMMARY).read_text())

    def finish(self, summary: Mapping[str, Any], records: list[RunRecord]) -> dict[str, Any]:
        """Write ``summary.json`` and record each row (one per task) in the results DB."""
        wall = time.perf_counter() - self.started
        summary = {**summary, "run_id": self.run_id, "run_dir": str(self.dir), "provenance": self.provenance}
        db = ResultsDB(self.db_path)
        for rec in records:
            rec.run_dir = str(self.dir)
            rec.environment = self.provenance["environment"]
            rec.timings = {"wall_s": round(wall, 3), **rec.timings}
            if not rec.run_id or rec.run_id == "auto":
                rec.run_id = f"{self.run_id}:{rec.task}" if rec.task else self.run_id
        db.record_many(records)
        atomic.write_json(self.dir / SUMMARY, summary)
        self.log.info("finished in %.1fs", wall)
        return summary


@dataclass
class RunContext:
    """What :meth:`Suite.evaluate` gets: the suite's protocol and options, the opened data
    (or precomputed features), the encoder with its feature cache, and the run.

    ``team`` (:class:`pathrobust.dist.Team`): under torchrun, ``evaluate`` runs on rank 0
    while the other ranks serve; the feature cache already splits every extraction among
    them, and a suite may split more of its own work with ``team.together(fn, ...)``."""

    suite: Suite
    options: Any
    run: SuiteRun
    data: Any = None
    data_path: Path | None = None
    features: Any = None           # features mode: what Suite.open_features returned
    encoder: Any = None
    cache: Any = None              # pathrobust.extract.FeatureCache when an encoder runs
    precision: str = ""
    device: Any = None
    batch_size: int = 64
    workers: int = 0
    progress: bool = True
    overwrite: bool = False
    team: Any = None               # pathrobust.dist.Team (one process when None)

    @property
    def protocol(self) -> Any:
        return self.suite.protocol

    @property
    def dir(self) -> Path:
        return self.run.dir

    @property
    def log(self) -> logging.Logger:
        return self.run.log


def resolve_data(data: str | Path | None) -> Path | None:
    """``--data``: a path, or the name of a fetched dataset (``pathrobust data fetch``)."""
    if data is None:
        return None
    from pathrobust.hub import resolve_data as resolve_fetched

    return Path(resolve_fetched(data))


def run_suite(name: str | type[Suite], model: Any = None, data: str | Path | None = None,
              out: str | Path = "runs", *, features: str | Path | None = None, pooling: str | None = None,
              weights: str | None = None, device: str = "auto", precision: str = "auto", batch_size: int = 64,
              workers: int = 0, overwrite: bool = False, progress: bool = True, protocol: str | Path | None = None,
              db_path: str | Path | None = None, say: Callable[[str], None] | None = None,
              trust_code: bool = False, shard: str | tuple[int, int] | None = None,
              merge_into: str | Path | None = None, **options: Any) -> dict[str, Any] | None:
    """Run suite ``name`` on ``model`` (or on precomputed ``features``) and return its summary.

    Args:
        name: a registered suite (``plism``, ``hest``, ``eva``...), ``module:Class`` or a class.
        model: a registered encoder name, ``module:factory``, ``file.py:factory``, a distilled
            model directory, an :class:`~pathrobust.EncoderSpec`, an :class:`~pathrobust.Encoder`
            or a plain ``nn.Module`` (see :func:`pathrobust.build_encoder`).
        data: the dataset (path or fetched name); default: the suite's synthetic set.
        out: runs folder (``<out>/<suite>/<model>/<run-id>/`` and ``<out>/results.sqlite``).
        features: precomputed features in the suite's layout instead of ``model``.
        trust_code: let a model folder's files name code beyond torch/timm/pathrobust layers.
        shard: ``"i/n"`` (or ``"slurm"``): this process is shard ``i`` of a job array of ``n``:
            it embeds its share of the suite's tile sources, leaves a marker, and the last
            shard (or ``pathrobust merge RUN_DIR``) completes the run.
        merge_into: ``pathrobust merge``: the run directory this call must complete (an error
            when the model or data changed since the shards ran, instead of a new run).
        **options: the suite's own options (``pathrobust run <suite> --help``).

    Under ``torchrun`` every rank calls this: extraction is split among the ranks, rank 0
    evaluates and records the run; the other ranks return None. A shard whose run is not
    complete yet returns ``{"shard": "i/n", "missing_shards": [...], "run_dir": ...}``.

    The summary is also ``summary.json`` in the run directory; a finished run with the same
    configuration is returned as it is unless ``overwrite``."""
    from pathrobust.dist import join

    say = say or (lambda message: None)
    if shard is not None and overwrite:
        from pathrobust.dist import parse_shard

        if parse_shard(shard) if isinstance(shard, str) else shard:
            raise UserError("--overwrite with --shard: each shard would remove the others' work; remove the run "
                            "directory (or the files to redo) first, then start the shards")
    team = join(shard, device)
    try:
        return _run_suite(team, name, model, data, out, features=features, pooling=pooling, weights=weights,
                          device=device, precision=precision, batch_size=batch_size, workers=workers,
                          overwrite=overwrite, progress=progress, protocol=protocol, db_path=db_path, say=say,
                          trust_code=trust_code, merge_into=merge_into, options=options)
    finally:
        team.close()


def _run_suite(team, name, model, data, out, *, features, pooling, weights, device, precision, batch_size, workers,
               overwrite, progress, protocol, db_path, say, trust_code, merge_into, options) -> dict[str, Any] | None:
    suite = load_suite(name, protocol)
    opts = options.pop("options", None) or make_options(suite, options)
    if not team.lead:
        say = lambda message: None  # noqa: E731 - one voice per launch
        progress = False
    out = Path(out)
    features_path = Path(features) if features is not None else None
    if features_path is not None and suite.features is None:
        raise UserError(f"--features: suite {suite.name} has no precomputed-features mode")
    flag = suite.features.names[0] if suite.features else "--features"
    if features_path is not None and model is not None and not isinstance(model, str):
        raise UserError(f"run {suite.name}: give exactly one of --model and {flag}")
    if features_path is None and model is None:
        raise UserError(f"run {suite.name}: give exactly one of --model and {flag}" if suite.features
                        else "--model: required")

    # data
    needs_data = features_path is None or suite.features.needs_data
    data_path = resolve_data(data)
    if features_path is not None and data_path is not None and not suite.features.needs_data:
        raise UserError(f"{flag} and --data: give one, not both")
    if needs_data and data_path is None:
        data_path = suite.default_data(progress)
    if data_path is not None and not data_path.exists():
        raise UserError(f"--data {data_path}: does not exist")
    data_obj = suite.open_data(data_path, opts, embed=features_path is None) if needs_data else None
    data_fp = suite.data_fingerprint(data_path, data_obj, opts) if needs_data else ""

    from pathrobust.data.synthetic import synthetic_info

    synthetic = synthetic_info(data_path) if data_path is not None else None
    variant = options_variant(opts)
    provenance: dict[str, Any] = {"suite_config": str(suite.source), "protocol": to_dict(suite.protocol),
                                  "options": {**to_dict(opts), "variant": variant}}
    if data_path is not None:
        provenance["data"] = str(data_path.resolve())
    if synthetic is not None:
        provenance["synthetic"] = synthetic
    ctx = RunContext(suite=suite, options=opts, run=None, data=data_obj, data_path=data_path,  # type: ignore[arg-type]
                     batch_size=batch_size, workers=workers, progress=progress, overwrite=overwrite, team=team)
    record_fields: dict[str, Any] = {}
    if features_path is not None:
        opened = suite.open_features(features_path, data_obj, opts)
        ctx.features = opened.value
        model_name = model if isinstance(model, str) and model else opened.label
        data_fp = ":".join(filter(None, [data_fp, opened.fingerprint]))
        ident: dict[str, Any] = {"features": opened.fingerprint}
        provenance["features"] = str(features_path.resolve())
        record_fields.update(opened.record)
    else:
        from pathrobust.devices import resolve_device, resolve_precision
        from pathrobust.dist import local_device
        from pathrobust.encoders.base import build_encoder

        dev = resolve_device(local_device(device))
        encoder = build_encoder(model, pooling=pooling, weights=weights, device=dev, trust_code=trust_code)
        precision = resolve_precision(precision, dev, encoder.spec.precision)
        model_name = encoder.name
        ident = {"spec_hash": encoder.spec.hash, "pooling": encoder.pooling, "precision": precision,
                 "weights_sha256": encoder.weights_sha256 or ""}
        provenance["encoder"] = encoder.provenance()
        ctx.encoder, ctx.device, ctx.precision = encoder, dev, precision
        record_fields.update(encoder_record_fields(encoder, precision))
    config = {**ident, "data_fingerprint": data_fp, **suite.identity(opts)}
    label = model_name + (f"[{variant}]" if variant else "")
    run = SuiteRun(out, suite.name, label, config, provenance, db_path=db_path, team=team)
    ctx.run = run
    if merge_into is not None and Path(merge_into).resolve() != run.dir.resolve():
        raise UserError(f"merge {merge_into}: its model, data or protocol changed since the shards ran (this "
                        f"configuration is run {run.run_id}); run the shards again")
    if features_path is None:
        from pathrobust.extract import FeatureCache

        ctx.cache = FeatureCache(out / suite.name / _safe(model_name) / "embeddings", ctx.encoder, ctx.precision,
                                 ctx.device, batch_size=batch_size, workers=workers, progress=progress, team=team,
                                 log=run.log)
    if team.broadcast(run.finished and not overwrite):
        say(f"reusing the finished run {run.dir} (same model, data and protocol; --overwrite to redo it)")
        return run.summary() if team.lead else None
    with run:
        if team.lead:
            from pathrobust import shards

            shards.write_launch(run.dir, shards.suite_launch(name, model, data, out, features, pooling, weights,
                                                             device, precision, batch_size, workers, protocol,
                                                             db_path, trust_code, opts))
        if team.kind == "shard":
            missing = _run_shard(ctx, team, say)
            if missing:
                return {"shard": f"{team.index}/{team.size}", "missing_shards": missing, "run_dir": str(run.dir)}
            from pathrobust.dist import Team

            team = ctx.team = Team()  # the last shard completes the run alone
            if ctx.cache is not None:
                ctx.cache.team = team
                team.handlers["feature-cache.embed"] = ctx.cache._embed_together
        if team.ranks and not team.is_main:
            team.serve()  # rank 0 evaluates; this rank computes its share of what it sends
            return None
        try:
            with run.completing(say):
                if run.finished and not overwrite:  # another launch completed it while we waited
                    say(f"reusing the finished run {run.dir} (completed by another process)")
                    return run.summary()
                return _evaluate_and_finish(ctx, suite, run, model_name, variant, data_fp, synthetic, record_fields)
        finally:
            team.stop()


def _evaluate_and_finish(ctx: RunContext, suite: Suite, run: SuiteRun, model_name: str, variant: str, data_fp: str,
                         synthetic: Any, record_fields: dict[str, Any]) -> dict[str, Any]:
    try:
        result = suite.evaluate(ctx)
    except UserError as exc:
        run.log.error("%s", exc)
        raise
    except KeyboardInterrupt:
        run.log.error("interrupted")
        raise
    if ctx.encoder is not None:  # throughput is known only after extraction
        record_fields.update(encoder_record_fields(ctx.encoder, ctx.precision))
    for table, frame in result.tables.items():
        atomic.write_csv(frame, run.dir / f"{table}.csv")
    summary = {"suite": suite.name, "model": model_name, "variant": variant,
               "headline": {"metric": suite.leaderboard.score_label, "value": result.headline,
                            "ci": list(result.ci) if result.ci else None},
               "data_fingerprint": data_fp, "synthetic": synthetic is not None,
               "rows": [{"task": row.task, "metrics": row.metrics} for row in result.rows],
               "artefacts": result.artefacts, **result.summary}
    records = [RunRecord(suite=suite.name, model=model_name, task=row.task, metrics=row.metrics,
                         data_fingerprint=row.data_fingerprint or data_fp,
                         options={**row.options, **({"variant": variant} if variant else {})},
                         synthetic=synthetic is not None, variant=variant, run_id="auto", **record_fields)
               for row in result.rows]
    return run.finish(summary, records)


def tile_sources(suite: Suite, data: Any, options: Any) -> list[tuple[str, Any]]:
    """The tile sources a suite will embed, with their feature-cache names, when they can be
    known before it runs (what job-array shards share): the suite's own
    ``tile_sources(data, options)`` when it defines one, else the data itself when it maps
    names to :class:`~pathrobust.data.tiles.TileSource` (PLISM's slides). Empty: unknown."""
    from pathrobust.data.tiles import TileSource

    hook = getattr(suite, "tile_sources", None)
    if callable(hook):
        return [(str(n), s) for n, s in hook(data, options)]
    if isinstance(data, Mapping) and data and all(isinstance(v, TileSource) for v in data.values()):
        return [(str(n), s) for n, s in data.items()]
    return []


def _run_shard(ctx: RunContext, team: Any, say: Callable[[str], None]) -> list[int]:
    """A job-array shard: embed its share of the suite's tile sources, leave its marker;
    returns the shards still missing (empty: this one completes the run)."""
    from pathrobust import shards
    from pathrobust.extract import extract_many

    run = ctx.run
    jobs = []
    if ctx.cache is not None:
        sources = tile_sources(ctx.suite, ctx.data, ctx.options)
        pieces = max(1, -(-team.size // max(1, len(sources))))
        jobs = [(ctx.cache.plan(source, name, pieces=pieces), name, source) for name, source in sources]
        if not sources:
            run.log.info("suite %s names no tile sources before it runs: this shard has nothing to share; "
                         "the merge embeds and evaluates everything", ctx.suite.name)
        extract_many(ctx.encoder, [j for j, _, _ in jobs], team=team, whole=False, num_workers=ctx.workers,
                     precision=ctx.precision, device=ctx.device, progress=ctx.progress, log=run.log)
        plan = shards.plan_digest([(name, ctx.cache.path(name).name, source) for _, name, source in jobs],
                                  {"run_id": run.run_id})
    else:
        plan = shards.plan_digest([], {"run_id": run.run_id})
    shards.write_marker(run.dir, team.index, team.size, plan)
    run.log.info("shard %d/%d finished its share", team.index, team.size)
    missing = shards.check_markers(run.dir)
    if missing:
        say(f"shard {team.index}/{team.size} done; waiting for shard(s) {', '.join(f'{i}/{team.size}' for i in missing)}: "
            f"the last one completes the run, or `pathrobust merge {run.dir}`")
    return missing


def _safe(name: str) -> str:
    from pathrobust.store import safe_name

    return safe_name(name)


def headline(summary: Mapping[str, Any]) -> float | None:
    """The headline score of a run's summary (what the suite is ranked by)."""
    value = (summary.get("headline") or {}).get("value")
    return None if value is None else float(value)


def iter_options(suite: Suite) -> Iterator[tuple[dataclasses.Field, dict[str, Any]]]:
    """The suite's CLI options: (field, cli metadata)."""
    for f in dataclasses.fields(suite.Options):
        yield f, f.metadata.get("cli", {})
