"""The demo end to end in its reduced setting: every artefact, every model in the report,
and a second run that reuses finished work."""

from __future__ import annotations

import json
import time

import pytest

from pathrobust.demo import DemoConfig, run_demo
from pathrobust.store import ResultsDB


@pytest.mark.slow
def test_quick_demo_produces_every_artefact_and_reuses_work(tmp_path, monkeypatch):
    monkeypatch.setenv("PATHROBUST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    result = run_demo(out, DemoConfig.quick(), progress=False, say=lambda m: None)

    # data, student, suites, report
    assert any((out / "data" / "plism").rglob("*.parquet"))
    assert (out / "data" / "hest").is_dir() and (out / "data" / "eva").is_dir()
    assert any((out / "data" / "slides" / "slides").glob("*.tif"))
    assert any((out / "data" / "pathorob").rglob("*.parquet"))
    student = json.loads((out / "student" / "encoder.json").read_text())
    assert (out / "student" / student["weights_path"]).is_file()
    assert len(result.models) == 5 and student["name"] in result.models
    runs = list(ResultsDB(out / "runs" / "results.sqlite").runs())
    assert {r.suite for r in runs} == {"plism", "hest", "eva", "slides", "pathorob"}
    assert {r.model for r in runs} == set(result.models)
    assert all(r.timings["tiles_per_s"] > 0 and r.timings["wall_s"] > 0 for r in runs)
    for name in result.models:
        for suite in ("plism", "hest", "eva", "slides", "pathorob"):
            score = result.scores[name][suite]
            assert score is not None and -1.0 <= score <= 1.0, (name, suite, score)
    markdown = result.report_md.read_text()
    html = result.report_html.read_text()
    for name in result.models:
        assert name in markdown and name in html
    assert (out / "report" / "leaderboard.csv").is_file() and (out / "report" / "leaderboard.json").is_file()

    # a second run redoes nothing: same scores, and much faster
    started = time.perf_counter()
    again = run_demo(out, DemoConfig.quick(), progress=False, say=lambda m: None)
    assert again.scores == result.scores
    assert time.perf_counter() - started < result.seconds / 2
    assert len(list(ResultsDB(out / "runs" / "results.sqlite").runs())) == len(runs)
