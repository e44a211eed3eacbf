"""HEST suite: the hest-bench reader, the synthetic benchmark, the runner and the CLI."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
from scipy.stats import pearsonr
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from pathrobust.cli import main
from pathrobust.data import hest as H
from pathrobust.data.synth_hest import SynthHestConfig, build_synth_hest
from pathrobust.errors import UserError
from pathrobust.store import ResultsDB
from pathrobust.suites.hest import HestOptions, run_hest

TINY = SynthHestConfig(tasks=("T1", "T2"), samples_per_task=4, folds=2, spots_per_sample=12, genes=6,
                       tile_size=64, seed=3)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return build_synth_hest(tmp_path_factory.mktemp("hest") / "bench", TINY)


@pytest.fixture
def bench_copy(bench, tmp_path):
    return shutil.copytree(bench, tmp_path / "bench")


@pytest.fixture(scope="module")
def hand_emb(bench, tmp_path_factory):
    root = tmp_path_factory.mktemp("emb")
    _hand_embeddings(bench, root)
    return root


def test_synthetic_benchmark_has_the_hest_bench_layout(bench):
    assert H.list_tasks(bench) == ["T1", "T2"]
    task = H.load_task(bench / "T1")
    assert len(task.genes) == 6 and len(task.folds) == 2
    for fold in task.folds:
        assert len(fold.train) == 2 and len(fold.test) == 2
        assert not {s.sample_id for s in fold.train} & {s.sample_id for s in fold.test}
    split = pd.read_csv(bench / "T1" / "splits" / "train_0.csv")
    assert list(split.columns) == ["sample_id", "patches_path", "expr_path"]
    assert split["patches_path"][0].startswith("patches/") and split["expr_path"][0].startswith("adata/")
    sample = task.samples[0]
    with h5py.File(sample.patches_path) as f:
        assert f["img"].shape == (12, 64, 64, 3) and f["img"].dtype == np.uint8
        assert f["barcode"].shape == (12, 1) and f["coords"].shape == (12, 2)
    barcodes, _ = H.read_patch_index(sample.patches_path)
    expr = H.read_expression(sample.expr_path, barcodes, task.genes)
    raw = H.read_expression(sample.expr_path, barcodes, task.genes, log1p=False)
    np.testing.assert_allclose(expr, np.log1p(raw))
    assert raw.sum() > 0 and np.all(raw == np.round(raw))


def test_synthetic_build_is_reused_and_never_clobbered(bench, tmp_path):
    marker = bench / "synth_hest.json"
    before = marker.stat().st_mtime_ns
    assert build_synth_hest(bench, TINY) == bench
    assert marker.stat().st_mtime_ns == before
    other = tmp_path / "x"
    other.mkdir()
    with pytest.raises(UserError, match="already exists"):
        build_synth_hest(other, TINY)


def _hand_embeddings(bench, root, folder="enc", dim=24, seed=0):
    """Fixed embeddings in HEST's cache layout that carry some of the expression signal."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(6, dim))
    for task_name in ("T1", "T2"):
        task = H.load_task(bench / task_name)
        for s in task.samples:
            barcodes, coords = H.read_patch_index(s.patches_path)
            y = H.read_expression(s.expr_path, barcodes, task.genes)
            emb = y @ mix + rng.normal(size=(len(y), dim)) * 2.0
            H.write_embeddings(H.embedding_path(root, task_name, folder, s.sample_id), emb, barcodes,
                               coords)


def _direct_reference(bench, emb_root, task_name, folder="enc"):
    """The HEST protocol on the cached embeddings, written directly with scikit-learn."""
    task = H.load_task(bench / task_name)
    fold_means = []
    for fold in task.folds:
        def stack(samples):
            xs, ys = [], []
            for s in samples:
                with h5py.File(emb_root / task_name / folder / f"{s.sample_id}.h5") as f:
                    xs.append(f["embeddings"][:].astype(np.float64))
                    bc = [b.decode() for b in f["barcodes"][:].ravel()]
                import anndata

                ad = anndata.read_h5ad(s.expr_path)[bc, list(task.genes)]
                ys.append(np.log1p(np.asarray(ad.X, dtype=np.float64)))
            return np.concatenate(xs), np.concatenate(ys)

        X_tr, Y_tr = stack(fold.train)
        X_te, Y_te = stack(fold.test)
        k = min(256, *X_tr.shape)
        pipe = Pipeline([("scaler", StandardScaler()), ("PCA", PCA(n_components=k, random_state=1))])
        Z_tr, Z_te = pipe.fit_transform(X_tr), pipe.transform(X_te)
        reg = Ridge(solver="lsqr", alpha=100 / (k * Y_tr.shape[1]), fit_intercept=False, max_iter=1000)
        pred = reg.fit(Z_tr, Y_tr).predict(Z_te)
        fold_means.append(np.mean([pearsonr(Y_te[:, g], pred[:, g])[0] for g in range(Y_te.shape[1])]))
    return float(np.mean(fold_means)), float(np.std(fold_means))


def test_run_on_fixed_embeddings_equals_direct_sklearn(bench, hand_emb, tmp_path):
    emb = hand_emb
    summary = run_hest(bench_root=bench, out=tmp_path / "runs", embeddings=emb, progress=False)
    for task in ("T1", "T2"):
        mean, std = _direct_reference(bench, emb, task)
        assert summary["tasks"][task]["pearson_mean"] == pytest.approx(mean, abs=1e-6)
        assert summary["tasks"][task]["pearson_std"] == pytest.approx(std, abs=1e-6)
    assert summary["average"] == pytest.approx(np.mean([summary["tasks"][t]["pearson_mean"] for t in ("T1", "T2")]))
    assert summary["average"] > 0.3  # the embeddings carry the signal
    genes = pd.read_csv(summary["run_dir"] + "/genes.csv")
    assert len(genes) == 12 and set(genes.columns) >= {"task", "gene", "pearson_mean", "fold0", "fold1"}
    rows = {r.task: r for r in ResultsDB(tmp_path / "runs" / "results.sqlite").runs("hest")}
    assert set(rows) == {"T1", "T2", "average"}
    assert rows["T1"].metrics["pearson_mean"] == pytest.approx(summary["tasks"]["T1"]["pearson_mean"])
    assert rows["average"].model == "enc" and rows["T1"].options["variant"] == ""


def test_model_run_writes_hest_cache_that_embeddings_mode_reads(bench, tmp_path):
    out = tmp_path / "runs"
    first = run_hest(bench_root=bench, out=out, model="rgb-histogram", tasks=["T1"], progress=False)
    files = sorted((out / "hest-embeddings" / "T1" / "rgb-histogram").glob("*.h5"))
    assert [f.stem for f in files] == [f"T1_P{i}" for i in range(4)]
    cached = H.read_embeddings(files[0])
    assert cached.embeddings.shape == (12, 96) and cached.attrs["model"] == "rgb-histogram"
    assert cached.barcodes == H.read_patch_index(bench / "T1" / "patches" / "T1_P0.h5")[0]
    assert not (out / "hest-embeddings" / "T1" / "rgb-histogram" / ".extract").exists()
    mtime = files[0].stat().st_mtime_ns
    # plain strings name the same run as Paths
    again = run_hest(bench_root=str(bench), out=str(out), model="rgb-histogram", tasks=["T1"], progress=False)
    assert again["run_id"] == first["run_id"] and files[0].stat().st_mtime_ns == mtime
    reread = run_hest(bench_root=bench, out=out, embeddings=out / "hest-embeddings", encoder_name="rgb-histogram",
                      tasks=["T1"], progress=False)
    assert reread["tasks"]["T1"]["pearson_mean"] == pytest.approx(first["tasks"]["T1"]["pearson_mean"], abs=1e-12)
    rows = list(ResultsDB(out / "results.sqlite").runs("hest"))
    by_run = {run: [r for r in rows if r.run_dir == run] for run in (first["run_dir"], reread["run_dir"])}
    assert all({r.task for r in rs} == {"T1", "average"} for rs in by_run.values())
    model_row, cache_row = by_run[first["run_dir"]][0], by_run[reread["run_dir"]][0]
    assert model_row.spec_hash and model_row.pooling == "cls" and model_row.options["alpha"] == "reference"
    # the cache written by pathrobust carries the encoder's provenance into the --embeddings row
    assert (cache_row.spec_hash, cache_row.pooling, cache_row.precision) == (model_row.spec_hash, "cls", "fp32")


def test_options_change_the_protocol_and_label_the_rows(bench, hand_emb, tmp_path):
    emb = hand_emb
    ref = run_hest(bench_root=bench, out=tmp_path / "r", embeddings=emb, progress=False)
    cv = run_hest(bench_root=bench, out=tmp_path / "r", embeddings=emb, options=HestOptions("cv", False),
                  progress=False)
    assert cv["variant"] == "alpha=cv,no-pca" and cv["run_id"] != ref["run_id"]
    grid = [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5]
    assert all(a in grid for t in cv["tasks"].values() for a in t["alpha_per_fold"])
    assert all(a == pytest.approx(100 / (24 * 6)) for t in ref["tasks"].values() for a in t["alpha_per_fold"])
    rows = [r for r in ResultsDB(tmp_path / "r" / "results.sqlite").runs("hest") if r.options["variant"]]
    assert len(rows) == 3 and all(r.options == {"alpha": "cv", "pca": False, "pooling": None,
                                                "variant": "alpha=cv,no-pca"} for r in rows)
    prov = json.loads((tmp_path / "r" / "hest").joinpath(*[p for p in cv["run_dir"].split("/")[-2:]],
                                                           "provenance.json").read_text())
    assert prov["options"]["variant"] == "alpha=cv,no-pca"


def _cli_error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _mutate_expression(path, fn):
    import anndata

    ad = anndata.read_h5ad(path)
    ad = fn(ad)
    ad.write_h5ad(path)


@pytest.mark.parametrize("case,expect", [
    ("outside", "points outside the task folder"),
    ("missing_h5ad", "expression file (h5ad)"),
    ("unknown_barcodes", "barcode(s)"),
    ("unknown_genes", "gene(s) of the gene list"),
    ("nan", "NaN"),
])
def test_bad_inputs_fail_with_one_line(bench_copy, hand_emb, tmp_path, capsys, case, expect):
    t1 = bench_copy / "T1"
    if case == "outside":
        df = pd.read_csv(t1 / "splits" / "train_0.csv")
        df.loc[0, "patches_path"] = "../../../etc/passwd"
        df.to_csv(t1 / "splits" / "train_0.csv", index=False)
    elif case == "missing_h5ad":
        (t1 / "adata" / "T1_P1.h5ad").unlink()
    elif case == "unknown_barcodes":
        _mutate_expression(t1 / "adata" / "T1_P0.h5ad", lambda ad: ad[3:].copy())
    elif case == "unknown_genes":
        (t1 / "var_50genes.json").write_text(json.dumps({"genes": ["GENE00", "NOT_A_GENE"]}))
    elif case == "nan":
        def put_nan(ad):
            ad.X[2, 1] = np.nan
            return ad
        _mutate_expression(t1 / "adata" / "T1_P2.h5ad", put_nan)
    # path problems are found before any embedding; the others on reading fixed embeddings
    source = ["--model", "rgb-histogram"] if case in ("outside", "missing_h5ad") else ["--embeddings", str(hand_emb)]
    err = _cli_error(capsys, ["run", "hest", *source, "--data", str(bench_copy), "--tasks", "T1",
                              "--out", str(tmp_path / "runs"), "--no-progress"])
    assert expect in err


def test_cli_option_errors(bench, tmp_path, capsys):
    base = ["run", "hest", "--data", str(bench), "--out", str(tmp_path / "r"), "--no-progress"]
    assert "exactly one of --model and --embeddings" in _cli_error(capsys, base)
    assert "--tasks" in _cli_error(capsys, base + ["--model", "rgb-histogram", "--tasks", "NOPE"])
    assert "--alpha" in _cli_error(capsys, base + ["--model", "rgb-histogram", "--alpha", "big"])
    for folder in ("a", "b"):
        (tmp_path / "emb" / "T1" / folder).mkdir(parents=True)
    assert "--encoder-name" in _cli_error(capsys, base + ["--embeddings", str(tmp_path / "emb")])
    assert "no folder T1/c" in _cli_error(capsys, base + ["--embeddings", str(tmp_path / "emb"), "--encoder-name", "c"])


def test_cli_runs_and_synth_command(bench, tmp_path, capsys):
    main(["data", "synth-hest", "--out", str(tmp_path / "s"), "--spots", "10", "--samples", "2", "--folds", "2",
          "--genes", "4", "--tile-size", "32"])
    assert H.list_tasks(tmp_path / "s") == ["SYNTH_A", "SYNTH_B"]
    assert len(H.load_task(tmp_path / "s" / "SYNTH_B").genes) == 4
    capsys.readouterr()
    main(["run", "hest", "--model", "hed-histogram", "--data", str(bench), "--out", str(tmp_path / "r"),
          "--no-progress", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert set(out["tasks"]) == {"T1", "T2"} and out["model"] == "hed-histogram"
    assert out["average"] == pytest.approx(np.mean([t["pearson_mean"] for t in out["tasks"].values()]))


def test_default_tasks_are_the_leaderboard_tasks_present(bench):
    from pathrobust.suites.hest import select_tasks

    assert [t.name for t in select_tasks(bench, None, "var_50genes.json", leaderboard=["IDC", "T2"])] == ["T2"]
    assert [t.name for t in select_tasks(bench, None, "var_50genes.json", leaderboard=["IDC"])] == ["T1", "T2"]
