"""Leaderboard definitions and published results, read from ``reports/assets/*.toml``."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from pathrobust.errors import UserError


@dataclass(frozen=True)
class Column:
    key: str  # metric name (kind "metrics") or canonical task name (kind "tasks")
    label: str


@dataclass(frozen=True)
class LeaderboardDef:
    """How one suite's leaderboard ranks and what it shows."""

    suite: str
    title: str
    kind: str  # "metrics" | "tasks"
    rule: str
    rank_metric: str = ""  # kind "metrics"
    columns: tuple[Column, ...] = ()
    ci: tuple[str, str] | None = None
    task_metric: str = ""  # kind "tasks"
    task_std: str = ""
    rank_task: str = ""
    task_order: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()
    aliases: dict[str, str] = field(default_factory=dict)

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
class PublishedRow:
    model: str
    pooling: str
    values: dict[str, float]
    source: str
    params: int | None = None


@dataclass(frozen=True)
class PublishedSuite:
    suite: str
    source: str
    protocol: str
    digits: int
    rows: tuple[PublishedRow, ...]


def _read_asset(name: str) -> dict[str, Any]:
    with resources.files("pathrobust.reports").joinpath("assets", name).open("rb") as fh:
        return tomllib.load(fh)


def leaderboard_defs() -> dict[str, LeaderboardDef]:
    """Suite name -> definition, in report order."""
    defs = {}
    for suite, d in _read_asset("leaderboards.toml").items():
        defs[suite] = LeaderboardDef(
            suite=suite, title=d["title"], kind=d["kind"], rule=d["rule"],
            rank_metric=d.get("rank_metric", ""),
            columns=tuple(Column(c["metric"], c["label"]) for c in d.get("columns", [])),
            ci=tuple(d["ci"]) if "ci" in d else None,
            task_metric=d.get("task_metric", ""), task_std=d.get("task_std", ""),
            rank_task=d.get("rank_task", ""), task_order=tuple(d.get("task_order", [])),
            excluded=tuple(d.get("excluded", [])), aliases=dict(d.get("aliases", {})))
        if defs[suite].kind not in ("metrics", "tasks"):
            raise UserError(f"leaderboards.toml [{suite}]: kind must be 'metrics' or 'tasks'")
    return defs


def published_results() -> dict[str, PublishedSuite]:
    """Suite name -> the published rows carried from the project's reference."""
    out = {}
    for suite, d in _read_asset("published.toml").items():
        rows = tuple(PublishedRow(model=r["model"], pooling=r.get("pooling", ""),
                                  values={k: float(v) for k, v in r["values"].items()},
                                  source=r.get("source", d["source"]), params=r.get("params"))
                     for r in d["rows"])
        out[suite] = PublishedSuite(suite, d["source"], d["protocol"], int(d.get("digits", 3)), rows)
    return out
