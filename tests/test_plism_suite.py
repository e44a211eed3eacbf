"""PLISM readers (both published forms), synthetic data, plismbench feature layout and the
suite runner (per-pair values vs the reference definition, outputs, resume)."""

import json
import warnings

import h5py
import numpy as np
import pandas as pd
import pytest

from pathrobust.cli import main
from pathrobust.data import plism as pdata
from pathrobust.data.synth_plism import SynthPlismConfig, synth_plism
from pathrobust.errors import UserError
from pathrobust.metrics import plism as pm
from pathrobust.suites import plism as suite
from tests.test_plism_metrics import plismbench_f32

STAININGS = ("GIV", "GM", "HR")
SCANNERS = ("AT2", "S60")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "plism"
    return synth_plism(out, SynthPlismConfig(tiles_per_slide=10, stainings=STAININGS, scanners=SCANNERS, tile_size=64),
                       progress=False)


def test_synth_parquet_layout_and_reader(synth):
    shards = sorted((synth / "data").glob("train-*-of-*.parquet"))
    assert len(shards) >= 1
    import pyarrow.parquet as pq

    schema = pq.ParquetFile(shards[0]).schema_arrow
    assert {"slide_id", "tile_id", "png", "stainer", "scanner"} <= set(schema.names)
    slides = pdata.open_plism(synth)
    assert list(slides) == sorted(pdata.make_slide_id(st, sc) for st in STAININGS for sc in SCANNERS)
    src = slides["GIV_AT2_to_GMH_S60.tif"]
    assert len(src) == 10 and src.read(0).shape == (64, 64, 3) and src.read(0).dtype == np.uint8
    # same locations, different pixels across stainings and scanners
    other = slides["HR_S60_to_GMH_S60.tif"]
    assert np.array_equal(src.coords, other.coords)
    assert np.abs(src.read(3).astype(int) - other.read(3).astype(int)).mean() > 2


def test_partial_grid_warns_full_grid_is_silent():
    full = [pdata.make_slide_id(st, sc) for st in pdata.STAININGS for sc in pdata.SCANNERS]
    with pytest.warns(UserWarning, match="6 of the 91"):
        pdata.warn_partial_grid(full[:6])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pdata.warn_partial_grid(full)


def test_parquet_slide_spanning_shards_and_row_order(tmp_path, synth):
    """Rows of one slide split over shards in any order are matched by (x, y), not row order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(p) for p in sorted((synth / "data").glob("*.parquet"))])
    rng = np.random.default_rng(0)
    perm = rng.permutation(table.num_rows)
    shuffled = table.take(pa.array(perm))
    (tmp_path / "d").mkdir()
    cut = table.num_rows // 3
    pq.write_table(shuffled.slice(0, cut), tmp_path / "d" / "train-00000-of-00002.parquet", row_group_size=7)
    pq.write_table(shuffled.slice(cut), tmp_path / "d" / "train-00001-of-00002.parquet", row_group_size=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        original = pdata.open_plism(synth)
        scrambled = pdata.open_plism(tmp_path / "d")
    sid = "GM_S60_to_GMH_S60.tif"
    a, b = original[sid], scrambled[sid]
    for i in range(len(a)):
        j = int(np.flatnonzero((b.coords == a.coords[i]).all(1))[0])
        assert np.array_equal(a.read(i), b.read(j))


def test_h5_form_and_tile_set_check(tmp_path, synth):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slides = pdata.open_plism(synth)
    for sid in list(slides)[:3]:
        with h5py.File(tmp_path / f"{sid}.h5", "w") as f:
            for i, tid in enumerate(slides[sid].tile_ids):
                f[tid] = slides[sid].read(i)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        h5 = pdata.open_plism(tmp_path)
    sid = list(slides)[1]
    assert set(h5) == set(list(slides)[:3])
    i = h5[sid].tile_ids.index(slides[sid].tile_ids[4])
    assert np.array_equal(h5[sid].read(i), slides[sid].read(4))
    # drop a tile from one slide: a clear error naming the slide and the missing (x, y)
    victim = list(slides)[2]
    with h5py.File(tmp_path / f"{victim}.h5", "a") as f:
        del f[slides[victim].tile_ids[0]]
    x, y = slides[victim].coords[0]
    with pytest.raises(UserError, match=rf"{victim}.*missing \(x, y\) \[\({x}, {y}\)\]"):
        pdata.open_plism(tmp_path)


def test_ids_and_subsets(tmp_path):
    assert pdata.parse_slide_id("GIVH_GT450_to_GMH_S60.tif") == ("GIVH", "GT450")
    assert pdata.parse_tile_id("12_16_448_224") == (16, 448, 224)
    with pytest.raises(UserError):
        pdata.parse_tile_id("tile_a_b")
    np.save(tmp_path / "s.npy", np.array([5, 1, 3], np.int64))
    assert pdata.tile_subset(10, tmp_path / "s.npy").tolist() == [5, 1, 3]
    assert pdata.tile_subset(10, n_tiles=4).tolist() == [0, 3, 6, 9]
    assert pdata.tile_subset(5).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(UserError, match="--tile-subset"):
        pdata.tile_subset(4, tmp_path / "s.npy")


def make_plismbench_features(root, stainings, scanners, n=120, d=16, seed=0):
    """Features in plismbench's layout: per slide, shared content + staining/scanner shifts + noise,
    rows written in shuffled order (the reader sorts by (x, y))."""
    rng = np.random.default_rng(seed)
    content = rng.normal(size=(n, d)).astype(np.float32)
    xy = np.stack(np.meshgrid(np.arange(12), np.arange(-(-n // 12))), -1).reshape(-1, 2)[:n] * 224
    levels_xy = np.concatenate([np.full((n, 1), 16), xy], 1)
    sorted_feats = {}
    for st in stainings:
        for sc in scanners:
            sid = pdata.make_slide_id(st, sc)
            feats = content + 0.6 * rng.normal(size=d) + 0.9 * rng.normal(size=(n, d))
            feats = feats.astype(np.float32)
            perm = rng.permutation(n)
            out = root / sid
            out.mkdir(parents=True)
            np.save(out / "features.npy", np.concatenate([levels_xy[perm], feats[perm]], 1).astype(np.float32))
            order = pdata.sort_by_xy(levels_xy)
            sorted_feats[sid] = feats[order]
    return sorted_feats


def test_run_features_matches_reference_definition(tmp_path):
    feats = make_plismbench_features(tmp_path / "feats", ("GIV", "GM", "LM"), ("AT2", "P"), n=240, d=16)
    out = tmp_path / "runs"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = suite.run_plism(model="toy", features_dir=tmp_path / "feats", out=out, bootstrap=50, progress=False)
    run_dir = tmp_path / summary["run_dir"] if not summary["run_dir"].startswith("/") else summary["run_dir"]
    df = pd.read_csv(f"{run_dir}/metrics.csv")
    assert len(df) == 15
    for col in ("slide_a", "slide_b", "staining_a", "scanner_a", "staining_b", "scanner_b", "group",
                "cosine_similarity", "top_1_accuracy", "top_3_accuracy", "top_5_accuracy", "top_10_accuracy"):
        assert col in df.columns
    for _, row in df.iterrows():
        cos, acc = plismbench_f32(feats[row.slide_a], feats[row.slide_b], (1, 3, 5, 10))
        assert row.cosine_similarity == pytest.approx(cos, abs=1e-6)
        for k in (1, 3, 5, 10):
            assert row[f"top_{k}_accuracy"] == pytest.approx(acc[k], abs=1e-6)
    assert 0.05 < df.top_1_accuracy.mean() < 0.95
    assert df.group.value_counts().to_dict() == {"inter-scanner, inter-staining": 6, "inter-staining": 6, "inter-scanner": 3}
    results = pd.read_csv(f"{run_dir}/results.csv", index_col=0)
    assert list(results.index) == list(pm.GROUPS)
    med = np.median(df.loc[df.group == "inter-scanner", "top_10_accuracy"])
    assert results.loc["inter-scanner", "top_10_accuracy"].split(" ; ")[1].startswith(str(np.round(med, 3)).ljust(5, "0"))
    medians = [np.median(df.cosine_similarity)] + [np.median(df.loc[df.group == g, "top_10_accuracy"])
                                                   for g in ("inter-scanner", "inter-staining", "inter-scanner, inter-staining")]
    assert summary["leaderboard_unrounded"] == pytest.approx(np.mean(medians), abs=1e-12)
    assert summary["leaderboard"] == pytest.approx(np.mean(np.round(medians, 3)), abs=1e-12)
    ci = summary["leaderboard_bootstrap"]
    assert ci["low"] <= summary["leaderboard_unrounded"] + 0.05 and ci["high"] >= summary["leaderboard_unrounded"] - 0.05
    stored = json.loads(open(f"{run_dir}/summary.json").read())
    assert stored["leaderboard"] == summary["leaderboard"] and "provenance" in stored
    for name in ("heatmap_staining.png", "heatmap_scanner.png"):
        assert (open(f"{run_dir}/{name}", "rb").read(4)) == b"\x89PNG"
    assert set(summary["probes"]) >= {"scanner", "staining"}
    from pathrobust.store import ResultsDB

    rec = [r for r in ResultsDB(out / "results.sqlite").runs("plism")]
    assert len(rec) == 1 and rec[0].metrics["leaderboard"] == pytest.approx(summary["leaderboard_unrounded"])
    # the metric names pathrobust.reports reads
    aggs = summary["aggregates"]
    assert rec[0].metrics["cosine_all_median"] == pytest.approx(aggs["all"]["cosine_similarity"]["median"])
    assert rec[0].metrics["top10_both_median"] == pytest.approx(
        aggs["inter-scanner, inter-staining"]["top_10_accuracy"]["median"])
    assert rec[0].metrics["lb_ci_low"] == pytest.approx(ci["low"])


def test_resume_skips_finished_pairs(tmp_path, monkeypatch):
    make_plismbench_features(tmp_path / "feats", ("GIV", "GM"), ("AT2", "P", "SQ"), n=60, d=8)
    kw = dict(model="toy", features_dir=tmp_path / "feats", out=tmp_path / "runs", bootstrap=20, probes=False,
              progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = suite.run_plism(**kw)
        run_dir = first["run_dir"]
        full = pd.read_csv(f"{run_dir}/metrics.csv")
        # simulate a kill: summary gone, 6 pairs kept, last line torn
        import os

        os.remove(f"{run_dir}/summary.json")
        lines = open(f"{run_dir}/pairs.jsonl").read().splitlines()
        open(f"{run_dir}/pairs.jsonl", "w").write("\n".join(lines[:6]) + "\n" + lines[6][:20])
        calls = []
        real = pm.pair_metrics_batch
        monkeypatch.setattr(pm, "pair_metrics_batch", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
        second = suite.run_plism(**kw)
    assert sum(calls) == 15 - 6
    resumed = pd.read_csv(f"{run_dir}/metrics.csv")
    pd.testing.assert_frame_equal(full, resumed)
    assert second["leaderboard_bootstrap"] == first["leaderboard_bootstrap"]


def test_cli_run_features_and_errors(tmp_path, capsys):
    make_plismbench_features(tmp_path / "feats", ("GIV", "KR"), ("AT2", "S60"), n=36, d=8)
    with pytest.warns(UserWarning):
        main(["run", "plism", "--features", str(tmp_path / "feats"), "--out", str(tmp_path / "o"), "--n-tiles", "20",
              "--bootstrap", "0", "--no-probes", "--json", "--no-progress"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_tiles"] == 20 and summary["n_pairs"] == 6
    # a group without pairs is reported empty, not a crash
    assert summary["group_sizes"] == {"inter-scanner": 2, "inter-staining": 2, "inter-scanner, inter-staining": 2, "all": 6}
    with pytest.raises(SystemExit) as exc:
        main(["run", "plism", "--features", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert "--features" in capsys.readouterr().err


def test_empty_group_reported(tmp_path):
    make_plismbench_features(tmp_path / "feats", ("GIV", "KR", "MY"), ("AT2",), n=30, d=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = suite.run_plism(model="toy", features_dir=tmp_path / "feats", out=tmp_path / "o", bootstrap=10,
                                  probes=False, progress=False)
    results = pd.read_csv(f"{summary['run_dir']}/results.csv", index_col=0)
    assert results.loc["inter-scanner", "cosine_similarity"] == "empty"
    assert summary["leaderboard"] is None and summary["aggregates"]["inter-scanner"]["top_10_accuracy"]["median"] is None


def test_run_with_model_extracts_and_exports(tmp_path, synth):
    """End to end from tiles: shared extractor into the feature cache, then the evaluation;
    `extract --format plismbench` writes features the suite reads back identically."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = suite.run_plism(model="rgb-histogram", data=synth, out=tmp_path / "runs", bootstrap=0, probes=False,
                                  progress=False, workers=0)
        assert summary["n_pairs"] == 15 and summary["n_tiles"] == 10
        main(["extract", "--model", "rgb-histogram", "--data", str(synth), "--out", str(tmp_path / "feat"),
              "--format", "plismbench", "--workers", "0", "--no-progress"])
        again = suite.run_plism(model="rgb-histogram", features_dir=tmp_path / "feat" / "rgb-histogram",
                                out=tmp_path / "runs2", bootstrap=0, probes=False, progress=False)
    a = pd.read_csv(f"{summary['run_dir']}/metrics.csv")
    b = pd.read_csv(f"{again['run_dir']}/metrics.csv")
    cols = pm.metric_names()
    np.testing.assert_allclose(a[cols].to_numpy(), b[cols].to_numpy(), atol=1e-6)
