"""Whole-slide tiling (eva's foreground grid), feature bags (pathrobust/TRIDENT/CLAM), slide
manifests and their errors, and the synthetic multi-acquisition slides."""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from pathrobust.data.bags import (
    build_bags,
    cap_bag,
    check_same_dim,
    find_feature_file,
    load_bags,
    pad_bags,
    read_feature_bag,
)
from pathrobust.data.slide_manifest import (
    CAMELYON16_VAL,
    camelyon16_manifest,
    labels_of,
    panda_manifest,
    read_slide_manifest,
    stratified_split,
)
from pathrobust.data.slides import (
    SlideTiles,
    Tiling,
    closest_level,
    foreground_mask,
    foreground_ratios,
    grid_coords,
    hsv_saturation,
    mask_level,
)
from pathrobust.data.synth_slides import (
    SynthSlidesConfig,
    match_colours,
    nucleus_area,
    synth_slides,
    write_pyramid_tiff,
)
from pathrobust.data.tiles import FolderTiles, coords_from_name
from pathrobust.errors import UserError


# -- eva's sampler, piece by piece -----------------------------------------------------------
def test_hsv_saturation_is_opencvs_fixed_point():
    rgb = np.array([[[255, 0, 0], [100, 50, 50], [240, 240, 240], [0, 0, 0], [200, 190, 180], [30, 20, 29]]],
                   dtype=np.uint8)
    # S = ((V - min) * round((255 << 12) / V) + 2048) >> 12: 255 * 50 / 100 = 127.5 gives 128,
    # but 255 * 20 / 200 = 25.5 gives 25 (the table's 5222 is a little under 4096 * 255 / 200)
    assert hsv_saturation(rgb).tolist() == [[255, 128, 0, 0, 25, 85]]
    assert foreground_mask(rgb).tolist() == [[1, 1, 0, 0, 1, 1]]  # strictly above 20
    assert foreground_mask(rgb, saturation_threshold=26).tolist() == [[1, 1, 0, 0, 0, 1]]


def test_grid_order_is_evas_shuffled_x_major_list():
    layer, w, h = (1000, 700), 224, 224
    xy = [(x, y) for x in range(0, layer[0] - w + 1, w) for y in range(0, layer[1] - h + 1, h)]
    order = list(range(len(xy)))
    np.random.default_rng(42).shuffle(order)
    assert grid_coords(layer, w, h).tolist() == [list(xy[i]) for i in order]
    assert grid_coords(layer, w, h, shuffle=False).tolist() == [list(p) for p in xy]


def test_foreground_ratios_match_evas_window_slicing():
    rng = np.random.default_rng(0)
    mask = (rng.random((97, 131)) > 0.6).astype(np.uint8)
    layer, scale, side = (1310, 970), (10.0, 9.999), 57
    xy = grid_coords(layer, side, side)
    got = foreground_ratios(mask, scale, xy, side, side)
    for (x, y), ratio in zip(xy, got):
        x_, y_ = int(x / scale[0]), int(y / scale[1])
        window = mask[y_:y_ + int(side / scale[1]), x_:x_ + int(side / scale[0])]
        assert ratio == window.sum() / window.size


def test_level_choice():
    mpps = [0.25, 0.5, 1.0, 2.0]
    assert closest_level(mpps, 0.5) == 1 and closest_level(mpps, 0.7) == 1 and closest_level(mpps, 0.2) == 0
    # lowest resolution where a 224-px tile at 0.25 µm/px spans >= 9 mask pixels: 2.0 µm/px -> 28 px
    assert mask_level(mpps, 224, 0.25) == 3
    assert mask_level([0.25], 2, 0.25) is None  # 2 x 2 < 9


# -- slides through OpenSlide --------------------------------------------------------------------
def _canvas(cells=(6, 5), cell=64, tissue=((1, 1), (2, 1), (4, 3))):
    """White canvas with saturated 'tissue' in some cells and a faint speck elsewhere."""
    rng = np.random.default_rng(0)
    img = np.full((cells[1] * cell, cells[0] * cell, 3), 245, np.uint8)
    for c, r in tissue:
        img[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = rng.integers(0, 60, (cell, cell, 3)) + \
            np.array([150, 60, 140], np.uint8)
    img[5:9, 5:9] = (120, 40, 120)  # debris far below 35 % of a cell
    return img


def test_synthetic_tiff_tiled_through_openslide_with_real_coords_and_attrs(tmp_path):
    img = _canvas()
    path = tmp_path / "slide.tif"
    write_pyramid_tiff(path, img, mpp=0.5, min_level_size=64)
    src = SlideTiles(path, tile_size=64, target_mpp=0.5)
    assert src.mpp == pytest.approx(0.5) and src.level == 0 and src.read_size == 64
    assert sorted(map(tuple, src.coords.tolist())) == [(64, 64), (128, 64), (256, 192)]  # level-0 x, y
    np.testing.assert_array_equal(src.read(src.tile_ids.index("128_64")), img[64:128, 128:192])
    attrs = src.attrs()
    assert attrs["patch_level"] == 0 and attrs["patch_size"] == 64 and attrs["patch_size_level0"] == 64
    assert attrs["slide_mpp"] == pytest.approx(0.5) and attrs["level0_width"] == 384 and attrs["level0_height"] == 320
    assert attrs["patch_size"] * attrs["level0_magnification"] / attrs["target_magnification"] == pytest.approx(64)
    # 1 µm/px: 128-px footprint at level 0, read 64 px from level 1 (2x), one tile spans cells (0..1, 0..1)
    coarse = SlideTiles(path, tile_size=64, target_mpp=1.0, min_tissue=0.2)
    assert (coarse.footprint, coarse.level, coarse.read_size) == (128, 1, 64)
    assert (coarse.coords % 128 == 0).all() and coarse.read(0).shape == (64, 64, 3)
    # a cap keeps the first tiles of the shuffled order; the fingerprint tells them apart
    capped = SlideTiles(path, tile_size=64, target_mpp=0.5, max_tiles=2)
    assert capped.coords.tolist() == src.coords[:2].tolist() and capped.fingerprint() != src.fingerprint()


def test_extraction_writes_trident_clam_geometry(tmp_path):
    from pathrobust.encoders.base import build_encoder
    from pathrobust.extract import extract_features

    write_pyramid_tiff(tmp_path / "s.tif", _canvas(), mpp=0.5, min_level_size=64)
    enc = build_encoder("rgb-histogram")
    src = SlideTiles(tmp_path / "s.tif", tile_size=64, target_mpp=0.5)
    out = extract_features(enc, src, tmp_path / "feats" / "s.h5", progress=False)
    with h5py.File(out, "r") as f:
        coords_attrs = dict(f["coords"].attrs)
        assert f["features"].shape == (3, 96) and f["coords"][:].tolist() == src.coords.tolist()
        assert f.attrs["slide_mpp"] == pytest.approx(0.5) and f.attrs["tile_size"] == 64
    assert {"patch_level", "patch_size", "patch_size_level0", "level0_magnification", "target_magnification",
            "name"} <= set(coords_attrs)
    bag = read_feature_bag(out)
    assert bag.slide_id == "s" and bag.attrs["patch_size_level0"] == 64 and bag.attrs["model"] == "rgb-histogram"
    paths = build_bags({"s": tmp_path / "s.tif"}, enc, tmp_path / "feats", Tiling(tile_size=64, target_mpp=0.5),
                       progress=False)
    assert paths["s"] == out  # same provenance: reused


def test_folder_tiles_coords_from_names(tmp_path):
    for name in ("slide_x448_y0.png", "slide_x0_y224.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name)
    assert FolderTiles(tmp_path).coords.tolist() == [[0, 224], [448, 0]]
    assert coords_from_name("512_1024") == (512, 1024)
    assert coords_from_name("img [x=512,y=1024,w=224,h=224]") == (512, 1024)
    assert coords_from_name("tile_(7, 9)") == (7, 9) and coords_from_name("sample3") is None


# -- feature bags ------------------------------------------------------------------------------
def test_trident_and_clam_bags(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(5, 8)).astype(np.float32)
    trident = tmp_path / "features_uni_v1"
    trident.mkdir()
    with h5py.File(trident / "slideA.h5", "w") as f:
        f["features"] = feats
        coords = f.create_dataset("coords", data=np.arange(10).reshape(5, 2) * 512)
        coords.attrs.update({"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
                             "target_magnification": 20, "overlap": 0, "name": "slideA"})
    bag = read_feature_bag(find_feature_file(trident, "slideA"))
    assert bag.features.shape == (5, 8) and bag.coords[1].tolist() == [1024, 1536]
    assert bag.attrs["patch_size_level0"] == 512 and bag.attrs["target_magnification"] == 20
    clam = tmp_path / "clam"
    (clam / "h5_files").mkdir(parents=True)
    (clam / "pt_files").mkdir()
    with h5py.File(clam / "h5_files" / "slideB.h5", "w") as f:
        f["features"] = feats[None]  # (1, N, D)
        f.create_dataset("coords", data=np.zeros((5, 2), np.int32)).attrs.update({"patch_level": 0, "patch_size": 256})
    torch.save(torch.from_numpy(feats[:3]), clam / "pt_files" / "slideC.pt")
    assert read_feature_bag(find_feature_file(clam, "slideB")).attrs["patch_level"] == 0
    assert read_feature_bag(find_feature_file(clam, "slideC")).features.shape == (3, 8)
    assert find_feature_file(clam, "missing") is None


def test_cap_pad_and_dims(tmp_path):
    rng = np.random.default_rng(0)
    for name, n, d in (("a", 7, 4), ("b", 3, 4), ("c", 2, 5)):
        with h5py.File(tmp_path / f"{name}.h5", "w") as f:
            f["features"] = rng.normal(size=(n, d)).astype(np.float32)
    a = read_feature_bag(tmp_path / "a.h5")
    capped = cap_bag(a, 4, seed=42)
    keep = np.sort(np.random.default_rng(42).permutation(7)[:4])
    np.testing.assert_array_equal(capped.features, a.features[keep])
    assert cap_bag(a, 4, seed=42).features.tolist() == capped.features.tolist()  # capped once, the same way
    bags = load_bags({"a": tmp_path / "a.h5", "b": tmp_path / "b.h5"}, max_tiles=5)
    padded = pad_bags(bags)
    assert padded.shape == (2, 5, 4) and np.isneginf(padded[1, 3:]).all() and np.isfinite(padded[1, :3]).all()
    with pytest.raises(UserError, match="more than the pad size 4"):
        pad_bags(bags, pad_size=4)
    with pytest.raises(UserError, match=r"c\.h5: features have dim 5, but .*a\.h5 has 4"):
        load_bags({"a": tmp_path / "a.h5", "c": tmp_path / "c.h5"})
    with pytest.raises(UserError, match="dim"):
        check_same_dim([read_feature_bag(tmp_path / "c.h5"), a])


def test_bad_feature_files(tmp_path):
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(UserError, match="junk.h5: not a readable h5 file"):
        read_feature_bag(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "nan.h5", "w") as f:
        f["features"] = np.array([[0.0, np.nan]], np.float32)
    with pytest.raises(UserError, match="NaN or infinite"):
        read_feature_bag(tmp_path / "nan.h5")
    with h5py.File(tmp_path / "nofeat.h5", "w") as f:
        f["coords"] = np.zeros((1, 2))
    with pytest.raises(UserError, match="no 'features' dataset"):
        read_feature_bag(tmp_path / "nofeat.h5")


# -- manifests -----------------------------------------------------------------------------------
def _write_csv(path: Path, header, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture()
def two_acquisitions(tmp_path):
    """Two specimens x two acquisitions of small synthetic TIFFs, and a valid manifest."""
    img = _canvas()
    rows = []
    for spec, label in (("P1", "tumor"), ("P2", "normal")):
        for acq in ("A", "B"):
            write_pyramid_tiff(tmp_path / f"{spec}_{acq}.tif", img, mpp=0.5, min_level_size=64)
            rows.append([f"{spec}_{acq}", f"{spec}_{acq}.tif", label, "train" if spec == "P1" else "test", spec,
                         spec, acq])
    header = ["slide_id", "path", "label", "split", "patient_id", "specimen_id", "acquisition"]
    return tmp_path, header, rows


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_valid_manifest(two_acquisitions):
    root, header, rows = two_acquisitions
    man = read_slide_manifest(_write_csv(root / "m.csv", header, rows), classes=("normal", "tumor"),
                              robustness=True, open_slides=True)
    assert [r.slide_id for r in man.select(split="train", acquisition="B")] == ["P1_B"]
    assert labels_of(man.records).tolist() == [1, 1, 0, 0] and man.acquisitions == ["A", "B"]
    assert man.records[0].path == root / "P1_A.tif"


@pytest.mark.parametrize("edit,fragment", [
    (lambda h, r: (h[:2] + h[3:], [x[:2] + x[3:] for x in r]), "missing column 'label'"),
    (lambda h, r: (h, [r[0][:2] + ["tumour"] + r[0][3:]] + r[1:]), "line 2: unknown label 'tumour' in column 'label'"),
    (lambda h, r: (h, [r[0][:1] + ["gone.tif"] + r[0][2:]] + r[1:]), "line 2: column 'path': "),
    (lambda h, r: (h, [x for x in r if x[0] != "P2_B"]), "specimen P2 appears under one acquisition only"),
    (lambda h, r: (h, [r[0][:3] + ["test"] + r[0][4:]] + r[1:]), "column 'patient_id': P1 has slides in splits"),
    (lambda h, r: (h, [r[0][:3] + ["holdout"] + r[0][4:]] + r[1:]), "unknown split 'holdout'"),
])
def test_manifest_errors_are_one_line(two_acquisitions, edit, fragment):
    root, header, rows = two_acquisitions
    header, rows = edit(list(header), [list(r) for r in rows])
    with pytest.raises(UserError) as exc:
        read_slide_manifest(_write_csv(root / "bad.csv", header, rows), classes=("normal", "tumor"), robustness=True)
    assert fragment in _one_line(exc) and "bad.csv" in str(exc.value)


def test_unreadable_and_blank_slides(two_acquisitions):
    root, header, rows = two_acquisitions
    (root / "P1_A.tif").write_bytes(b"II*\x00 this is no slide")
    with pytest.raises(UserError) as exc:
        read_slide_manifest(_write_csv(root / "m.csv", header, rows), classes=("normal", "tumor"), open_slides=True)
    assert "P1_A.tif: OpenSlide cannot open it" in _one_line(exc)
    write_pyramid_tiff(root / "blank.tif", np.full((256, 256, 3), 250, np.uint8), mpp=0.5, min_level_size=64)
    with pytest.raises(UserError) as exc:
        SlideTiles(root / "blank.tif", tile_size=64, target_mpp=0.5)
    assert "blank.tif: no tissue" in _one_line(exc)
    with pytest.raises(UserError, match="blank.tif: no tissue"):  # before any extraction
        build_bags({"blank": root / "blank.tif"}, None, root / "out", Tiling(64, 0.5), progress=False)
    assert not (root / "out").exists()


def test_camelyon16_layout(tmp_path):
    for name in ("normal_001", "normal_010", "tumor_001", "tumor_002"):
        folder = tmp_path / "training" / name.split("_")[0]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.tif").write_bytes(b"")
    (tmp_path / "testing" / "images").mkdir(parents=True)
    for name in ("test_001", "test_002"):
        (tmp_path / "testing" / "images" / f"{name}.tif").write_bytes(b"")
    (tmp_path / "testing" / "reference.csv").write_text("test_001,Tumor,Macro,\ntest_002,Normal,,\n")
    man = camelyon16_manifest(tmp_path)
    split = {r.slide_id: (r.split, r.label) for r in man.records}
    assert split == {"normal_001": ("train", "normal"), "tumor_002": ("train", "tumor"), "normal_010": ("val", "normal"),
                     "tumor_001": ("val", "tumor"), "test_001": ("test", "tumor"), "test_002": ("test", "normal")}
    assert len(CAMELYON16_VAL) == 54 and man.classes == ("normal", "tumor")


def test_panda_layout_and_evas_stratified_split(tmp_path):
    (tmp_path / "train_images").mkdir()
    rows = []
    for i in range(60):
        image = f"{i:032x}"
        (tmp_path / "train_images" / f"{image}.tiff").write_bytes(b"")
        rows.append([image, "radboud", i % 6, "0+0", 0 if i % 10 == 9 else 1])
    _write_csv(tmp_path / "train_with_noisy_labels.csv", ["image_id", "data_provider", "isup_grade", "gleason_score",
                                                          "noise_ratio_10"], rows)
    man = panda_manifest(tmp_path, small=False)
    kept = [f"{i:032x}" for i in range(60) if i % 10 != 9]  # eva keeps noise_ratio_10 != 0
    assert {r.slide_id for r in man.records} <= set(kept) and man.num_classes == 6
    train, val, test = stratified_split(len(kept), [int(k, 16) % 6 for k in kept], 0.7, 0.15, 0.15, seed=42)
    assert [r.slide_id for r in man.select(split="train")] == [kept[i] for i in train]
    assert [r.slide_id for r in man.select(split="test")] == [kept[i] for i in test]
    # classes of 10, 8, 10, 8, 10, 8 slides: floor(0.7 n) = 7 or 5 train, floor(0.15 n) or at least 1 val,
    # the rest test (the ratios sum to 1)
    assert (len(train), len(val), len(test)) == (36, 6, 12)
    (tmp_path / "train_images" / "extra.tiff").write_bytes(b"")
    with pytest.raises(UserError, match="61 .tiff slides, but .* lists 60"):
        panda_manifest(tmp_path)


# -- synthetic multi-acquisition slides --------------------------------------------------------------
def test_match_colours_keeps_the_colour_multiset_and_the_structure():
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    target = np.zeros((16, 16, 3), np.uint8)
    target[4:12, 4:12] = 200  # a bright square on dark
    out = match_colours(target, source)
    assert sorted(map(tuple, out.reshape(-1, 3))) == sorted(map(tuple, source.reshape(-1, 3)))
    assert out[4:12, 4:12].astype(int).sum(-1).min() >= out.astype(int).sum(-1)[:4].max()  # square stays brightest


def test_synthetic_slides_small(tmp_path):
    cfg = SynthSlidesConfig(specimens=6, folds=3, stainings=("GV", "KRH"), scanners=("S60",), grid=(5, 4), cell=64,
                            islands=((2, 2), (1, 2)), specks=3)
    out = synth_slides(tmp_path / "slides", cfg, progress=False)
    man = read_slide_manifest(out / "manifest.csv", classes=("normal", "atypia"), robustness=True, open_slides=True)
    assert len(man) == 12 and man.acquisitions == ["GV_S60", "KRH_S60"] and cfg.reference == "GV_S60"
    assert sorted(labels_of(man.records).tolist()) == [0] * 6 + [1] * 6 and man.folds == [0, 1, 2]
    for split in ("train", "val", "test"):  # every split holds both labels
        assert set(labels_of(man.select(split=split)).tolist()) == {0, 1}
    src = SlideTiles(man.records[0].path, tile_size=64, target_mpp=0.5, max_tiles=64)
    assert src.mpp == pytest.approx(0.5) and len(src) == 6 and (src.coords % 64 == 0).all()  # 2x2 + 1x2 cells
    with pytest.raises(UserError, match="not empty"):
        synth_slides(out, cfg, progress=False)


def test_zoomed_tissue_has_larger_nuclei_and_the_same_histogram():
    from pathrobust.data.he import sample_he_tiles
    from pathrobust.data.synth_slides import _zoomed

    window = np.ascontiguousarray(sample_he_tiles(1, 224, seed=3, min_tissue=0.9)[0])
    zoomed = _zoomed(window, 2.0, 112)
    for y in (0, 112):
        for x in (0, 112):
            a, b = window[y:y + 112, x:x + 112], zoomed[y:y + 112, x:x + 112]
            assert np.array_equal(np.sort(a.reshape(-1, 3).view("u1,u1,u1"), axis=0),
                                  np.sort(b.reshape(-1, 3).view("u1,u1,u1"), axis=0))
    assert nucleus_area(zoomed) > 2 * nucleus_area(window)
