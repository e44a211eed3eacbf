"""The results database: round trip, schema version, concurrent writers lose nothing."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3

import pytest

from pathrobust.errors import UserError
from pathrobust.store import SCHEMA_VERSION, ResultsDB, RunRecord

RUNS_PER_WRITER = 50


def _write_runs(db_path: str, writer: int, start) -> None:
    db = ResultsDB(db_path)
    start.wait()  # both writers begin together, so their transactions really interleave
    for i in range(RUNS_PER_WRITER):
        db.record(RunRecord(suite="plism", model=f"writer{writer}", run_id=f"w{writer}-{i:03d}",
                            metrics={"leaderboard": writer + i / 1000, "cosine_all_median": i / 100},
                            options={"i": i}, timings={"wall_s": 0.1 * i}))


def test_round_trip_keeps_every_field(tmp_path):
    db = ResultsDB(tmp_path / "r.sqlite")
    rec = RunRecord(suite="hest", task="IDC", model="m<1>", metrics={"pearson_mean": 0.5, "pearson_std": None},
                    spec_hash="abc", pooling="cls+mean", precision="bf16", input_size=224, params=86_000_000,
                    weights_sha256="f" * 64, data_fingerprint="d1", options={"alpha": "cv", "pca": 256},
                    timings={"wall_s": 1.5, "tiles_per_s": 270.0}, environment={"torch": "2.14.1"},
                    run_dir="/x", run_id="r1", created_at="2025-01-01T00:00:00+00:00")
    db.record(rec)
    (back,) = list(db.runs("hest"))
    assert back == rec
    assert list(db.runs("plism")) == []
    assert db.suites() == ["hest"]


def test_recording_the_same_run_id_replaces_its_metrics(tmp_path):
    db = ResultsDB(tmp_path / "r.sqlite")
    db.record(RunRecord(suite="plism", model="a", run_id="x", metrics={"old": 1.0, "leaderboard": 0.1}))
    db.record(RunRecord(suite="plism", model="a", run_id="x", metrics={"leaderboard": 0.2}))
    (back,) = list(db.runs())
    assert back.metrics == {"leaderboard": 0.2}


def test_schema_version_and_wal(tmp_path):
    path = tmp_path / "r.sqlite"
    ResultsDB(path)
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.close()
    with pytest.raises(UserError, match="newer"):
        ResultsDB(path)


def test_open_existing_refuses_missing_or_foreign_files(tmp_path):
    with pytest.raises(UserError, match="no results database"):
        ResultsDB.open_existing(tmp_path / "missing.sqlite")
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(UserError, match="not a results database"):
        ResultsDB.open_existing(junk)
    assert not (tmp_path / "missing.sqlite").exists()


def test_two_writer_processes_lose_nothing(tmp_path):
    path = str(tmp_path / "results.sqlite")
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_write_runs, args=(path, w, start)) for w in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    runs = list(ResultsDB(path).runs("plism"))
    assert len(runs) == 2 * RUNS_PER_WRITER
    by_id = {r.run_id: r for r in runs}
    for w in (0, 1):
        for i in range(RUNS_PER_WRITER):
            r = by_id[f"w{w}-{i:03d}"]
            assert r.model == f"writer{w}"
            assert r.metrics == {"leaderboard": pytest.approx(w + i / 1000), "cosine_all_median": pytest.approx(i / 100)}
            assert r.options == {"i": i}
