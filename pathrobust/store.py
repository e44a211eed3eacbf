"""Results database (SQLite) and run directories.

Run directory: ``<out>/<suite>/<model>/<run-id>/`` holding the resolved config, per-item
metrics, ``summary.json``, ``provenance.json`` and the log. Each finished run is also one row
(plus its metrics) in ``<out>/results.sqlite`` — WAL mode, one transaction per run, so
concurrent writers lose nothing — which ``pathrobust report`` reads.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sqlite3
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DB_FILENAME = "results.sqlite"
#: Bumped when the schema changes; stored in ``PRAGMA user_version``. v2 added ``synthetic``
#: and ``variant`` (older databases are migrated in place).
SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    suite TEXT NOT NULL,
    task TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL,
    spec_hash TEXT NOT NULL DEFAULT '',
    pooling TEXT NOT NULL DEFAULT '',
    precision TEXT NOT NULL DEFAULT '',
    input_size INTEGER,
    params INTEGER,
    weights_sha256 TEXT NOT NULL DEFAULT '',
    data_fingerprint TEXT NOT NULL DEFAULT '',
    options TEXT NOT NULL DEFAULT '{}',
    timings TEXT NOT NULL DEFAULT '{}',
    environment TEXT NOT NULL DEFAULT '{}',
    run_dir TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    synthetic INTEGER NOT NULL DEFAULT 0,
    variant TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (run_id, name)
);
CREATE INDEX IF NOT EXISTS runs_suite_model ON runs(suite, model);
"""
# Each step takes a database from version i (index) to i + 1.
MIGRATIONS = {
    1: ["ALTER TABLE runs ADD COLUMN synthetic INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE runs ADD COLUMN variant TEXT NOT NULL DEFAULT ''"],
}


def environment() -> dict[str, str]:
    """Versions and device of this process (recorded with every run)."""
    import torch

    from pathrobust import __version__

    env = {"pathrobust": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "platform": platform.platform()}
    try:
        import timm

        env["timm"] = timm.__version__
    except ImportError:
        pass
    env["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    return env


@dataclass
class RunRecord:
    suite: str
    model: str
    metrics: Mapping[str, float]
    task: str = ""
    spec_hash: str = ""
    pooling: str = ""
    precision: str = ""
    input_size: int | None = None
    params: int | None = None
    weights_sha256: str = ""
    data_fingerprint: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)
    timings: Mapping[str, float] = field(default_factory=dict)
    environment: Mapping[str, str] = field(default_factory=dict)
    run_dir: str = ""
    run_id: str = field(default_factory=lambda: new_run_id())
    created_at: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    synthetic: bool = False  # measured on pathrobust's synthetic data, not the real benchmark
    variant: str = ""  # the protocol options that depart from the reference ('' = reference)


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


class ResultsDB:
    """The SQLite results database. Safe for concurrent writer processes."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = self._connect()
        try:
            version = con.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                from pathrobust.errors import UserError

                raise UserError(f"{self.path}: results database schema v{version} is newer than this "
                                f"pathrobust understands (v{SCHEMA_VERSION}); upgrade pathrobust")
            if version < SCHEMA_VERSION:
                # One writer creates or migrates the schema; concurrent openers wait, then see it.
                con.execute("BEGIN IMMEDIATE")
                version = con.execute("PRAGMA user_version").fetchone()[0]
                if version == 0:
                    for statement in filter(str.strip, SCHEMA.split(";")):
                        con.execute(statement)
                else:
                    for step in range(version, SCHEMA_VERSION):
                        for statement in MIGRATIONS[step]:
                            con.execute(statement)
                con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                con.execute("COMMIT")
        finally:
            con.close()

    @classmethod
    def open_existing(cls, path: str | os.PathLike, what: str = "--db") -> "ResultsDB":
        """Open a database that must already exist (readers: a typo must not create an empty one)."""
        if not Path(path).is_file():
            from pathrobust.errors import UserError

            raise UserError(f"{what} {path}: no results database there (suite runs write <out>/{DB_FILENAME})")
        try:
            return cls(path)
        except sqlite3.DatabaseError as exc:
            from pathrobust.errors import UserError

            raise UserError(f"{what} {path}: not a results database ({exc})") from None

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA busy_timeout=60000")
        con.execute("PRAGMA foreign_keys=ON")
        return con

    def record(self, run: RunRecord) -> str:
        """Insert (or replace) one row and its metrics in a single transaction."""
        self.record_many([run])
        return run.run_id

    def record_many(self, runs: list[RunRecord]) -> None:
        """Insert (or replace) the rows of one run (one per task) in a single transaction."""
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            for run in runs:
                row = asdict(run)
                metrics = row.pop("metrics")
                for key in ("options", "timings", "environment"):
                    row[key] = json.dumps(row[key], sort_keys=True, default=str)
                row["synthetic"] = int(bool(row["synthetic"]))
                con.execute("DELETE FROM metrics WHERE run_id = ?", (run.run_id,))
                cols = ", ".join(row)
                con.execute(f"INSERT OR REPLACE INTO runs ({cols}) VALUES ({', '.join('?' * len(row))})",
                            tuple(row.values()))
                con.executemany("INSERT INTO metrics (run_id, name, value) VALUES (?, ?, ?)",
                                [(run.run_id, k, _metric_value(k, v)) for k, v in metrics.items()])
            con.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            con.execute("ROLLBACK")
            if "disk" in str(exc) or "full" in str(exc):
                from pathrobust.atomic import no_space

                raise no_space(self.path) from None
            raise
        except BaseException:
            con.execute("ROLLBACK")
            raise
        finally:
            con.close()

    def runs(self, suite: str | None = None) -> Iterator[RunRecord]:
        """Every recorded run (of one suite), oldest first."""
        where = " WHERE suite = ?" if suite else ""
        args = (suite,) if suite else ()
        con = self._connect()
        con.row_factory = sqlite3.Row
        try:
            # One read transaction: runs and metrics come from the same snapshot.
            con.execute("BEGIN")
            rows = con.execute(f"SELECT * FROM runs{where} ORDER BY created_at, run_id", args).fetchall()
            metric_rows = con.execute(
                "SELECT m.run_id, m.name, m.value FROM metrics m JOIN runs r ON r.run_id = m.run_id"
                + where.replace("suite", "r.suite"), args).fetchall()
            con.execute("COMMIT")
        finally:
            con.close()
        metrics: dict[str, dict[str, float]] = {}
        for m in metric_rows:
            metrics.setdefault(m["run_id"], {})[m["name"]] = m["value"]
        for r in rows:
            data = dict(r)
            for key in ("options", "timings", "environment"):
                data[key] = json.loads(data[key])
            data["synthetic"] = bool(data["synthetic"])
            yield RunRecord(metrics=metrics.get(data["run_id"], {}), **data)


    def suites(self) -> list[str]:
        """Suites with at least one recorded run, sorted."""
        con = self._connect()
        try:
            return [r[0] for r in con.execute("SELECT DISTINCT suite FROM runs ORDER BY suite")]
        finally:
            con.close()

    def count(self) -> int:
        con = self._connect()
        try:
            return con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        finally:
            con.close()


def _metric_value(name: str, value: Any) -> float | None:
    """A metric as stored: a finite float, or NULL for a documented exclusion (None or NaN)."""
    if value is None:
        return None
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


def safe_name(name: str) -> str:
    """A model name as a file or folder name (``+`` kept: ``cls+mean`` stays readable)."""
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name).strip("._") or "model"


def run_dir_for(out: str | os.PathLike, suite: str, model: str, run_id: str) -> Path:
    """``<out>/<suite>/<model>/<run-id>/`` (model name made filesystem-safe)."""
    safe = safe_name(model)
    return Path(out) / suite / safe / run_id


