"""What every suite run shares: a run directory, its log, provenance and the results DB.

A run's id is a hash of its resolved configuration (suite, model spec hash, pooling,
precision, data fingerprint, protocol options), so running the same thing again finds the
same directory: a finished run is reported as such, an interrupted one resumes from what its
directory already holds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pathrobust.store import DB_FILENAME, ResultsDB, RunRecord, environment, run_dir_for, write_json

SUMMARY = "summary.json"


def encoder_record_fields(encoder, precision: str) -> dict[str, Any]:
    """The RunRecord fields that describe the encoder of a run, its throughput included."""
    fields: dict[str, Any] = dict(spec_hash=encoder.spec.hash, pooling=encoder.pooling, precision=precision,
                                  input_size=encoder.spec.input_size, params=encoder.spec.params,
                                  weights_sha256=encoder.weights_sha256 or "")
    if encoder.tiles_per_second is not None:
        fields["timings"] = {"tiles_per_s": round(encoder.tiles_per_second, 2)}
    return fields


def run_key(config: Mapping[str, Any]) -> str:
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


class SuiteRun:
    """A run directory ``<out>/<suite>/<model>/<run-id>/`` with ``config.json``, ``log.txt``,
    ``provenance.json`` and, once finished, ``summary.json`` and rows in the results DB."""

    def __init__(self, out: str | Path, suite: str, model: str, config: Mapping[str, Any],
                 provenance: Mapping[str, Any] | None = None, db_path: str | Path | None = None) -> None:
        self.out = Path(out)
        self.suite = suite
        self.model = model
        self.config = dict(config)
        self.run_id = run_key({"suite": suite, "model": model, **self.config})
        self.dir = run_dir_for(self.out, suite, model, self.run_id)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db_path = Path(db_path) if db_path else self.out / DB_FILENAME
        self.provenance = {**(provenance or {}), "environment": environment()}
        write_json(self.dir / "config.json", self.config)
        write_json(self.dir / "provenance.json", self.provenance)
        self.started = time.perf_counter()
        self.log = logging.getLogger(f"pathrobust.{suite}.{self.run_id}")
        self.log.setLevel(logging.INFO)
        if not self.log.handlers:
            handler = logging.FileHandler(self.dir / "log.txt")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            self.log.addHandler(handler)
        self.log.info("run %s: suite=%s model=%s config=%s", self.run_id, suite, model, json.dumps(self.config, default=str))

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
            db.record(rec)
        write_json(self.dir / SUMMARY, summary)
        self.log.info("finished in %.1fs", wall)
        return summary
