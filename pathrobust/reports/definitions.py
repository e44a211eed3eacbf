"""What reports know about suites: only what each suite declares.

Each registered suite's ``[leaderboard]`` table (:class:`pathrobust.suites.base.LeaderboardSpec`)
says how it ranks and what it shows; its ``published`` file (relative to the suite's TOML)
holds published rows. Reports name no suite in code: a suite added as one module + one
TOML appears in them as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pathrobust.config import read_toml
from pathrobust.errors import UserError
from pathrobust.suites.base import Column, LeaderboardSpec, list_suites

__all__ = ["Column", "LeaderboardSpec", "PublishedRow", "PublishedSuite", "leaderboard_defs", "published_results"]


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


def leaderboard_defs() -> dict[str, LeaderboardSpec]:
    """Suite name -> its leaderboard definition, in report order (the demo order, then name)."""
    suites = sorted(list_suites(), key=lambda s: (s.demo.order if s.demo else 99, s.name))
    return {s.name: s.leaderboard for s in suites}


def _published_file(suite) -> Path | None:
    if not suite.leaderboard.published:
        return None
    return Path(suite.source).parent / suite.leaderboard.published


def published_results() -> dict[str, PublishedSuite]:
    """Suite name -> the published rows its TOML points at."""
    out = {}
    for suite in list_suites():
        path = _published_file(suite)
        if path is None:
            continue
        data = read_toml(path)
        try:
            rows = tuple(PublishedRow(model=r["model"], pooling=r.get("pooling", ""),
                                      values={k: float(v) for k, v in r["values"].items()},
                                      source=r.get("source", data["source"]), params=r.get("params"))
                         for r in data.get("rows", []))
            out[suite.name] = PublishedSuite(suite.name, data["source"], data["protocol"],
                                             int(data.get("digits", 3)), rows)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}: not a published-rows file ({type(exc).__name__}: {exc})") from None
    return out
