import csv

import h5py
import numpy as np
import pytest
from PIL import Image

from pathrobust.data.eva import (BACH_CLASSES, BREAKHIS_CLASSES, CRC_CLASSES, EvaResizeCrop, discover_tasks,
                                 eva_resize_crop, read_bach, read_breakhis, read_class_folders, read_crc, read_mhist,
                                 read_pcam)
from pathrobust.data.tiles import ArrayTiles
from pathrobust.errors import UserError


def _img(path, value=0, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def test_bach_index_ranges(tmp_path):
    photos = tmp_path / "ICIAR2018_BACH_Challenge" / "Photos"
    for c, cls in enumerate(BACH_CLASSES):
        for i in range(100):
            _img(photos / cls / f"{cls[0].lower()}{i:03d}.tif", value=c)
    ds = read_bach(tmp_path)
    train, val = ds.splits["train"], ds.splits["val"]
    assert (len(train.labels), len(val.labels)) == (268, 132)
    # eva: train = [0,41) + [59,60) + [90,139) ...; sorted list = Benign 0..99, InSitu 100..199, ...
    assert val.source.tile_ids[0] == "Benign/b041.tif" and train.source.tile_ids[41] == "Benign/b059.tif"
    assert train.labels[:41].tolist() == [0] * 41 and train.labels[-1] == 3
    assert np.bincount(val.labels).tolist() == [48, 30, 31, 23] and ds.eval_split == "val"
    (photos / "Normal" / "n000.tif").unlink()
    with pytest.raises(UserError, match="399"):
        read_bach(tmp_path)


def _crc(root, per=2):
    for folder in ("NCT-CRC-HE-100K", "CRC-VAL-HE-7K"):
        for cls in CRC_CLASSES:
            for i in range(per):
                _img(root / folder / cls / f"{cls}-X{i}.tif")


def test_crc_layout_and_bad_folders(tmp_path):
    _crc(tmp_path)
    ds = read_crc(tmp_path)
    assert ds.classes == CRC_CLASSES and len(ds.splits["train"].labels) == 18
    assert ds.splits["val"].labels.tolist() == sorted([c for c in range(9)] * 2)
    (tmp_path / "CRC-VAL-HE-7K" / "ZZZ").mkdir()
    with pytest.raises(UserError, match="unknown label folder.*ZZZ"):
        read_crc(tmp_path)
    (tmp_path / "CRC-VAL-HE-7K" / "ZZZ").rmdir()
    for p in (tmp_path / "NCT-CRC-HE-100K" / "MUS").iterdir():
        p.unlink()
    (tmp_path / "NCT-CRC-HE-100K" / "MUS").rmdir()
    with pytest.raises(UserError, match="missing class folder.*MUS"):
        read_crc(tmp_path)


def _mhist(root, rows):
    for name, *_ in rows:
        _img(root / "images" / name)
    with open(root / "annotations.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Image Name", "Majority Vote Label", "Number of Annotators who Selected SSA (Out of 7)", "Partition"])
        w.writerows(rows)


def test_mhist_csv(tmp_path):
    _mhist(tmp_path, [("MHIST_aaa.png", "SSA", 6, "train"), ("MHIST_aab.png", "HP", 1, "train"),
                      ("MHIST_aac.png", "HP", 0, "test"), ("MHIST_aad.png", "SSA", 5, "test")])
    ds = read_mhist(tmp_path)
    assert ds.classes == ["SSA", "HP"]
    assert ds.splits["train"].labels.tolist() == [0, 1] and ds.splits["val"].labels.tolist() == [1, 0]
    assert ds.splits["val"].source.tile_ids == ["MHIST_aac.png", "MHIST_aad.png"]
    _mhist(tmp_path, [("MHIST_aaa.png", "SSA", 6, "train"), ("MHIST_aab.png", "TA", 1, "test")])
    with pytest.raises(UserError, match="line 3: unknown label 'TA'"):
        read_mhist(tmp_path)


def _pcam(root, n, labels=None):
    rng = np.random.default_rng(0)
    for split in ("train", "valid", "test"):
        with h5py.File(root / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as f:
            f["x"] = rng.integers(0, 255, (n, 96, 96, 3), dtype=np.uint8)
        with h5py.File(root / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as f:
            y = np.asarray(labels if labels is not None else np.arange(n) % 2, dtype=np.uint8)
            f["y"] = y.reshape(n, 1, 1, 1)


def test_pcam_h5(tmp_path):
    _pcam(tmp_path, 6)
    ds = read_pcam(tmp_path)
    assert set(ds.splits) == {"train", "val", "test"} and ds.eval_split == "test"
    assert ds.splits["test"].labels.tolist() == [0, 1, 0, 1, 0, 1]
    tile = ds.splits["val"].source.read(2)
    with h5py.File(tmp_path / "camelyonpatch_level_2_split_valid_x.h5") as f:
        assert np.array_equal(tile, f["x"][2])
    assert EvaResizeCrop(ds.splits["train"].source).read(0).shape == (224, 224, 3)
    bad = tmp_path / "bad"
    bad.mkdir()
    _pcam(bad, 3, labels=[0, 2, 1])
    with pytest.raises(UserError, match=r"unknown label\(s\) \[2\]"):
        read_pcam(bad)


def test_breakhis_patient_split(tmp_path):
    base = tmp_path / "BreaKHis_v1" / "histology_slides" / "breast"
    files = {
        "benign/SOB/tubular_adenoma/SOB_B_TA_14-3411F/40X/SOB_B_TA-14-3411F-40-001.png": "train",
        "benign/SOB/fibroadenoma/SOB_B_F_14-9133/40X/SOB_B_F-14-9133-40-001.png": "train",
        "malignant/SOB/mucinous_carcinoma/SOB_M_MC_14-19979/40X/SOB_M_MC-14-19979-40-001.png": "val",
        "malignant/SOB/ductal_carcinoma/SOB_M_DC_14-2773/40X/SOB_M_DC-14-2773-40-001.png": "val",
        "malignant/SOB/ductal_carcinoma/SOB_M_DC_14-2773/100X/SOB_M_DC-14-2773-100-001.png": None,
        "malignant/SOB/lobular_carcinoma/SOB_M_LC_14-12204/40X/SOB_M_LC-14-12204-40-001.png": None,
    }
    for rel in files:
        _img(base / rel)
    ds = read_breakhis(tmp_path)
    assert ds.classes == BREAKHIS_CLASSES
    assert sorted(ds.splits["train"].labels.tolist()) == [0, 2]  # TA, F
    assert sorted(ds.splits["val"].labels.tolist()) == [1, 3]  # MC, DC (val patients 19979, 2773)


def test_class_folders_and_discovery(tmp_path):
    for split in ("train", "val"):
        for cls in ("a", "b"):
            _img(tmp_path / "mine" / split / cls / "t0.png")
    _crc(tmp_path / "crc", per=1)
    found = discover_tasks(tmp_path)
    assert set(found) == {"crc", "mine"}
    ds = read_class_folders(found["mine"], task="mine")
    assert ds.classes == ["a", "b"] and ds.splits["val"].labels.tolist() == [0, 1]
    assert set(discover_tasks(tmp_path, ["CRC"])) == {"crc"}
    with pytest.raises(UserError, match="--tasks mhist: not found"):
        discover_tasks(tmp_path, ["mhist"])
    _img(tmp_path / "mine" / "val" / "c" / "t0.png")
    with pytest.raises(UserError, match="unknown label folder.*c"):
        read_class_folders(tmp_path / "mine")


def test_eva_resize_crop_matches_torchvision_geometry():
    tile = np.zeros((300, 400, 3), np.uint8)
    tile[:, 200:] = 255  # right half white
    out = eva_resize_crop(tile)
    assert out.shape == (224, 224, 3)
    # 300x400 -> 224x298 (int(224 * 400 / 300)); crop left = round(74 / 2) = 37: the white edge
    # at x = 149 of the resized image lands at 112
    assert out[0, 100, 0] == 0 and out[0, 120, 0] == 255
    same = np.random.default_rng(0).integers(0, 255, (224, 224, 3), dtype=np.uint8)
    assert np.array_equal(EvaResizeCrop(ArrayTiles(same[None])).read(0), same)
