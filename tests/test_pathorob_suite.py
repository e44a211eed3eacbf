"""`pathrobust run pathorob`: synthetic data -> embeddings (feature cache or PathoROB's feature
files) -> per-dataset and average rows -> the report; variants labelled; bad input one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pathrobust.data import pathorob as D
from pathrobust.store import ResultsDB
from tests.helpers import assert_one_line_error, run_cli, tiny_vit_spec

TINY = {"slides_per_cell": 9, "ood_slides_per_cell": 1, "patches_per_slide": 2, "tile_size": 32}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from pathrobust.suites.base import load_suite

    root = tmp_path_factory.mktemp("pathorob") / "synth"
    return load_suite("pathorob").build_synthetic(root, TINY, progress=False)


def _features_of(run_dir, name="synthetic") -> np.ndarray:
    from pathrobust.extract import load_features

    files = sorted((run_dir.parent / "embeddings").rglob(f"{name}.h5"))
    assert len(files) == 1
    return load_features(files[0]).features


def test_synthetic_data_is_marked_and_reused(synth):
    from pathrobust.data.synthetic import synthetic_info
    from pathrobust.suites.base import load_suite

    info = synthetic_info(synth)
    assert info["generator"] == "synth-pathorob" and info["params"]["slides_per_cell"] == 9
    stamp = (synth / D.INFO_FILE).stat().st_mtime_ns
    assert load_suite("pathorob").build_synthetic(synth, TINY, progress=False) == synth
    assert (synth / D.INFO_FILE).stat().st_mtime_ns == stamp
    with pytest.raises(Exception, match="not this synthetic dataset"):
        load_suite("pathorob").build_synthetic(synth, {**TINY, "seed": 1}, progress=False)


def test_cli_run_rows_tables_plot_and_report(synth, tmp_path):
    from pathrobust.metrics import pathorob as M

    out = tmp_path / "runs"
    proc = run_cli("run", "pathorob", "--model", "rgb-histogram", "--data", str(synth), "--out", str(out), "--json",
                   check=True)
    summary = json.loads(proc.stdout)
    run_dir = Path(summary["run_dir"])
    assert summary["synthetic"] is True and summary["variant"] == ""
    records = {r.task: r for r in ResultsDB(out / "results.sqlite").runs("pathorob")}
    assert set(records) == {"synthetic", "average"} and all(r.synthetic for r in records.values())
    row, avg = records["synthetic"].metrics, records["average"].metrics
    for key in ("ri", "ri_ci_low", "ri_ci_high", "ri_boot_std", "apd_id", "apd_ood", "apd_id_std", "apd_ood_std",
                "clustering_score", "clustering_score_std", "so", "os", "k"):
        assert row[key] is not None, key
    assert row["k"] == 11 and row["ri_ci_low"] <= row["ri"] <= row["ri_ci_high"]
    # the average of one dataset is that dataset; APD as PathoROB's corrected mean with a t half-width
    assert avg["ri"] == row["ri"] == summary["headline"]["value"] and avg["apd_id"] == pytest.approx(row["apd_id"])
    assert avg["apd_id_ci"] > 0 and avg["clustering_score"] == row["clustering_score"]
    # RI from the run's own cached embeddings, recomputed directly
    data = D.read_pathorob(synth)["synthetic"]
    feats = _features_of(run_dir)
    direct = M.robustness(feats, data.view("ri"), "plain", 11)
    assert row["ri"] == direct.ri and row["so"] == direct.counts["SO"] and row["os"] == direct.counts["OS"]
    assert row["ri"] < 0.3  # colour alone: neighbours by staining, not tissue
    # per-item tables and the RI(k) plot
    per_query = pd.read_csv(run_dir / "ri_per_query.csv")
    assert len(per_query) == 72 and {"dataset", "slide_id", "SO", "OS", "biological_class"} <= set(per_query.columns)
    assert per_query["SO"].sum() == row["so"]
    curve = pd.read_csv(run_dir / "ri_curve.csv")
    assert list(curve["k"]) == list(range(1, 61)) and curve.loc[10, "RI"] == pytest.approx(row["ri"])
    for table in ("ri_per_subset", "clustering_trials", "apd_accuracies", "apd_splits"):
        assert (run_dir / f"{table}.csv").is_file(), table
    assert (run_dir / "ri_curve.png").read_bytes()[:4] == b"\x89PNG" and summary["artefacts"] == {"ri_curve": "ri_curve.png"}
    # the report: the suite's table, its published rows, the declared artefact
    from pathrobust.reports.build import write_report

    write_report(out / "results.sqlite", tmp_path / "rep")
    md = (tmp_path / "rep" / "leaderboard.md").read_text()
    assert "## PathoROB robustness index" in md and "rgb-histogram" in md and "synthetic" in md
    assert "### Published — PathoROB robustness index" in md and "| H0-mini | — | 0.815 | 0.794 | 0.718 | 0.932 |" in md
    html = (tmp_path / "rep" / "leaderboard.html").read_text()
    assert 'id="suite-pathorob"' in html and "robustness index as a function of k" in html


def test_variants_are_options_labelled_in_provenance(synth, tmp_path):
    from pathrobust.suites.base import run_suite

    summary = run_suite("pathorob", tiny_vit_spec(img=28, dim=32), synth, tmp_path / "runs", progress=False,
                        select_k=True, mari=True, croma=True, apd=False, clustering=False)
    assert summary["variant"] == "select_k,mari,croma"
    s = summary["datasets"]["synthetic"]
    assert s["k_source"] == "selected" and s["k"] in M_grid() and 0 <= s["MaRI"] <= 1 and -1 <= s["CRoMa"] <= 1
    assert s["MaRI_definition"] == s["CRoMa_definition"] == "croma 1.0.1"
    prov = json.loads((tmp_path / "runs" / "pathorob").glob("*/*/provenance.json").__next__().read_text())
    assert prov["options"]["variant"] == "select_k,mari,croma"
    assert "k-NN balanced accuracy" in summary["definitions"]["synthetic"]["definitions"]["k"]
    records = {r.task: r for r in ResultsDB(tmp_path / "runs" / "results.sqlite").runs("pathorob")}
    assert records["average"].variant == "select_k,mari,croma" and records["average"].model.startswith("tiny-vit")
    assert records["synthetic"].metrics["mari"] is not None and records["synthetic"].metrics["croma"] is not None
    assert "apd_id" not in records["synthetic"].metrics and records["average"].options["skipped"] == ["apd", "clustering"]


def M_grid() -> list[int]:
    from pathrobust.metrics.pathorob import k_grid

    return k_grid(100)


def write_pathorob_features(folder, data: D.PathorobData, feats: np.ndarray) -> None:
    """PathoROB's FeatureDataManager layout: <dataset>/<medical_center>.npz keyed slide_id-patch_id."""
    folder.mkdir(parents=True)
    for centre, rows in data.table.groupby("medical_center"):
        np.savez(folder / f"{centre.replace(' ', '_')}.npz",
                 **{f"{s}-{p}": feats[r] for r, s, p in zip(rows["row"], rows["slide_id"], rows["patch_id"])})


def test_features_mode_reads_pathorob_layout_and_rejects_nan(synth, tmp_path):
    from pathrobust.suites.base import run_suite

    data = D.read_pathorob(synth)["synthetic"]
    rng = np.random.default_rng(0)
    t = data.table
    feats = np.stack([(b == "fibrous") * 2.0 * np.eye(8)[0] + (c == "HR_SQ") * np.eye(8)[1] + rng.normal(size=8)
                      for b, c in zip(t.biological_class, t.medical_center)]).astype(np.float32)
    write_pathorob_features(tmp_path / "feats" / "toy_model" / "synthetic", data, feats)
    summary = run_suite("pathorob", None, synth, tmp_path / "runs", features=tmp_path / "feats" / "toy_model",
                        progress=False, apd=False, clustering=False)
    from pathrobust.metrics import pathorob as M

    assert summary["model"] == "toy_model"
    assert summary["datasets"]["synthetic"]["robustness_index"] == M.robustness(feats, data.view("ri"), "plain", 11).ri

    feats[5, 3] = np.nan
    shutil.rmtree(tmp_path / "feats")
    write_pathorob_features(tmp_path / "feats" / "toy_model" / "synthetic", data, feats)
    out = tmp_path / "nan-runs"
    proc = run_cli("run", "pathorob", "--features", str(tmp_path / "feats" / "toy_model"), "--data", str(synth),
                   "--out", str(out))
    assert proc.returncode == 2
    assert_one_line_error(proc, "toy_model/synthetic", "row 5", "NaN")
    assert not out.exists()  # nothing written


def _manifest(tmp_path, rows: list[tuple[str, str, str]], drop: str | None = None):
    """Tiles (class, centre, slide) as PNGs and a manifest CSV naming them."""
    rng = np.random.default_rng(0)
    images = tmp_path / "img"
    images.mkdir(exist_ok=True)
    records = []
    for i, (cls, centre, slide) in enumerate(rows):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / f"t{i}.png")
        records.append({"image_path": f"img/t{i}.png", "biological_class": cls, "medical_center": centre,
                        "slide_id": slide})
    frame = pd.DataFrame(records)
    if drop:
        frame = frame.drop(columns=[drop])
    path = tmp_path / "tiles.csv"
    frame.to_csv(path, index=False)
    return path


def _grid(slides: int, tiles: int, classes=("a", "b"), centres=("X", "Y")) -> list[tuple[str, str, str]]:
    return [(c, m, f"{m}{c}{s}") for m in centres for c in classes for s in range(slides) for _ in range(tiles)]


@pytest.mark.parametrize("case,fragments", [
    ("missing_column", ("tiles.csv", "missing column 'medical_center'")),
    ("one_centre_class", ("tiles RI rows", "class 'c' occurs in centre 'X' only", "RI is undefined")),
    ("few_neighbours", ("tiles RI rows", "only 7 neighbours on other slides", "k = 11")),
])
def test_bad_manifest_is_one_line_and_writes_nothing(tmp_path, case, fragments):
    if case == "missing_column":
        manifest = _manifest(tmp_path, _grid(4, 2), drop="medical_center")
    elif case == "one_centre_class":
        manifest = _manifest(tmp_path, _grid(4, 2) + [("c", "X", f"Xc{s}") for s in range(4)])
    else:
        manifest = _manifest(tmp_path, _grid(2, 1))  # 8 tiles: each query sees 7 on other slides
    out = tmp_path / "runs"
    proc = run_cli("run", "pathorob", "--model", "rgb-histogram", "--data", str(manifest), "--out", str(out))
    assert proc.returncode == 2
    assert_one_line_error(proc, *fragments)
    assert not out.exists()  # nothing written, not even a run directory


def test_manifest_run(tmp_path):
    from pathrobust.suites.base import run_suite

    manifest = _manifest(tmp_path, _grid(4, 2))
    summary = run_suite("pathorob", "rgb-histogram", manifest, tmp_path / "runs", progress=False, clustering=False)
    s = summary["datasets"]["tiles"]
    assert s["design"] == "plain" and s["k"] == 11 and s["queries"] == 32 and 0 <= s["robustness_index"] <= 1
    assert "apd_id" not in s and summary["synthetic"] is False
    assert summary["notes"] == ["clustering skipped (--no-clustering)", "tiles: no APD (its protocol has no split schedule)"]
