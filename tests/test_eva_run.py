import csv
import json

import pytest

from pathrobust.cli import main
from pathrobust.data.synth_eva import SynthEvaConfig, write_synth_eva
from pathrobust.store import ResultsDB


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "synth-eva"
    write_synth_eva(root, SynthEvaConfig(crc_train_per_class=3, crc_val_per_class=2, mhist_tiles=20))
    return root


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, capsys.readouterr()


def test_synth_layout_is_read_back(synth):
    from pathrobust.data.eva import discover_tasks, read_task

    tasks = discover_tasks(synth)
    assert set(tasks) == {"crc", "mhist"}
    crc = read_task("crc", tasks["crc"])
    assert len(crc.splits["train"].labels) == 27 and crc.splits["train"].source.read(0).shape == (224, 224, 3)
    mhist = read_task("mhist", tasks["mhist"])
    assert len(mhist.splits["train"].labels) + len(mhist.splits["val"].labels) == 20
    # rebuilt only when asked: the same config is reused as-is
    assert write_synth_eva(synth, SynthEvaConfig(crc_train_per_class=3, crc_val_per_class=2, mhist_tiles=20)) == synth


def test_run_eva_records_tasks_and_average(synth, tmp_path, capsys):
    out = tmp_path / "runs"
    main_args = ["run", "eva", "--model", "rgb-histogram", "--data", str(synth), "--out", str(out), "--runs", "2",
                 "--max-steps", "40", "--json", "--no-progress"]
    try:
        main(main_args)
    except SystemExit as exc:  # typer may exit 0 explicitly
        assert exc.code in (0, None)
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["tasks"]) == {"crc", "mhist"}
    for task in summary["tasks"].values():
        assert len(task["runs"]) == 2 and 0.0 <= task["balanced_accuracy_mean"] <= 1.0
        assert max(task["steps"]) <= 40
    crc, mhist = summary["tasks"]["crc"]["balanced_accuracy_mean"], summary["tasks"]["mhist"]["balanced_accuracy_mean"]
    assert summary["average"]["balanced_accuracy_mean"] == pytest.approx((crc + mhist) / 2)
    rows = {r.task: r for r in ResultsDB(out / "results.sqlite").runs("eva")}
    assert set(rows) == {"crc", "mhist", "average"}
    assert rows["crc"].metrics["balanced_accuracy_mean"] == pytest.approx(crc)
    assert set(rows["average"].metrics) == {"balanced_accuracy_mean", "balanced_accuracy_std"}
    per_run = list(csv.DictReader(open(f"{summary['run_dir']}/per_run.csv")))
    assert len(per_run) == 4
    # embeddings are cached: a second run (other seed) extracts nothing and still finishes
    emb = sorted((out / "eva" / "rgb-histogram" / "embeddings").rglob("*.h5"))
    assert len(emb) == 4
    mtimes = [p.stat().st_mtime_ns for p in emb]
    main_args[main_args.index("--json")] = "--seed=3"
    try:
        main(main_args)
    except SystemExit as exc:
        assert exc.code in (0, None)
    assert [p.stat().st_mtime_ns for p in emb] == mtimes


def test_bad_inputs_give_one_line_and_exit_2(tmp_path, capsys):
    from PIL import Image
    import numpy as np

    from pathrobust.data.eva import CRC_CLASSES

    crc = tmp_path / "crc"
    for folder in ("NCT-CRC-HE-100K", "CRC-VAL-HE-7K"):
        for cls in CRC_CLASSES:
            (crc / folder / cls).mkdir(parents=True)
            Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(crc / folder / cls / f"{cls}-A.tif")
    (crc / "CRC-VAL-HE-7K" / "TUM" / "TUM-B.tif").write_bytes(b"not an image")
    args = ["run", "eva", "--model", "rgb-histogram", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
            "--no-progress", "--runs", "1", "--max-steps", "2"]
    for workers in ("0", "1"):
        code, cap = _run(args + ["--workers", workers], capsys)
        assert code == 2, cap.err
        assert "TUM-B.tif: cannot read image" in cap.err and len(cap.err.strip().splitlines()) == 1, cap.err

    (crc / "CRC-VAL-HE-7K" / "TUM" / "TUM-B.tif").unlink()
    for p in (crc / "NCT-CRC-HE-100K" / "ADI").iterdir():
        p.unlink()
    (crc / "NCT-CRC-HE-100K" / "ADI").rmdir()
    code, cap = _run(args, capsys)
    assert code == 2 and "missing class folder(s) ADI" in cap.err and len(cap.err.strip().splitlines()) == 1

    mhist = tmp_path / "m" / "mhist"
    (mhist / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(mhist / "images" / "a.png")
    (mhist / "annotations.csv").write_text("Image Name,Majority Vote Label,Partition\na.png,XX,train\n")
    code, cap = _run(["run", "eva", "--model", "rgb-histogram", "--data", str(tmp_path / "m"), "--no-progress"], capsys)
    assert code == 2 and "unknown label 'XX'" in cap.err and len(cap.err.strip().splitlines()) == 1
