"""The suite contract: a third-party suite is one module + one TOML; reports and the demo know
no suite by name; protocols are typed and validated; run ids follow the data's content."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pathrobust.config import at_least
from pathrobust.errors import UserError
from tests.helpers import REPO, assert_one_line_error, run_cli

PLUGIN = Path(__file__).parent / "plugins" / "acme_suites"


@pytest.fixture
def plugin_site(tmp_path):
    """An installed package with a suite entry point (what `pip install acme-suites` leaves)."""
    site = tmp_path / "site"
    shutil.copytree(PLUGIN, site / "acme_suites")
    dist = site / "acme_suites-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-suites\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[pathrobust.suites]\ntoy = acme_suites:ToySuite\n")
    return site


def test_plugin_suite_runs_and_reaches_the_report(plugin_site, tmp_path):
    env = {"PYTHONPATH": str(plugin_site)}
    listed = run_cli("run", "--help", env=env, check=True).stdout
    assert "toy" in listed and "Toy suite" in listed
    help_text = run_cli("run", "toy", "--help", env=env, check=True).stdout
    assert "--scale" in help_text and "Examples" in help_text and "--model" in help_text
    out = tmp_path / "runs"
    run_cli("run", "toy", "--model", "rgb-histogram", "--out", str(out), env=env, check=True)
    again = run_cli("run", "toy", "--model", "rgb-histogram", "--out", str(out), "--scale", "2", "--json",
                    env=env, check=True)
    assert '"variant": "scale=2.0"' in again.stdout
    from pathrobust.store import ResultsDB

    rows = [r for r in ResultsDB(out / "results.sqlite").runs("toy")]
    assert len(rows) == 2 and all(r.synthetic for r in rows) and {r.variant for r in rows} == {"", "scale=2.0"}
    scores = sorted(r.metrics["score"] for r in rows)
    assert scores[1] == pytest.approx(2 * scores[0]) and scores[0] > 0
    run_cli("report", "--db", str(out / "results.sqlite"), "--out", str(tmp_path / "rep"), env=env, check=True)
    md = (tmp_path / "rep" / "leaderboard.md").read_text()
    html = (tmp_path / "rep" / "leaderboard.html").read_text()
    assert "## Toy suite" in md and "rgb-histogram" in md and "synthetic" in md
    assert 'id="suite-toy"' in html and "rgb-histogram" in html


def test_module_class_suite_through_the_api(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGIN.parent))
    from pathrobust import run_suite

    summary = run_suite("acme_suites:ToySuite", "rgb-histogram", None, tmp_path / "runs", progress=False)
    assert summary["suite"] == "toy" and summary["headline"]["value"] == pytest.approx(summary["score"])
    assert Path(summary["run_dir"], "summary.json").is_file()


def _suite_names() -> list[str]:
    from pathrobust.suites.base import suite_classes

    return list(suite_classes())


def test_reports_and_demo_name_no_suite():
    names = _suite_names()
    assert {"plism", "hest", "eva"} <= set(names)
    files = sorted((REPO / "pathrobust" / "reports").glob("*.py")) + [REPO / "pathrobust" / "demo.py"]
    for path in files:
        text = path.read_text()
        for name in names:
            hit = re.search(rf"\b{re.escape(name)}\b", text, flags=re.IGNORECASE)
            assert hit is None, f"{path.name} names the suite {name!r}: ...{text[max(0, hit.start() - 40):hit.end() + 40]}..."


@pytest.mark.parametrize("edit,fragments", [
    (lambda t: t.replace("[bootstrap]\n", "[bootstrap]\nreplicatez = 3\n"), ("bad.toml", "bootstrap.replicatez")),
    (lambda t: t.replace("chunk_rows = 2048", 'chunk_rows = "many"'), ("bad.toml", "protocol.chunk_rows", "integer")),
    (lambda t: t.replace("replicates = 200", "replicates = -5"), ("bad.toml", "bootstrap.replicates", ">= 0")),
    (lambda t: t.replace("enabled = true\n", ""), ("bad.toml", "probes.enabled", "missing")),
    (lambda t: t.replace('rank_metric = "leaderboard"\n', ""), ("bad.toml", "rank_metric")),
])
def test_bad_protocol_toml_is_one_line(tmp_path, edit, fragments):
    text = (REPO / "suites" / "plism.toml").read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(edit(text))
    proc = run_cli("run", "plism", "--protocol", str(bad), "--model", "rgb-histogram", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert_one_line_error(proc, *fragments)
    assert not (tmp_path / "o").exists()  # nothing written


def test_every_builtin_protocol_loads_and_declares_a_leaderboard():
    from pathrobust.suites.base import list_suites

    for suite in list_suites():
        lb = suite.leaderboard
        assert lb.title and lb.short and lb.role in ("robustness", "accuracy"), suite.name
        assert suite.summary and suite.examples, suite.name


def test_data_fingerprint_follows_content_not_folder(tmp_path):
    from pathrobust.data.identity import fingerprint_tree

    a = tmp_path / "a"
    (a / "sub").mkdir(parents=True)
    (a / "sub" / "x.bin").write_bytes(b"1" * 100)
    (a / "y.bin").write_bytes(b"2" * 50)
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)
    assert fingerprint_tree(a) == fingerprint_tree(b)
    (b / "y.bin").write_bytes(b"3" * 50)  # same name and size, other content
    assert fingerprint_tree(a) != fingerprint_tree(b)
    (b / ".cache").mkdir()
    (b / ".cache" / "junk").write_text("partial work")
    (b / "y.bin").write_bytes(b"2" * 50)
    assert fingerprint_tree(a) == fingerprint_tree(b)  # hidden work folders are not data


@dataclass(frozen=True)
class Inner:
    k: int = field(metadata=at_least(1))


@dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner
    grid: list[float]


def test_config_loader_rejects_with_file_and_key(tmp_path):
    from pathrobust.config import from_dict, load_config

    assert from_dict(Outer, {"name": "x", "inner": {"k": 2}, "grid": [1, 2.5]}) == Outer("x", Inner(2), [1.0, 2.5])
    path = tmp_path / "c.toml"
    for text, fragment in (('name = "x"\ngrid = [1]\n[inner]\nk = 0\n', "'inner.k' must be >= 1"),
                           ('name = 1\ngrid = [1]\n[inner]\nk = 1\n', "'name' must be a string"),
                           ('name = "x"\ngrid = [true]\n[inner]\nk = 1\n', "'grid[0]' must be a number"),
                           ('name = "x"\n[inner]\nk = 1\n', "'grid' is missing"),
                           ('name = "x"\ngrid = []\nnope = 1\n[inner]\nk = 1\n', "unknown key 'nope'"),
                           ('name = "x\n', "not valid TOML")):
        path.write_text(text)
        with pytest.raises(UserError, match=re.escape(fragment)) as err:
            load_config(Outer, path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
