"""The EVA suite's dense tasks end to end: discovery next to the patch tasks, tiny synthetic
masks -> tiny ViT token grids (the run's feature cache) -> eva's decoder -> Dice -> results DB
-> report (Dice in its own column, outside the balanced-accuracy average), and bad input as
one line with exit status 2 through ``pathrobust run eva``."""

from __future__ import annotations

import csv
import json
import statistics
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import REPO
from pathrobust.cli import main
from pathrobust.data.synth_eva import SynthEvaConfig, write_synth_eva
from pathrobust.store import ResultsDB

TINY = SynthEvaConfig(crc_train_per_class=2, crc_val_per_class=1, mhist_tiles=10, dense_tile=56, dense_train_tiles=6,
                      dense_val_tiles=3, dense_test_tiles=3, dense_renderings=("GIV-AT2", "MY-P"))

# a tiny ViT/14 at 56 px (4 x 4 token grid), width 32, depth 1, random weights
MODEL_SOURCE = textwrap.dedent(f'''
    import sys
    sys.path.insert(0, {str(REPO / "tests")!r})
    from helpers import tiny_vit_spec

    def tiny():
        return tiny_vit_spec(name="tiny-dense-vit", img=56, dim=32, depth=1)
''')


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one thread avoids OpenMP barrier stalls on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return write_synth_eva(tmp_path_factory.mktemp("synth") / "synth-eva", TINY)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny_dense_vit.py"
    path.write_text(MODEL_SOURCE)
    return f"{path}:tiny"


def _main(argv, capsys):
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    return code, capsys.readouterr()


def _one_line_exit_2(code, cap, *fragments):
    assert code == 2, (code, cap.out, cap.err)
    err = cap.err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err


def _run(model, data, out, *extra):
    return ["run", "eva", "--model", model, "--data", str(data), "--out", str(out), "--no-progress", "--workers", "0",
            "--runs", "2", "--max-steps", "30", "--dense-max-steps", "3", *extra]


def test_synthetic_eva_data_holds_the_dense_set(synth):
    from pathrobust.data.eva import discover_datasets, discover_tasks
    from pathrobust.data.eva_dense import read_generic_dense

    found = discover_datasets(synth)
    assert found["nuclei"][0] == "dense:synthetic" and {found["crc"][0], found["mhist"][0]} == {"crc", "mhist"}
    assert set(discover_tasks(synth)) == {"crc", "mhist"}  # the patch discovery leaves dense data out
    task = read_generic_dense(synth / "nuclei", size=56)
    assert {k: len(v) for k, v in task.splits.items()} == {"train": 6, "val": 3, "test": 3, "val_GIV-AT2": 3,
                                                            "val_MY-P": 3}


def test_end_to_end_tokens_decoder_dice_db_report(synth, model, tmp_path, capsys):
    out = tmp_path / "runs"
    code, cap = _main(_run(model, synth, out, "--json"), capsys)
    assert code == 0, cap.err
    summary = json.loads(cap.out)
    run_dir = summary["run_dir"]

    # DB rows: patch tasks with balanced accuracy, the dense task with Dice only
    rows = {r.task: r for r in ResultsDB(out / "results.sqlite").runs("eva")}
    assert set(rows) == {"crc", "mhist", "nuclei", "average"}
    dense = rows["nuclei"].metrics
    assert "balanced_accuracy_mean" not in dense
    for key in ("dice_mean", "dice_std", "dice_ignore_empty_false_mean", "mean_iou_mean", "dice_nuclei_mean",
                "dice_stroma_mean", "consistency_mean", "consistency_std"):
        assert key in dense, key
    assert 0.0 <= dense["dice_mean"] <= 1.0 and 0.0 <= dense["consistency_mean"] <= 1.0
    # the average is over the patch tasks only
    crc, mhist = (rows[t].metrics["balanced_accuracy_mean"] for t in ("crc", "mhist"))
    assert rows["average"].metrics["balanced_accuracy_mean"] == pytest.approx((crc + mhist) / 2)
    assert summary["average"]["tasks"] == ["crc", "mhist"]

    # per-item tables and the consistency figure in the run directory
    per_run = list(csv.DictReader(open(f"{run_dir}/dense_per_run.csv")))
    assert [r["run"] for r in per_run] == ["0", "1"] and {r["eval_split"] for r in per_run} == {"test"}
    dice = [float(r["dice"]) for r in per_run]
    assert dense["dice_mean"] == pytest.approx(statistics.mean(dice), abs=1e-6)
    assert dense["dice_std"] == pytest.approx(statistics.stdev(dice), abs=1e-6)
    assert all(int(r["steps"]) <= 3 for r in per_run)
    per_class = list(csv.DictReader(open(f"{run_dir}/dense_per_class.csv")))
    assert {r["class"] for r in per_class} == {"background", "nuclei", "stroma"} and len(per_class) == 6
    cons = list(csv.DictReader(open(f"{run_dir}/dense_consistency.csv")))
    assert {r["rendering"] for r in cons} == {"GIV-AT2", "MY-P"} and len(cons) == 4
    run_means = [statistics.mean(float(r["consistency_dice"]) for r in cons if r["run"] == run) for run in "01"]
    assert dense["consistency_mean"] == pytest.approx(statistics.mean(run_means), abs=1e-6)
    png = open(f"{run_dir}/dense_consistency.png", "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and summary["artefacts"] == {"dense_consistency": "dense_consistency.png"}

    # token grids live in the run's feature cache, one file per split
    grids = sorted(p.name for p in (out / "eva" / "tiny-dense-vit" / "embeddings").rglob("*.grids.h5"))
    assert grids == ["test.grids.h5", "train.grids.h5", "val.grids.h5", "val_GIV-AT2.grids.h5", "val_MY-P.grids.h5"]
    import h5py

    train_grid = next((out / "eva").rglob("nuclei/train.grids.h5"))
    with h5py.File(train_grid) as f:
        assert f["grids"].shape == (6, 32, 4, 4) and f["grids"].dtype == np.float16

    # the report: the EVA table shows "nuclei (Dice)" after the balanced-accuracy tasks and
    # ranks by the average of CRC and MHIST
    code, cap = _main(["report", "--db", str(out / "results.sqlite"), "--out", str(tmp_path / "report"),
                       "--suite", "eva"], capsys)
    assert code == 0, cap.err
    board = json.loads((tmp_path / "report" / "leaderboard.json").read_text())
    text = json.dumps(board)
    assert "nuclei (Dice)" in text
    md = (tmp_path / "report" / "leaderboard.md").read_text()
    eva = md[md.index("## EVA"):].splitlines()
    header = [c.strip() for c in next(line for line in eva if "nuclei (Dice)" in line).split("|")]
    assert header.index("Average") < header.index("CRC") < header.index("MHIST") < header.index("nuclei (Dice)")
    row = [c.strip() for c in next(line for line in eva if "tiny-dense-vit" in line).split("|")]
    assert row[header.index("Average")].startswith(f"{(crc + mhist) / 2:.4f}")
    assert row[header.index("nuclei (Dice)")].startswith(f"{dense['dice_mean']:.4f}")
    html = (tmp_path / "report" / "leaderboard.html").read_text()
    assert "segmentation consistency" in html and "data:image/png;base64" in html


def test_grids_are_reused_and_recomputed_when_tiles_change(synth, model, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth, data)
    out = tmp_path / "runs"
    assert _main(_run(model, data, out, "--tasks", "nuclei"), capsys)[0] == 0
    files = {p.name: p for p in (out / "eva").rglob("*.grids.h5")}
    before = {name: p.stat().st_mtime_ns for name, p in files.items()}
    image = sorted((data / "nuclei" / "train" / "images").iterdir())[0]
    pixels = np.asarray(Image.open(image)).copy()
    Image.fromarray(255 - pixels).save(image)  # same name, other content
    code, cap = _main(_run(model, data, out, "--tasks", "nuclei", "--json"), capsys)  # another run (other data)
    assert code == 0, cap.err
    assert len({p.parent for p in (out / "eva").rglob("summary.json")}) == 2
    after = {name: p.stat().st_mtime_ns for name, p in files.items()}
    assert after["train.grids.h5"] != before["train.grids.h5"]  # the changed split is recomputed
    assert all(after[name] == before[name] for name in before if name != "train.grids.h5")  # the others reused


def test_encoder_without_patch_tokens(synth, tmp_path, capsys):
    out = tmp_path / "runs"
    code, cap = _main(_run("rgb-histogram", synth, out, "--json"), capsys)  # default tasks: a note, no row
    assert code == 0, cap.err
    summary = json.loads(cap.out)
    assert list(summary["not_applicable"]) == ["nuclei"] and "no patch-token grid" in summary["notes"][0]
    assert {r.task for r in ResultsDB(out / "results.sqlite").runs("eva")} == {"crc", "mhist", "average"}
    code, cap = _main(_run("rgb-histogram", synth, out, "--tasks", "crc,nuclei"), capsys)  # asked for: an error
    _one_line_exit_2(code, cap, "--tasks nuclei", "rgb-histogram", "no patch-token grid")


def _generic(root, sizes=((24, 24), (24, 24)), mask_value=1, empty_val=False):
    (root).mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"classes": ["background", "cell"], "ignore_index": None}))
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        if split == "val" and empty_val:
            continue
        for i, (image_size, mask_size) in enumerate([sizes] * 2):
            Image.fromarray(rng.integers(0, 255, (*image_size, 3), dtype=np.uint8)).save(
                root / split / "images" / f"t{i}.png")
            mask = np.zeros(mask_size, np.uint8)
            mask[4:10, 4:10] = mask_value
            Image.fromarray(mask, mode="L").save(root / split / "masks" / f"t{i}.png")
    return root


@pytest.mark.parametrize("case,fragments", [
    ("size", ("t0.png", "mask is 20x20 px but its image is 24x24 px")),
    ("ids", ("t0.png", "class id 7 out of range")),
    ("empty", ("split 'val' is empty",)),
])
def test_bad_dense_input_is_one_line_exit_2(case, fragments, model, tmp_path, capsys):
    data = tmp_path / "data"
    if case == "size":
        _generic(data / "cells", sizes=((24, 24), (20, 20)))
    elif case == "ids":
        _generic(data / "cells", mask_value=7)
    else:
        _generic(data / "cells", empty_val=True)
    code, cap = _main(_run(model, data, tmp_path / "runs"), capsys)
    _one_line_exit_2(code, cap, *fragments)


def test_discovery_of_real_layouts_and_the_labelled_variant(tmp_path):
    """CoNSeP, MoNuSAC and generic folders are found next to a patch task; the clean MoNuSAC
    variant runs only when named; --tasks chooses among all tasks."""
    from pathrobust.suites.base import load_suite, make_options

    (tmp_path / "consep" / "Train" / "Images").mkdir(parents=True)
    (tmp_path / "consep" / "Test" / "Images").mkdir(parents=True)
    for folder in ("Train", "Test"):
        Image.fromarray(np.zeros((250, 250, 3), np.uint8)).save(tmp_path / "consep" / folder / "Images" / "a.png")
    for folder in ("MoNuSAC_images_and_annotations", "MoNuSAC Testing Data and Annotations"):
        (tmp_path / "monusac" / folder / "P").mkdir(parents=True)
        Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "monusac" / folder / "P" / "a.tif")
    _generic(tmp_path / "cells")
    for split in ("train", "val"):
        for cls in ("x", "y"):
            (tmp_path / "mine" / split / cls).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "mine" / split / cls / "a.png")
    suite = load_suite("eva")
    data = suite.open_data(tmp_path, make_options(suite, {}), embed=True)
    assert set(data.patch) == {"mine"} and set(data.dense) == {"consep", "monusac", "cells"}
    assert len(data.dense["consep"].data.splits["train"]) == 1  # one 250 px grid tile
    assert data.dense["monusac"].protocol.ignore_mode is None  # [dense]'s: eva's handling
    assert len(data.dense["monusac"].data.splits["train"]) == 8  # train_views cached crops
    assert data.dense["cells"].protocol is suite.protocol.dense.tasks["default"]
    chosen = suite.open_data(tmp_path, make_options(suite, {"tasks": ("MONUSAC_clean", "mine")}), embed=True)
    assert set(chosen.dense) == {"monusac_clean"} and set(chosen.patch) == {"mine"} and chosen.named
    assert chosen.dense["monusac_clean"].protocol.ignore_mode == "exclude"
    from pathrobust.errors import UserError

    with pytest.raises(UserError, match="--tasks bach: not found .*found: .*consep"):
        suite.open_data(tmp_path, make_options(suite, {"tasks": ("bach",)}), embed=True)


def test_dense_protocol_values_come_from_the_toml(tmp_path, capsys):
    from pathrobust.suites.base import load_suite
    from pathrobust.suites.eva import dense_config

    suite = load_suite("eva")
    d = suite.protocol.dense
    consep = dense_config(d, d.tasks["consep"])
    assert (consep.lr, consep.batch_size, consep.max_steps, consep.patience, consep.n_runs, consep.hidden_dims) == \
        (2e-3, 64, 2000, 200, 5, (64, 32, 32))
    assert dense_config(d, d.tasks["monusac"]).patience == 100
    assert dense_config(d, d.tasks["monusac_clean"]).ignore_mode == "exclude"
    assert dense_config(d, d.tasks["consep"], n_runs=2, max_steps=7, seed=3).max_steps == 7

    text = (REPO / "pathrobust" / "configs" / "suites" / "eva.toml").read_text()
    bad = tmp_path / "eva.toml"
    bad.write_text(text.replace("hidden_dims = [64, 32, 32]", "hidden_dims = [64, 32]"))
    code, cap = _main(["run", "eva", "--model", "rgb-histogram", "--protocol", str(bad)], capsys)
    _one_line_exit_2(code, cap, "'dense.hidden_dims' must hold 3 values")
