"""The slides suite end to end on tiny synthetic slides (OpenSlide tiling, the run's feature
cache, batched ABMIL, concordance, DB rows, the report), its precomputed-bags mode, eva's
Camelyon16 layout, the flat-head rule of the concordance, and bad input through the CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np
import pytest

from pathrobust.errors import UserError
from tests.helpers import assert_one_line_error, run_cli

TINY = {"specimens": 6, "folds": 3, "stainings": ["GV", "KRH"], "scanners": ["S60"], "grid": "4x3",
        "islands": ["2x1", "1x2"], "specks": 2}
RUNS = {"runs": 3, "max_epochs": 12}


@pytest.fixture(scope="module")
def suite():
    from pathrobust.suites.base import load_suite

    return load_suite("slides")


@pytest.fixture(scope="module")
def slides(suite, tmp_path_factory):
    """6 specimens x 2 acquisitions of pyramidal TIFFs (4 tiles each), marked synthetic."""
    return suite.build_synthetic(tmp_path_factory.mktemp("synth") / "slides", TINY, progress=False)


@pytest.fixture(scope="module")
def finished(slides, tmp_path_factory):
    """One run with an encoder (rgb-histogram) and a protocol variant that keeps flat heads in the
    CCC (min_score_sd = 0), so the concordance is computed whatever the heads learn."""
    from pathrobust.suites.base import SUITE_DIR, run_suite

    root = tmp_path_factory.mktemp("e2e")
    protocol = root / "keep_flat.toml"
    protocol.write_text((SUITE_DIR / "slides.toml").read_text().replace("min_score_sd = 0.02", "min_score_sd = 0.0"))
    out = root / "runs"
    summary = run_suite("slides", "rgb-histogram", slides, out, progress=False, protocol=protocol, **RUNS)
    return out, summary, protocol


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _write_manifest(path: Path, rows: list[dict[str, str]], drop: tuple[str, ...] = ()) -> Path:
    columns = [c for c in rows[0] if c not in drop]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _absolute(slides: Path) -> list[dict[str, str]]:
    rows = _rows(slides / "manifest.csv")
    for row in rows:
        row["path"] = str(slides / row["path"])
    return rows


# -- end to end --------------------------------------------------------------------------------
def test_synthetic_run_end_to_end(finished, slides, tmp_path):
    from pathrobust.metrics.concordance import lins_ccc
    from pathrobust.store import ResultsDB

    out, summary, _ = finished
    run_dir = Path(summary["run_dir"])
    assert summary["synthetic"] and summary["variant"] == "runs=3,max_epochs=12"
    # bags: one per slide through OpenSlide, in the run's cache, with TRIDENT/CLAM geometry
    bags = sorted((out / "slides" / "rgb-histogram" / "embeddings").rglob("*.h5"))
    assert len(bags) == 12
    with h5py.File(bags[0]) as f:
        assert f["features"].shape[0] == 4 and f["coords"].shape == (4, 2)
        assert f.attrs["patch_size_level0"] == 112 and f.attrs["target_mpp"] == 0.5
        assert "file" in str(f.attrs["source_fingerprint"])
    # rows: the task and the average, balanced accuracy and concordance
    task, average = summary["rows"]
    assert task["task"] == "synth_atypia" and average["task"] == "average"
    m = task["metrics"]
    assert 0 <= m["balanced_accuracy_mean"] <= 1 and m["balanced_accuracy_std"] >= 0 and 0 <= m["auroc_mean"] <= 1
    assert m["ccc_runs"] == 3 and m["ccc_runs_excluded"] == 0 and m["ccc_informative"] == 1
    assert average["metrics"]["ccc_mean"] == m["ccc_mean"]
    assert average["metrics"]["balanced_accuracy_mean"] == m["balanced_accuracy_mean"] == summary["headline"]["value"]
    assert m["ccc_ci_low"] <= m["ccc_mean"] <= m["ccc_ci_high"]
    # the CCC is the run-mean of Lin's CCC between the reference's and KRH_S60's slide scores
    scores = _rows(run_dir / "slide_scores.csv")
    per_run = {}
    for row in scores:
        per_run.setdefault(row["acquisition"], {})[row["specimen_id"]] = [float(row[f"score_run{i}"]) for i in range(3)]
    ref, other = per_run["GV_S60"], per_run["KRH_S60"]
    specimens = sorted(ref)
    assert len(specimens) == 6  # every specimen scored out of fold
    expected = np.mean([lins_ccc([ref[s][i] for s in specimens], [other[s][i] for s in specimens]) for i in range(3)])
    assert m["ccc_mean"] == pytest.approx(expected, abs=1e-9)
    assert m["ccc_min"] == pytest.approx(expected, abs=1e-9)  # one other acquisition
    acq = {r["acquisition"]: r for r in _rows(run_dir / "acquisitions.csv")}
    assert set(acq) == {"GV_S60", "KRH_S60"} and float(acq["GV_S60"]["ccc_reference"]) == 1.0
    assert acq["KRH_S60"]["staining"] == "KRH" and acq["KRH_S60"]["scanner"] == "S60"
    assert float(acq["KRH_S60"]["auc_drop"]) == pytest.approx(m["auc_drop_max"])
    assert (run_dir / "ccc_heatmap.png").stat().st_size > 1000
    assert summary["artefacts"] == {"ccc_heatmap": "ccc_heatmap.png"}
    # the results DB and the report
    records = list(ResultsDB(out / "results.sqlite").runs("slides"))
    assert {r.task for r in records} == {"synth_atypia", "average"} and all(r.synthetic for r in records)
    assert next(r for r in records if r.task == "average").metrics["ccc_mean"] == pytest.approx(m["ccc_mean"])
    from pathrobust.reports.tables import build_report

    overall = build_report(ResultsDB(out / "results.sqlite").runs()).overall[0]
    assert overall.scores["slides"] == m["balanced_accuracy_mean"]  # the accuracy role
    assert overall.scores["slides:robustness"] == pytest.approx(m["ccc_mean"])  # CCC speaks for robustness
    run_cli("report", "--db", str(out / "results.sqlite"), "--out", str(tmp_path / "rep"), check=True)
    md = (tmp_path / "rep" / "leaderboard.md").read_text()
    assert "## Slide-level MIL and concordance" in md and "synth_atypia" in md and "rgb-histogram" in md
    assert "Published — Slide-level" in md and "BreastBm CCC" in md and "H0-mini · BreastBm ER, CLB" in md


def test_a_second_run_reuses_the_finished_one(finished, slides):
    from pathrobust.suites.base import run_suite

    out, summary, protocol = finished
    messages = []
    again = run_suite("slides", "rgb-histogram", slides, out, progress=False, protocol=protocol,
                      say=messages.append, **RUNS)
    assert again["run_id"] == summary["run_id"] and "reusing" in messages[0]


def test_precomputed_bags_give_the_same_numbers(finished, slides, tmp_path):
    from pathrobust.suites.base import run_suite

    out, summary, protocol = finished
    bag_dir = next((out / "slides" / "rgb-histogram" / "embeddings").rglob("synth_atypia"))
    again = run_suite("slides", None, slides, tmp_path / "runs", features=bag_dir, progress=False,
                      protocol=protocol, **RUNS)
    for a, b in zip(summary["rows"], again["rows"]):
        assert a["metrics"] == pytest.approx(b["metrics"], nan_ok=True)
    assert again["model"] == "synth_atypia"


def test_cohort_manifest_with_bags_needs_no_slide_files(finished, slides, tmp_path):
    """A user's manifest (named task, --classes) whose slides are not on this machine: the bags
    are enough. Same bags, same heads: the numbers of the synthetic run (padding 4, not 12,
    changes only float rounding, which the CCC of these nearly flat heads magnifies a little)."""
    from pathrobust.suites.base import run_suite

    out, summary, protocol = finished
    bag_dir = next((out / "slides" / "rgb-histogram" / "embeddings").rglob("synth_atypia"))
    rows = _rows(slides / "manifest.csv")
    for row in rows:
        row["path"] = f"elsewhere/{row['slide_id']}.svs"
    cohort = _write_manifest(tmp_path / "cohort.csv", rows)
    again = run_suite("slides", None, cohort, tmp_path / "runs", features=bag_dir, progress=False, protocol=protocol,
                      classes=("normal", "atypia"), max_tiles=4, **RUNS)
    assert [r["task"] for r in again["rows"]] == ["cohort", "average"]
    for key, value in summary["rows"][0]["metrics"].items():
        assert again["rows"][0]["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-5, nan_ok=True), key


def test_flat_heads_leave_the_ccc(finished, slides):
    """The shipped protocol (min_score_sd 0.02) on the same bags: rgb-histogram heads barely
    move off the prior in 12 epochs, so the CCC is either computed on the runs that vary or
    marked not informative, and the rows say which."""
    from pathrobust.suites.base import run_suite

    out, _, _ = finished
    summary = run_suite("slides", "rgb-histogram", slides, out, progress=False, **RUNS)
    m = summary["rows"][0]["metrics"]
    sds = [float(r["score_sd_reference"]) for r in _rows(Path(summary["run_dir"]) / "per_run.csv")]
    flat = sum(sd < 0.02 for sd in sds)
    assert m["ccc_runs_excluded"] == flat and m["ccc_runs"] == 3 - flat
    assert m["score_sd_min"] == pytest.approx(min(sds))
    if flat == 3:
        assert m["ccc_informative"] == 0 and m["ccc_mean"] is None and summary["artefacts"] == {}
        assert "not informative" in summary["notes"][0]
    elif flat:
        assert m["ccc_informative"] == 1 and "left out of the CCC" in summary["notes"][0]


def test_robustness_rule_on_hand_made_scores(suite):
    """Two of three runs flat on the reference: they leave the CCC, which is then the third
    run's own; all flat: not informative, no CCC at all."""
    from pathrobust.data.slide_manifest import SlideManifest, SlideRecord
    from pathrobust.metrics.concordance import lins_ccc
    from pathrobust.suites.slides import SlideTask, TaskOutcome, robustness_of, task_metrics

    recs = [SlideRecord(f"s{k}_{a}", "pos" if k % 2 else "neg", k % 2, f"p{k}", specimen_id=f"s{k}", acquisition=a,
                        scanner=a, staining="GV", split="test") for k in range(6) for a in ("A", "B")]
    manifest = SlideManifest(Path("m.csv"), tuple(recs), ("neg", "pos"))
    task = SlideTask("t", suite.protocol.tasks["manifest"], manifest, Path("."), [], reference="A")
    varied = np.array([0.1, 0.8, 0.3, 0.9, 0.2, 0.7])
    shifted = varied * 0.8 + 0.05
    probs = np.zeros((3, 12))
    probs[0, 0::2], probs[0, 1::2] = varied, shifted
    probs[1:, 0::2] = 0.5 + 1e-4 * varied  # flat on the reference
    probs[1:, 1::2] = 0.5 + 1e-4 * shifted
    outcome = TaskOutcome(task, recs, probs, [{}] * 3, {}, 6, [])
    with pytest.warns(UserWarning, match="2 of 3 runs left out"):
        robustness_of(outcome, suite.protocol.robustness)
    rob = outcome.robustness
    assert rob["ccc_runs"] == 1 and rob["ccc_runs_excluded"] == 2
    assert rob["mean_ccc"] == pytest.approx(lins_ccc(varied, shifted))
    assert rob["auc"]["A"] == pytest.approx(1.0)  # AUROC counts every run: the flat ones still rank positives first
    grid = {r["acquisition"]: r["ccc_reference"] for r in outcome.acquisitions}
    assert grid == {"A": 1.0, "B": pytest.approx(lins_ccc(varied, shifted))}
    probs[0] = probs[1]
    flat = TaskOutcome(task, recs, probs, [{}] * 3, {}, 6, [])
    with pytest.warns(UserWarning, match="not informative"):
        robustness_of(flat, suite.protocol.robustness)
    assert [r["ccc_reference"] for r in flat.acquisitions] == [None, None]  # no heatmap cell, not even the reference
    summary = {f"{m}_{s}": 0.5 for m in ("balanced_accuracy", "auroc", "f1", "accuracy", "precision", "recall")
               for s in ("mean", "std")}
    flat.summary = summary
    row = task_metrics(flat, 3)
    assert row["ccc_informative"] == 0 and row["ccc_mean"] is None and row["ccc_min"] is None
    assert row["ccc_runs_excluded"] == 3 and row["score_sd_mean"] < 1e-3


# -- eva's Camelyon16 layout -------------------------------------------------------------------
def test_camelyon16_layout_runs_as_cam16(slides, tmp_path):
    """A tiny Camelyon16 root (the synthetic TIFFs renamed): eva's validation slide names go to
    val, testing/reference.csv labels the test slides; the row is the leaderboard's Cam16."""
    import shutil

    from pathrobust.suites.base import run_suite

    rows = [r for r in _absolute(slides) if r["acquisition"] == "GV_S60"]
    normal = [r for r in rows if r["label"] == "normal"]
    tumour = [r for r in rows if r["label"] == "atypia"]
    root = tmp_path / "camelyon16"
    for folder in ("training/normal", "training/tumor", "testing/images"):
        (root / folder).mkdir(parents=True)
    plan = [(normal[0], "training/normal/normal_010.tif"), (normal[1], "training/normal/normal_001.tif"),
            (tumour[0], "training/tumor/tumor_001.tif"), (tumour[1], "training/tumor/tumor_002.tif"),
            (normal[2], "testing/images/test_001.tif"), (tumour[2], "testing/images/test_002.tif")]
    for row, target in plan:
        shutil.copy(row["path"], root / target)
    (root / "testing" / "reference.csv").write_text("test_001,Normal\ntest_002,Tumor,Macro\n")
    summary = run_suite("slides", "rgb-histogram", tmp_path, tmp_path / "runs", progress=False, runs=2, max_epochs=3)
    task, average = summary["rows"]
    assert task["task"] == "camelyon16_small" and average["metrics"]["n_tasks"] == 1
    assert "ccc_mean" not in task["metrics"]  # no specimens/acquisitions: no robustness
    training = summary["tasks"]["camelyon16_small"]["training"][0]
    assert (training["n_train"], training["n_val"], training["n_test"]) == (2, 2, 2)
    from pathrobust.suites.base import load_suite

    assert load_suite("slides").leaderboard.canonical_task(task["task"]) == "Cam16"


# -- protocol and published rows ----------------------------------------------------------------
def test_protocol_and_published_rows(suite, tmp_path):
    from pathrobust.config import from_dict
    from pathrobust.reports.definitions import published_results
    from pathrobust.suites.slides import TaskProtocol

    assert suite.protocol.abmil.n_runs == 20 and suite.protocol.metrics.threshold == 0.5
    assert suite.leaderboard.secondary_metric == "ccc_mean" and suite.leaderboard.secondary_role == "robustness"
    with pytest.raises(UserError, match="pad_size"):
        from_dict(TaskProtocol, {"layout": "manifest", "classes": [], "tile_size": 224, "target_mpp": 0.5,
                                 "max_tiles": 100, "pad_size": 50})
    with pytest.raises(UserError, match="split_seed"):
        from_dict(TaskProtocol, {"layout": "panda", "classes": ["0", "1"], "tile_size": 224, "target_mpp": 0.5,
                                 "max_tiles": 200, "pad_size": 200})
    pub = published_results()["slides"]
    rows = {r.model: r.values for r in pub.rows}
    assert rows["Virchow2"] == {"Cam16": 0.861, "PANDA": 0.646} and rows["H0-mini"] == {"Cam16": 0.842, "PANDA": 0.667}
    assert rows["H0-mini · BreastBm ER, CLB"] == {"BreastBm AUC": 0.95, "BreastBm CCC": 0.97}
    assert len([m for m in rows if "BreastBm" in m]) == 9


def test_synthetic_data_is_marked_and_reused(suite, slides):
    from pathrobust.data.synthetic import synthetic_info

    info = synthetic_info(slides / "manifest.csv")
    assert info["generator"] == "synth-slides" and info["params"]["specimens"] == 6
    stamp = (slides / "manifest.csv").stat().st_mtime_ns
    assert suite.build_synthetic(slides, TINY, progress=False) == slides
    assert (slides / "manifest.csv").stat().st_mtime_ns == stamp  # same configuration: not rebuilt


# -- bad input: one line, exit 2, nothing written ----------------------------------------------
def _bad_manifest(kind: str, slides: Path, tmp: Path) -> tuple[list[str], tuple[str, ...]]:
    """(extra CLI arguments, fragments of the expected error) for one kind of bad input."""
    rows = _absolute(slides)
    csv_path = tmp / "cohort.csv"
    if kind == "missing column":
        _write_manifest(csv_path, rows, drop=("label",))
        return ["--data", str(csv_path)], ("cohort.csv", "missing column 'label'")
    if kind == "unknown label":
        rows[3]["label"] = "tumour"
        _write_manifest(csv_path, rows)
        return ["--data", str(csv_path), "--classes", "normal,atypia"], ("line 5", "unknown label 'tumour'")
    if kind == "missing slide":
        rows[2]["path"] = str(tmp / "gone.tif")
        _write_manifest(csv_path, rows)
        return ["--data", str(csv_path)], ("gone.tif", "no such slide file")
    if kind == "not a slide":
        (tmp / "broken.tif").write_bytes(b"II*\x00" + b"\x17" * 300)
        rows[1]["path"] = str(tmp / "broken.tif")
        _write_manifest(csv_path, rows)
        return ["--data", str(csv_path)], ("broken.tif", "OpenSlide cannot open it")
    if kind == "no tissue":
        from pathrobust.data.synth_slides import write_pyramid_tiff

        write_pyramid_tiff(tmp / "blank.tif", np.full((336, 448, 3), 242, np.uint8), 0.5)
        rows[4]["path"] = str(tmp / "blank.tif")
        _write_manifest(csv_path, rows)
        return ["--data", str(csv_path)], ("blank.tif", "no tissue")
    if kind == "one acquisition":
        lonely = rows[0]["specimen_id"]
        rows = [r for r in rows if not (r["specimen_id"] == lonely and r["acquisition"] != "GV_S60")]
        _write_manifest(csv_path, rows)
        return ["--data", str(csv_path)], (f"specimen {lonely}", "one acquisition only")
    if kind == "feature dims":
        bags = tmp / "bags"
        bags.mkdir()
        for k, row in enumerate(rows):
            with h5py.File(bags / f"{row['slide_id']}.h5", "w") as f:
                f["features"] = np.ones((3, 8 if k == 5 else 16), np.float32)
        _write_manifest(csv_path, rows)
        return ["--data", str(csv_path), "--features", str(bags)], (f"{rows[5]['slide_id']}.h5", "dim 8", "has 16")
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing column", "unknown label", "missing slide", "not a slide", "no tissue",
                                  "one acquisition", "feature dims"])
def test_bad_input_is_one_line_and_writes_nothing(kind, slides, tmp_path):
    args, fragments = _bad_manifest(kind, slides, tmp_path)
    out = tmp_path / "runs"
    model = [] if "--features" in args else ["--model", "rgb-histogram"]
    proc = run_cli("run", "slides", *model, *args, "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    assert_one_line_error(proc, *fragments)
    assert not out.exists()

