"""Leaderboard tables from recorded runs: one board per suite, an overall table, published rows.

Rules:

* A measured row is one configuration: (model, pooling, precision, input size, protocol
  options, data fingerprint). When the same configuration ran several times, its latest run
  is shown. Rows that differ in pooling or precision are therefore distinct.
* The suites' records of one run share a run group (their ``run_dir``, else the run id up to
  ``:``); a task suite's row gathers its tasks from that one run.
* Each suite ranks by its reference rule (``assets/leaderboards.toml``); rows without a score
  come last, unranked.
* Published rows (``assets/published.toml``) live in their own tables, never ranked with
  measured rows. For task suites their score is the mean over the tasks measured here when
  those are a subset of the published ones (so the comparison is like for like), else the
  published average.
* Overall: one row per (model, pooling, precision, input size, synthetic data or not), each
  suite's score from that key's latest run (ties: the larger run id); "accuracy" is the mean
  of the scores of the suites whose leaderboard role is accuracy, "robustness" of those whose
  role is robustness (of the suites the report shows; "—" unless the row has all of them);
  rows are ranked by their mean rank over the suites they appear in (more suites first on ties).
* Rows measured on pathrobust's synthetic data carry ``synthetic=True``; every writer labels
  them, and plots never put them on the axes of published (real-benchmark) results.

Suites are known only through their declared leaderboards (:mod:`.definitions`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pathrobust.errors import UserError
from pathrobust.reports.definitions import Column, LeaderboardSpec, PublishedSuite, leaderboard_defs, published_results
from pathrobust.store import RunRecord


@dataclass
class Row:
    """One leaderboard row (measured or published)."""

    kind: str  # "measured" | "published"
    model: str
    pooling: str = ""
    precision: str = ""
    input_size: int | None = None
    params: int | None = None
    score: float | None = None
    values: dict[str, float | None] = field(default_factory=dict)  # column key -> value
    stds: dict[str, float | None] = field(default_factory=dict)
    rank: int | None = None
    ci: tuple[float | None, float | None] | None = None
    tiles_per_s: float | None = None
    wall_s: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    data_fingerprint: str = ""
    spec_hash: str = ""
    weights_sha256: str = ""
    run_id: str = ""
    run_dir: str = ""
    created_at: str = ""
    environment: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float | None] = field(default_factory=dict)  # measured: every metric of the ranked record
    source: str = ""  # published rows: where the numbers come from
    synthetic: bool = False  # measured on pathrobust's synthetic data
    variant: str = ""  # protocol options departing from the reference

    @property
    def protocol(self) -> str:
        """The run's protocol options as ``key=value, ...`` (empty: the suite's defaults)."""
        return ", ".join(f"{k}={_compact(v)}" for k, v in sorted(self.options.items()))


@dataclass
class SuiteBoard:
    suite: str
    title: str
    rule: str
    columns: list[Column]
    rows: list[Row]
    published: list[Row]
    published_columns: list[Column]
    published_source: str = ""
    published_protocol: str = ""
    published_digits: int = 3
    published_score_note: str = ""
    score_label: str = "Score"
    role: str = "accuracy"
    short: str = ""
    ci: bool = False
    spec: LeaderboardSpec | None = None


@dataclass
class OverallRow:
    model: str
    pooling: str
    precision: str
    input_size: int | None
    kind: str = "measured"
    params: int | None = None
    scores: dict[str, float | None] = field(default_factory=dict)
    accuracy: float | None = None
    mean_rank: float | None = None
    rank: int | None = None
    tiles_per_s: float | None = None
    robustness: float | None = None
    synthetic: bool = False


@dataclass
class Report:
    boards: list[SuiteBoard]
    overall: list[OverallRow]
    published_overall: list[OverallRow]
    suites: list[str]
    titles: dict[str, str]
    roles: dict[str, str] = field(default_factory=dict)
    shorts: dict[str, str] = field(default_factory=dict)

    secondary: dict[str, tuple[str, str]] = field(default_factory=dict)  # suite -> (role, label)

    def role_suites(self, role: str) -> list[str]:
        """The suites that count in a role (ranked in it, or speaking for it with a secondary metric)."""
        return [s for s in self.suites if self.roles.get(s) == role or self.secondary.get(s, ("",))[0] == role]

    def role_name(self, suite: str, role: str) -> str:
        """How a suite is named where it counts in ``role`` (its short name, plus the secondary
        metric's label when that is how it counts)."""
        if self.roles.get(suite) != role and suite in self.secondary:
            return f"{self.shorts[suite]} {self.secondary[suite][1]}".strip()
        return self.shorts[suite]

    @property
    def synthetic(self) -> bool:
        """Whether any measured row ran on synthetic data."""
        return any(r.synthetic for b in self.boards for r in b.rows)


def _compact(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _group_id(rec: RunRecord) -> str:
    return rec.run_dir or rec.run_id.split(":")[0]


def _config_key(rec: RunRecord) -> tuple:
    return (rec.model, rec.pooling, rec.precision, rec.input_size,
            json.dumps(dict(rec.options), sort_keys=True, default=str), rec.data_fingerprint, rec.synthetic)


def _base_row(rec: RunRecord, group: list[RunRecord]) -> Row:
    tiles = next((_finite(r.timings.get("tiles_per_s")) for r in group if r.timings.get("tiles_per_s") is not None), None)
    walls = [_finite(r.timings.get("wall_s")) for r in group if r.timings.get("wall_s") is not None]
    return Row(kind="measured", model=rec.model, pooling=rec.pooling, precision=rec.precision,
               input_size=rec.input_size, params=rec.params, tiles_per_s=tiles,
               wall_s=max((w for w in walls if w is not None), default=None), options=dict(rec.options),
               data_fingerprint=rec.data_fingerprint, spec_hash=rec.spec_hash, weights_sha256=rec.weights_sha256,
               run_id=rec.run_id.split(":")[0], run_dir=rec.run_dir,
               created_at=max(r.created_at for r in group), environment=dict(rec.environment),
               synthetic=bool(rec.synthetic), variant=rec.variant)


def _latest_groups(records: list[RunRecord]) -> list[list[RunRecord]]:
    """Group records by run, then keep each configuration's latest run."""
    groups: dict[str, list[RunRecord]] = {}
    for rec in records:
        groups.setdefault(_group_id(rec), []).append(rec)
    latest: dict[tuple, list[RunRecord]] = {}
    for group in groups.values():
        key = _config_key(group[0])
        stamp = (max(r.created_at for r in group), _group_id(group[0]))
        if key not in latest or stamp > (max(r.created_at for r in latest[key]), _group_id(latest[key][0])):
            latest[key] = group
    return list(latest.values())


def _rank(rows: list[Row], d: LeaderboardSpec) -> list[Row]:
    sign = -1.0 if d.direction == "higher" else 1.0
    rows.sort(key=lambda r: (r.score is None, sign * (r.score or 0.0), r.model, r.pooling, r.precision, r.run_id))
    for i, row in enumerate(rows):
        row.rank = i + 1 if row.score is not None else None
    return rows


def _metrics_board(suite: str, d: LeaderboardSpec, records: list[RunRecord],
                   published: PublishedSuite | None) -> SuiteBoard:
    rows = []
    for group in _latest_groups(records):
        rec = next((r for r in group if not r.task), group[0])
        row = _base_row(rec, group)
        row.values = {c.key: _finite(rec.metrics.get(c.key)) for c in d.columns}
        row.metrics = {k: _finite(v) for k, v in rec.metrics.items()}
        row.score = _finite(rec.metrics.get(d.rank_metric))
        if d.ci:
            low, high = (_finite(rec.metrics.get(k)) for k in d.ci)
            row.ci = (low, high) if low is not None or high is not None else None
        rows.append(row)
    pub_rows = []
    if published:
        for p in published.rows:
            pub_rows.append(Row(kind="published", model=p.model, pooling=p.pooling, params=p.params,
                                score=p.values.get(d.rank_metric), source=p.source,
                                values={c.key: p.values.get(c.key) for c in d.columns}))
    columns = [c for c in d.columns if c.key != d.rank_metric]
    return SuiteBoard(suite, d.title, d.rule, columns, _rank(rows, d), _rank(pub_rows, d), columns,
                      published.source if published else "", published.protocol if published else "",
                      published.digits if published else 3, score_label=d.score_label, role=d.role,
                      short=d.short, ci=bool(d.ci), spec=d)


def _tasks_board(suite: str, d: LeaderboardSpec, records: list[RunRecord],
                 published: PublishedSuite | None) -> SuiteBoard:
    rows, measured_tasks, real_tasks, separate = [], set(), set(), set(d.separate_tasks)
    for group in _latest_groups(records):
        rank_rec = next((r for r in group if r.task == d.rank_task), None)
        row = _base_row(rank_rec or group[0], group)
        for rec in group:
            if rec.task == d.rank_task:
                continue
            task = d.canonical_task(rec.task)
            if d.separate_metric and d.task_metric not in rec.metrics and d.separate_metric in rec.metrics:
                separate.add(task)
                metric, std = d.separate_metric, d.separate_std
            else:
                metric, std = d.task_metric, d.task_std
            row.values[task] = _finite(rec.metrics.get(metric))
            row.stds[task] = _finite(rec.metrics.get(std)) if std else None
            measured_tasks.add(task)
            if not rec.synthetic:
                real_tasks.add(task)
        if rank_rec is not None:
            row.score = _finite(rank_rec.metrics.get(d.task_metric))
            row.stds["_score"] = _finite(rank_rec.metrics.get(d.task_std))
            row.metrics = {k: _finite(v) for k, v in rank_rec.metrics.items()}
        else:  # no average recorded: the same rule over the tasks present
            row.score = _mean(v for t, v in row.values.items() if t not in d.excluded and t not in separate)
        rows.append(row)

    def column(task: str) -> Column:
        return Column(task, f"{task} ({d.separate_label})" if task in separate and d.separate_label else task)

    def order(tasks):  # the main metric's tasks first, the separately scored ones after
        return sorted(tasks, key=lambda t: (t in separate, *d.task_sort_key(t)))

    columns = [column(t) for t in order(measured_tasks)]

    pub_rows, note, pub_columns = [], "", []
    if published:
        pub_tasks = {t for p in published.rows for t in p.values if t != d.rank_task}
        pub_columns = [column(t) for t in order(pub_tasks)]
        # like for like: the real benchmark's tasks measured here (synthetic tasks are not those)
        compare = sorted(((real_tasks & pub_tasks) - set(d.excluded) - separate), key=d.task_sort_key)
        all_ranked = {t for t in pub_tasks if t not in d.excluded and t not in separate}
        use_subset = bool(compare) and set(compare) != all_ranked
        if use_subset:
            note = f"score = mean over {', '.join(compare)} (the tasks measured here)"
        else:
            note = f"score = mean over {', '.join(sorted(all_ranked, key=d.task_sort_key))}"
            note += " (published average where given)" if d.rank_task else ""
        for p in published.rows:
            if use_subset:
                score = _mean(p.values.get(t) for t in compare) if all(t in p.values for t in compare) else None
            else:
                score = p.values.get(d.rank_task) if d.rank_task in p.values else _mean(
                    p.values.get(t) for t in all_ranked)
            pub_rows.append(Row(kind="published", model=p.model, pooling=p.pooling, params=p.params, score=score,
                                source=p.source, values={c.key: p.values.get(c.key) for c in pub_columns}))
    return SuiteBoard(suite, d.title, d.rule, columns, _rank(rows, d), _rank(pub_rows, d), pub_columns,
                      published.source if published else "", published.protocol if published else "",
                      published.digits if published else 3, published_score_note=note,
                      score_label=d.score_label, role=d.role, short=d.short, spec=d)


def _overall(boards: list[SuiteBoard]) -> list[OverallRow]:
    rows: dict[tuple, OverallRow] = {}
    stamps: dict[tuple, dict[str, tuple[str, str]]] = {}
    for board in boards:
        for r in board.rows:
            key = (r.model, r.pooling, r.precision, r.input_size, r.synthetic)
            row = rows.setdefault(key, OverallRow(r.model, r.pooling, r.precision, r.input_size, synthetic=r.synthetic))
            stamp = (r.created_at, r.run_id)  # the latest run; run id breaks ties deterministically
            if stamp > stamps.setdefault(key, {}).get(board.suite, ("", "")):
                stamps[key][board.suite] = stamp
                row.scores[board.suite] = r.score
                if board.spec is not None and board.spec.secondary_role:
                    row.scores[f"{board.suite}:{board.spec.secondary_role}"] = r.metrics.get(board.spec.secondary_metric)
                row.params = row.params or r.params
                if row.tiles_per_s is None:
                    row.tiles_per_s = r.tiles_per_s
    return _rank_overall(list(rows.values()), boards)


def role_keys(boards: list[SuiteBoard], role: str) -> list[str]:
    """The overall-score keys of a role: suites ranked in that role, and ``<suite>:<role>`` for
    suites that speak for it with a secondary metric."""
    keys = [b.suite for b in boards if b.role == role]
    return keys + [f"{b.suite}:{role}" for b in boards if b.spec is not None and b.spec.secondary_role == role]


def _role_mean(row: OverallRow, suites: list[str]) -> float | None:
    """Comparable only over the same suites: every suite of the role in the report, or none."""
    values = [row.scores.get(s) for s in suites]
    return _mean(values) if values and None not in values else None


def _rank_overall(rows: list[OverallRow], boards: list[SuiteBoard]) -> list[OverallRow]:
    ranks: dict[int, list[int]] = {id(r): [] for r in rows}
    for board in boards:
        sign = -1.0 if board.spec is None or board.spec.direction == "higher" else 1.0
        scored = sorted((r for r in rows if r.scores.get(board.suite) is not None),
                        key=lambda r: sign * r.scores[board.suite])
        for i, r in enumerate(scored):
            ranks[id(r)].append(i + 1)
    accuracy, robustness = role_keys(boards, "accuracy"), role_keys(boards, "robustness")
    for r in rows:
        r.accuracy = _role_mean(r, accuracy)
        r.robustness = _role_mean(r, robustness)
        r.mean_rank = _mean(ranks[id(r)])
    rows.sort(key=lambda r: (r.mean_rank is None, r.mean_rank or 0.0, -len(ranks[id(r)]), r.model, r.pooling,
                             r.precision, r.input_size or 0, r.synthetic))
    for i, r in enumerate(rows):
        r.rank = i + 1 if r.mean_rank is not None else None
    return rows


def _published_overall(boards: list[SuiteBoard]) -> list[OverallRow]:
    """Published scores side by side, one row per model (CLS or unstated pooling only)."""
    rows: dict[str, OverallRow] = {}
    for board in boards:
        for r in board.published:
            if r.pooling not in ("cls", "") or r.score is None:
                continue
            row = rows.setdefault(r.model, OverallRow(r.model, "cls", "", None, kind="published"))
            row.scores.setdefault(board.suite, r.score)
            row.params = row.params or r.params
    return _rank_overall([r for r in rows.values() if len(r.scores) > 0], boards)


def build_report(records: Iterable[RunRecord], suites: Sequence[str] | None = None,
                 include_published: bool = True) -> Report:
    """Leaderboards from recorded runs; ``suites`` limits (and orders) the suites shown."""
    defs = leaderboard_defs()
    published = published_results() if include_published else {}
    by_suite: dict[str, list[RunRecord]] = {}
    for rec in records:
        by_suite.setdefault(rec.suite, []).append(rec)
    if suites:
        unknown = [s for s in suites if s not in defs]
        if unknown:
            raise UserError(f"--suite {unknown[0]}: unknown suite (known: {', '.join(defs)})")
        chosen = [s for s in defs if s in suites]
    else:
        chosen = [s for s in defs if s in by_suite]
    boards = []
    for suite in chosen:
        d = defs[suite]
        make = _metrics_board if d.kind == "metrics" else _tasks_board
        boards.append(make(suite, d, by_suite.get(suite, []), published.get(suite)))
    return Report(boards=boards, overall=_overall(boards), published_overall=_published_overall(boards),
                  suites=chosen, titles={s: defs[s].title for s in chosen}, roles={s: defs[s].role for s in chosen},
                  shorts={s: defs[s].short for s in chosen},
                  secondary={s: (defs[s].secondary_role, defs[s].secondary_label) for s in chosen
                             if defs[s].secondary_role})
