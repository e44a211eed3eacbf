"""`pathrobust report`: golden Markdown from a fixture database, ranking rules, escaping, outputs."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import pytest

from pathrobust.errors import UserError
from pathrobust.reports.build import write_report
from pathrobust.reports.markdown import render_markdown
from pathrobust.reports.tables import build_report
from pathrobust.store import ResultsDB, RunRecord
from test_report_fixtures import XSS, fixture_db, fixture_records

GOLDEN = Path(__file__).parent / "golden" / "leaderboard.md"


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    db = fixture_db(root / "results.sqlite", root / "runs")
    return write_report(db, root / "out")


def test_markdown_from_fixture_db_equals_golden(report_dir):
    """Regenerate with PATHROBUST_UPDATE_GOLDEN=1 after an intended change, and review the diff."""
    text = report_dir.markdown.read_text()
    if os.environ.get("PATHROBUST_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_ranking_rules_and_distinct_rows():
    report = build_report(fixture_records())
    plism = report.boards[0]
    assert [b.suite for b in report.boards] == ["plism", "hest", "eva"]
    # ranked by the unrounded leaderboard metric; pooling and precision give distinct rows
    assert [(r.model, r.pooling, r.precision, r.rank) for r in plism.rows[:3]] == [
        ("h0-mini", "cls+mean", "fp32", 1), ("h0-mini", "cls", "fp32", 2), ("h0-mini", "cls", "bf16", 3)]
    assert plism.rows[0].score == pytest.approx(0.5456)
    # the superseded run of the same configuration is not shown
    assert "p-old" not in {r.run_id for r in plism.rows}
    # a row without the ranked metric stays, unranked, last
    assert (plism.rows[-1].model, plism.rows[-1].rank) == ("hed-histogram", None)
    hest = report.boards[1]
    assert [(r.run_id, r.score) for r in hest.rows] == [("h2", 0.585), ("h1", 0.57), ("h3", 0.425)]
    assert [c.key for c in hest.columns] == ["IDC", "LUAD"]  # LUNG reported as LUAD
    eva = report.boards[2]
    # BACH is shown but not averaged: the run without an "average" record gets mean(CRC, PCam)
    effnet = next(r for r in eva.rows if r.model.startswith("efficientnet"))
    assert effnet.score == pytest.approx((0.90 + 0.80) / 2)
    assert effnet.values["BACH"] == 0.60


def test_published_rows_are_separate_and_compared_on_the_measured_tasks():
    report = build_report(fixture_records())
    for board in report.boards:
        assert all(r.kind == "measured" for r in board.rows)
        assert board.published and all(r.kind == "published" for r in board.published)
    plism_pub = {(r.model, r.pooling): r for r in report.boards[0].published}
    assert plism_pub[("H0-mini", "cls")].score == 0.541
    assert plism_pub[("Virchow2", "cls+mean")].score == 0.464
    hest_pub = {(r.model, r.pooling): r for r in report.boards[1].published}
    # measured tasks are IDC and LUAD, so the published score is their mean, not the 9-task average
    assert hest_pub[("H0-mini", "cls")].score == pytest.approx((0.5862 + 0.5481) / 2)
    assert hest_pub[("H0-mini", "cls+mean")].score == pytest.approx((0.5909 + 0.5633) / 2)
    eva_pub = {r.model: r for r in report.boards[2].published if r.source.startswith("kaiko")}
    assert eva_pub["UNI"].score == pytest.approx((0.944 + 0.937) / 2)
    # without measured rows, the published average is the source's own
    only_pub = build_report([], suites=["hest"])
    assert {(r.model, r.pooling): r.score for r in only_pub.boards[0].published}[("H-optimus-0", "cls")] == 0.4146
    assert only_pub.boards[0].rows == []
    assert build_report(fixture_records(), include_published=False).boards[0].published == []


def test_overall_table():
    report = build_report(fixture_records())
    rows = {(r.model, r.pooling, r.precision): r for r in report.overall}
    h0 = rows[("h0-mini", "cls", "fp32")]
    assert h0.scores == {"plism": 0.52, "hest": 0.585, "eva": 0.925}
    assert h0.accuracy == pytest.approx((0.585 + 0.925) / 2)
    assert h0.mean_rank == pytest.approx((2 + 1 + 1) / 3)
    assert rows[("h0-mini", "cls+mean", "fp32")].accuracy is None  # no HEST/EVA run
    assert rows[(XSS, "mean", "fp32")].accuracy is None  # EVA only: not comparable
    assert [r.rank for r in report.overall] == [1, 2, 3, 4, 5, None]


def test_suite_selection_and_bad_input(tmp_path):
    report = build_report(fixture_records(), suites=["eva", "plism"])
    assert report.suites == ["plism", "eva"]
    with pytest.raises(UserError, match="--suite nope"):
        build_report([], suites=["nope"])
    with pytest.raises(UserError, match="no results database"):
        write_report(tmp_path / "missing.sqlite", tmp_path / "out")
    # a database with no runs still gives a (short) report
    ResultsDB(tmp_path / "empty.sqlite")
    files = write_report(tmp_path / "empty.sqlite", tmp_path / "out", plots=False)
    assert "No runs recorded." in files.markdown.read_text()


def test_missing_metrics_do_not_break_the_report():
    recs = [RunRecord(suite="plism", model="bare", run_id="b1", metrics={}),
            RunRecord(suite="hest", task="IDC", model="bare", run_id="b2:IDC", metrics={}),
            RunRecord(suite="eva", task="average", model="bare", run_id="b3:average", metrics={"balanced_accuracy_mean": 0.7})]
    report = build_report(recs)
    text = render_markdown(report)
    assert "| — | bare |" in text
    assert report.boards[2].rows[0].score == 0.7


def test_html_is_self_contained_and_escapes_user_strings(report_dir):
    page = report_dir.html.read_text()
    assert XSS not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("<script>") == 1  # only the page's own inline script
    # no external resources: every src/href is a data: URI or an in-page anchor
    for url in re.findall(r'(?:src|href)="([^"]*)"', page):
        assert url.startswith(("data:", "#")), url
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert page.count("data:image/png;base64,") == len(report_dir.plots) == 6
    # every table is sortable, published tables are marked
    assert page.count('class="sortable') == page.count("<table")
    assert 'class="sortable published"' in page and 'class="badge">published<' in page


def test_csv_json_and_png_outputs(report_dir):
    rows = list(csv.DictReader(report_dir.csv.open()))
    plism = [r for r in rows if r["table"] == "plism" and r["kind"] == "measured"]
    assert [r["run_id"] for r in plism] == ["p2", "p1", "p3", "p4", "p5", "p6"]
    assert float(plism[0]["plism:cosine_all_median"]) == pytest.approx(0.7956)
    assert any(r["model"] == XSS for r in rows)  # CSV keeps the raw name
    data = json.loads(report_dir.json.read_text())
    assert data["suites"] == ["plism", "hest", "eva"]
    assert data["boards"][0]["rows"][0]["environment"]["torch"] == "2.14.1"
    for path in report_dir.plots:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.stem for p in report_dir.plots} == {"robustness_vs_accuracy", "plism_cosine_vs_top10", "plism_groups",
                                                  "plism_heatmaps", "score_vs_params", "throughput_vs_score"}


def test_cli_report(tmp_path, capsys):
    from pathrobust.cli import main

    db = fixture_db(tmp_path / "results.sqlite")
    main(["report", "--db", str(db), "--out", str(tmp_path / "rep"), "--suite", "plism", "--no-plots"])
    md = (tmp_path / "rep" / "leaderboard.md").read_text()
    assert "## PLISM robustness" in md and "## HEST" not in md
    assert not (tmp_path / "rep" / "plots" / "plism_groups.png").exists()
    with pytest.raises(SystemExit) as exc:
        main(["report", "--db", str(tmp_path / "none.sqlite"), "--out", str(tmp_path / "rep2")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no results database" in err and "Traceback" not in err
    assert not (tmp_path / "rep2").exists()  # nothing written on bad input


def test_markdown_cells_cannot_break_the_table_or_inject_html():
    from pathrobust.reports.markdown import md_escape

    assert md_escape("a|b <i>x</i>\n`y`") == "a\\|b &lt;i&gt;x&lt;/i&gt; \\`y\\`"
    recs = [RunRecord(suite="plism", model="evil|model", run_id="q", metrics={"leaderboard": 0.3},
                      options={"path": "/data/<x>|y"})]
    lines = render_markdown(build_report(recs, include_published=False)).splitlines()
    row = [line for line in lines if "evil" in line][-1]  # the PLISM board row (it has the options)
    header = lines[lines.index(row) - 2]
    cells = re.split(r"(?<!\\)\|", row)
    assert len(cells) == len(header.split("|"))  # the escaped pipes split nothing
    assert "<x>" not in row and "/data/&lt;x&gt;\\|y" in row


def test_runs_recorded_by_suite_run_feed_the_report(tmp_path):
    """The path the suites take: SuiteRun.finish -> results DB -> report (heatmap from the run dir)."""
    from pathrobust.suites.base import SuiteRun
    from test_report_fixtures import _plism_metrics, _write_pair_csv

    run = SuiteRun(tmp_path / "runs", "plism", "tiny", {"pooling": "cls", "precision": "fp32"})
    _write_pair_csv(run.dir, 0.8)
    run.finish({"leaderboard": 0.4}, [RunRecord(suite="plism", model="tiny", pooling="cls", precision="fp32",
                                                metrics=_plism_metrics(0.4), run_id="auto")])
    hest = SuiteRun(tmp_path / "runs", "hest", "tiny", {"pooling": "cls"})
    hest.finish({}, [RunRecord(suite="hest", task=t, model="tiny", pooling="cls", precision="fp32",
                               metrics={"pearson_mean": v}, run_id="auto") for t, v in (("IDC", 0.3), ("average", 0.3))])
    files = write_report(tmp_path / "runs" / "results.sqlite", tmp_path / "out", include_published=False)
    plism, hest_board = files.report.boards
    assert plism.rows[0].run_id == run.run_id and plism.rows[0].run_dir == str(run.dir)
    assert hest_board.rows[0].run_id == hest.run_id and hest_board.rows[0].values == {"IDC": 0.3}
    assert plism.rows[0].wall_s is not None and plism.rows[0].environment["torch"]
    assert any(p.stem == "plism_heatmaps" for p in files.plots)
