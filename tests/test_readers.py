"""Tile readers on files in their real layouts: folders, h5, and an Aperio SVS via OpenSlide."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from PIL import Image

from pathrobust.data.he import bundled_slide_path, sample_he_tiles
from pathrobust.data.slides import SlideTiles, otsu_threshold, tissue_mask
from pathrobust.data.tiles import FolderTiles, H5Tiles
from pathrobust.errors import UserError


def test_folder_tiles_sorted_with_coords_from_names(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "sub").mkdir()
    for name in ("b_448_0.png", "a_0_224.jpg", "sub/c.tif"):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not a tile")
    src = FolderTiles(tmp_path)
    assert src.tile_ids == ["a_0_224.jpg", "b_448_0.png", "sub/c.tif"]
    assert src.coords.tolist() == [[0, 224], [448, 0], [2, 0]]
    assert src.read(1).shape == (20, 20, 3) and src.read(1).dtype == np.uint8


def test_folder_errors(tmp_path):
    with pytest.raises(UserError, match="no image tiles"):
        FolderTiles(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(UserError, match="broken.png: cannot read image"):
        FolderTiles(tmp_path).read(0)


def test_h5_tiles_hest_layout(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["img"] = imgs
        f["coords"] = np.array([[0, 0], [32, 0], [0, 32], [32, 32]])
        f["barcode"] = np.array([[b"AAA"], [b"CCC"], [b"GGG"], [b"TTT"]])
    src = H5Tiles(tmp_path / "s.h5")
    assert len(src) == 4 and src.tile_ids == ["AAA", "CCC", "GGG", "TTT"]
    np.testing.assert_array_equal(src.read(2), imgs[2])
    import pickle

    assert np.array_equal(pickle.loads(pickle.dumps(src)).read(3), imgs[3])  # worker-safe
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f["other"] = np.zeros(3)
    with pytest.raises(UserError, match="no tile dataset"):
        H5Tiles(tmp_path / "bad.h5")


def test_otsu_and_tissue_mask_by_hand():
    values = np.array([10] * 50 + [200] * 50, dtype=np.uint8)
    assert 10 <= otsu_threshold(values) < 200
    img = np.full((10, 10, 3), 245, np.uint8)
    img[:5] = (150, 60, 140)  # H&E-ish purple on the top half
    mask = tissue_mask(img)
    assert mask[:5].all() and not mask[5:].any()


def test_aperio_svs_grid_at_target_resolution():
    src = SlideTiles(bundled_slide_path(), tile_size=224, target_mpp=0.5)
    assert src.mpp == pytest.approx(0.499)
    assert src.footprint == 224 and len(src) > 20
    assert (src.coords % 224 == 0).all()  # level-0 grid
    tile = src.read(0)
    assert tile.shape == (224, 224, 3) and tile.std() > 10  # real texture, not blank
    coarse = SlideTiles(bundled_slide_path(), tile_size=224, target_mpp=1.0, min_tissue=0.3)
    assert coarse.footprint == 448 and coarse.read(0).shape == (224, 224, 3)


def test_bundled_he_sampler_is_deterministic():
    a, ca = sample_he_tiles(3, 64, seed=5, return_coords=True)
    b, cb = sample_he_tiles(3, 64, seed=5, return_coords=True)
    assert np.array_equal(a, b) and np.array_equal(ca, cb)
    assert a.shape == (3, 64, 64, 3)
