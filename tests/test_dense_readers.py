"""Dense readers on tiny files in the real layouts: CoNSeP (.mat labels), MoNuSAC (ImageScope
XML), the generic PNG-pair layout; bad input is one UserError line naming the file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from pathrobust.data.eva_dense import (CONSEP_CLASSES, consep_grid, polygon_pixels, rasterize_monusac_xml,
                                       read_consep, read_generic_dense, read_monusac, resize_and_crop)
from pathrobust.errors import UserError


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# -- CoNSeP -----------------------------------------------------------------------------------
def _consep_image(root, folder, stem, size=500, type_map=None, mask_size=None, seed=0):
    rng = np.random.default_rng(seed)
    (root / folder / "Images").mkdir(parents=True, exist_ok=True)
    (root / folder / "Labels").mkdir(parents=True, exist_ok=True)
    rgba = rng.integers(0, 256, (size, size, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(root / folder / "Images" / f"{stem}.png")  # CoNSeP ships RGBA PNGs
    if type_map is None:
        ms = mask_size or size
        type_map = np.zeros((ms, ms), np.int32)
        for t in range(8):  # one square per source type, top-left 250 px tile holds 0..3
            y, x = (t // 4) * 120 + 10, (t % 4) * 120 + 10
            type_map[y:y + 60, x:x + 60] = t
    inst = (type_map > 0).astype(np.int32)
    scipy.io.savemat(root / folder / "Labels" / f"{stem}.mat",
                     {"inst_map": inst, "type_map": type_map, "inst_type": np.zeros((1, 1)),
                      "inst_centroid": np.zeros((1, 2))})
    return rgba[..., :3], type_map


def test_consep_tiles_classes_and_grid(tmp_path):
    image, type_map = _consep_image(tmp_path, "Train", "train_1")
    _consep_image(tmp_path, "Test", "test_1", seed=1)
    task = read_consep(tmp_path)
    assert task.labels.class_names == CONSEP_CLASSES and task.labels.num_classes == 5
    assert (task.train_split, task.val_split, task.eval_split) == ("train", "val", "val")
    train = task.splits["train"]
    assert len(train) == 4 and len(task.splits["val"]) == 4  # 500 px -> 2 x 2 tiles of 250
    grid = consep_grid(500, 500)
    assert sorted(grid) == [(0, 0), (0, 250), (250, 0), (250, 250)]
    assert [tuple(c) for c in train.coords] == grid  # eva's GridSampler order (rng 42 shuffle)
    for i, (x, y) in enumerate(grid):
        tile, mask = train.pair(i)
        assert tile.shape == (224, 224, 3) and mask.shape == (224, 224)
        expect_img, expect_mask = resize_and_crop(image[y:y + 250, x:x + 250], type_map[y:y + 250, x:x + 250], 224)
        assert np.array_equal(tile, expect_img)
        merged = np.where(expect_mask == 4, 3, expect_mask)
        assert np.array_equal(mask, np.where(merged > 4, 4, merged))
    masks = np.stack([train.mask(i) for i in range(4)])
    assert set(np.unique(masks)) == {0, 1, 2, 3, 4}  # 3, 4 -> 3 and 5, 6, 7 -> 4
    # the 60 px square of type 1 at x=130, y=10 maps to a ~54 px square of class 1
    top_left = grid.index((0, 0))
    assert abs(int((train.mask(top_left) == 1).sum()) - (60 * 224 / 250) ** 2) < 200


def test_consep_tile_resize_is_nearest_for_masks():
    mask = np.zeros((250, 250), np.int64)
    mask[::2] = 4  # stripes: any interpolation but nearest would invent other values
    img = np.zeros((250, 250, 3), np.uint8)
    _, out = resize_and_crop(img, mask, 224)
    assert set(np.unique(out)) == {0, 4}


def test_consep_bad_inputs(tmp_path):
    _consep_image(tmp_path / "a", "Train", "train_1", mask_size=400)
    _consep_image(tmp_path / "a", "Test", "test_1")
    task = read_consep(tmp_path / "a")
    with pytest.raises(UserError) as err:
        task.splits["train"].read(0)
    assert "train_1.mat" in _one_line(err) and "400x400" in str(err.value)

    bad = np.zeros((500, 500), np.int32)
    bad[0, 0] = 9
    _consep_image(tmp_path / "b", "Train", "train_1", type_map=bad)
    _consep_image(tmp_path / "b", "Test", "test_1")
    with pytest.raises(UserError) as err:
        read_consep(tmp_path / "b").splits["train"].mask(0)
    assert "class id 9 out of range" in _one_line(err)

    _consep_image(tmp_path / "c", "Train", "train_1")
    with pytest.raises(UserError) as err:
        read_consep(tmp_path / "c")
    assert "'val' is empty" in _one_line(err)


# -- MoNuSAC ----------------------------------------------------------------------------------
def _annotation(label, polygons):
    regions = "".join(
        '<Region Id="{}" Type="0"><Attributes/><Vertices>{}</Vertices></Region>'.format(
            i, "".join(f'<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y in poly))
        for i, poly in enumerate(polygons, 1))
    return (f'<Annotation Id="1" Type="4"><Attributes><Attribute Name="{label}" Id="0" Value=""/></Attributes>'
            f'<Regions><RegionAttributeHeaders><AttributeHeader Id="9999" Name="Region"/></RegionAttributeHeaders>'
            f'{regions}</Regions><Plots/></Annotation>')


def _monusac_image(path, width, height, annotations, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgba = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(path)
    path.with_suffix(".xml").write_text('<?xml version="1.0"?><Annotations MicronsPerPixel="0.25">'
                                        + "".join(annotations) + "</Annotations>")


def test_polygon_rule_matches_scikit_image_hand_cases():
    # triangle (0,0), (4,0), (0,4) in (row, col): pixels with r, c >= 0 and r + c <= 4, boundary included
    rr, cc = polygon_pixels([0, 4, 0], [0, 0, 4], (10, 10))
    assert sorted(zip(rr.tolist(), cc.tolist())) == sorted((r, c) for r in range(5) for c in range(5) if r + c <= 4)
    # fractional square: centres strictly inside only; clipped to the shape
    rr, cc = polygon_pixels([1.5, 1.5, 3.5, 3.5], [0.5, 2.5, 2.5, 0.5], (10, 10))
    assert sorted(zip(rr.tolist(), cc.tolist())) == [(2, 1), (2, 2), (3, 1), (3, 2)]
    rr, cc = polygon_pixels([-2, -2, 2, 2], [-2, 3, 3, -2], (2, 2))
    assert sorted(zip(rr.tolist(), cc.tolist())) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_monusac_xml_classes_and_unknown_labels(tmp_path):
    xml = tmp_path / "x.xml"
    square = [(10, 5), (20, 5), (20, 15), (10, 15)]
    xml.write_text("<Annotations>" + _annotation("Epithelial", [square]) + _annotation("Macrophage", [[(30, 2), (34, 2), (34, 6)]])
                   + _annotation("Unknown cell", [[(40, 10), (44, 10), (44, 14), (40, 14)]])
                   + _annotation("Ambiguous", [[(18, 13), (25, 13), (25, 20), (18, 20)]]) + "</Annotations>")
    mask = rasterize_monusac_xml(xml, 50, 30)
    assert mask.shape == (30, 50)
    assert (mask[5:13, 10:18] == 1).all() and mask[5, 21] == 0 and mask[4, 15] == 0  # boundary in, outside out
    assert mask[2, 34] == 4 and mask[6, 30] == 0  # X is the column, Y the row
    assert (mask[10:15, 40:45] == 5).all()  # unknown label -> ambiguous, as eva
    assert mask[15, 20] == 5  # later annotations overwrite earlier ones
    assert set(np.unique(mask)) == {0, 1, 4, 5}


def test_monusac_splits_geometry_and_views(tmp_path):
    train_dir = tmp_path / "MoNuSAC_images_and_annotations" / "TCGA-A"
    test_dir = tmp_path / "MoNuSAC Testing Data and Annotations" / "TCGA-B"
    ann = [_annotation("Lymphocyte", [[(5, 5), (25, 5), (25, 25), (5, 25)]])]
    _monusac_image(train_dir / "TCGA-A_1.tif", 60, 40, ann)
    _monusac_image(train_dir / "TCGA-A_2.tif", 50, 50, ann, seed=1)
    _monusac_image(test_dir / "TCGA-B_1.tif", 60, 40, ann, seed=2)
    task = read_monusac(tmp_path, train_views=3, seed=0)
    assert task.labels.num_classes == 5 and task.labels.ignore_index == 5 and task.labels.metric_num_classes == 6
    assert (task.val_split, task.eval_split) == ("test", "test")
    train, test = task.splits["train"], task.splits["test"]
    assert len(train) == 6 and train.views and train.groups.tolist() == [0, 0, 0, 1, 1, 1]
    assert len(test) == 1 and not test.views
    tile, mask = test.pair(0)  # Resize(224): 40 -> 224, 60 -> 336, centre crop 224
    assert tile.shape == (224, 224, 3) and set(np.unique(mask)) == {0, 2}
    full = rasterize_monusac_xml(test_dir / "TCGA-B_1.xml", 60, 40)
    assert np.array_equal(mask, resize_and_crop(np.zeros((40, 60, 3), np.uint8), full, 224)[1])
    again = read_monusac(tmp_path, train_views=3, seed=0).splits["train"]
    assert [t.params for t in again.items] == [t.params for t in train.items]  # seeded crops
    assert len({t.params for t in train.items}) == 6
    views0 = read_monusac(tmp_path, train_views=0).splits["train"]
    assert len(views0) == 2 and not views0.views


def test_monusac_bad_inputs(tmp_path):
    with pytest.raises(UserError) as err:
        read_monusac(tmp_path)
    assert "is empty" in _one_line(err)
    d = tmp_path / "MoNuSAC_images_and_annotations" / "P"
    _monusac_image(d / "P_1.tif", 30, 30, [])
    (d / "P_1.xml").write_text("<Annotations><Annotation")
    _monusac_image(tmp_path / "MoNuSAC Testing Data and Annotations" / "Q" / "Q_1.tif", 30, 30, [])
    task = read_monusac(tmp_path, train_views=0)
    with pytest.raises(UserError) as err:
        task.splits["train"].mask(0)
    assert "P_1.xml" in _one_line(err)


# -- generic layout ---------------------------------------------------------------------------
def _generic(root, classes=("bg", "a", "b"), ignore=None, masks=None, size=32, splits=("train", "val")):
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({"classes": list(classes), "ignore_index": ignore}))
    rng = np.random.default_rng(0)
    for split in splits:
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / split / "images" / f"t{i}.png")
            m = masks if masks is not None else rng.integers(0, len(classes), (size, size), dtype=np.uint8)
            Image.fromarray(m, "L").save(root / split / "masks" / f"t{i}.png")


def test_generic_layout_reads_pairs_and_resizes(tmp_path):
    _generic(tmp_path / "d", size=40)
    task = read_generic_dense(tmp_path / "d", size=32)
    assert task.labels.class_names == ("bg", "a", "b") and task.eval_split == "val"
    images, masks = task.splits["train"].arrays()
    assert images.shape == (2, 3, 32, 32) and masks.shape == (2, 32, 32) and masks.dtype == torch.int64
    assert int(masks.max()) <= 2


def test_generic_ignore_label_becomes_extra_class(tmp_path):
    m = np.zeros((32, 32), np.uint8)
    m[:4] = 255
    m[4:8] = 1
    _generic(tmp_path / "d", ignore=255, masks=m)
    task = read_generic_dense(tmp_path / "d", size=32)
    assert task.labels.class_names[-1] == "ignore" and task.labels.ignore_index == 3 and task.labels.num_classes == 3
    assert set(np.unique(task.splits["val"].mask(0))) == {0, 1, 3}


def test_generic_bad_inputs(tmp_path):
    _generic(tmp_path / "size", size=32)
    Image.fromarray(np.zeros((30, 32), np.uint8), "L").save(tmp_path / "size" / "val" / "masks" / "t1.png")
    with pytest.raises(UserError) as err:
        read_generic_dense(tmp_path / "size", size=32).splits["val"].arrays()
    msg = _one_line(err)
    assert "t1.png" in msg and "32x30" in msg

    m = np.full((32, 32), 7, np.uint8)
    _generic(tmp_path / "range", masks=m)
    with pytest.raises(UserError) as err:
        read_generic_dense(tmp_path / "range").splits["train"].mask(0)
    assert "class id 7 out of range" in _one_line(err)

    _generic(tmp_path / "empty")
    for p in (tmp_path / "empty" / "val" / "images").iterdir():
        p.unlink()
    with pytest.raises(UserError) as err:
        read_generic_dense(tmp_path / "empty")
    assert "'val' is empty" in _one_line(err)

    _generic(tmp_path / "noval", splits=("train",))
    with pytest.raises(UserError) as err:
        read_generic_dense(tmp_path / "noval")
    assert "val/images" in _one_line(err)
