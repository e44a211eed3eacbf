"""Patch-token grids (eva's timm features_only path) and their per-tile h5 cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import tiny_vit_spec
from pathrobust.data.tiles import ArrayTiles
from pathrobust.encoders.base import build_encoder
from pathrobust.encoders.grid import embed_token_grids, load_token_grids, token_grid, token_grid_shape
from pathrobust.errors import UserError
from pathrobust.registry import EncoderSpec


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vit():
    enc = build_encoder(tiny_vit_spec(img=56, dim=32, depth=2), weights="random")
    with torch.no_grad():  # a final norm that is not the identity, so "no norm" is visible
        enc.backbone.norm.weight.normal_(1.0, 0.5)
        enc.backbone.norm.bias.normal_(0.0, 0.5)
    return enc


def test_vit_grid_is_last_block_without_final_norm(vit):
    x = torch.randint(0, 256, (2, 3, 56, 56), dtype=torch.uint8)
    with torch.no_grad():
        grid = token_grid(vit, x)
        assert grid.shape == (2, 32, 4, 4)
        b = vit.backbone
        t = b.norm_pre(b.patch_drop(b._pos_embed(b.patch_embed(vit.normalize(x)))))
        t = b.blocks(t)  # the last block's output, before the final norm
        expect = t[:, vit.num_prefix_tokens:].reshape(2, 4, 4, 32).permute(0, 3, 1, 2)
        assert torch.allclose(grid, expect, atol=1e-6)
        # pathrobust's pooled path (forward_tokens) is after the final norm: not the grid
        normed = vit.forward_tokens(x)[:, vit.num_prefix_tokens:].reshape(2, 4, 4, 32).permute(0, 3, 1, 2)
        assert not torch.allclose(grid, normed, atol=1e-3)


def test_cnn_grid_is_final_feature_map_without_the_average_token():
    spec = EncoderSpec(name="tiny-cnn", family="test", arch="resnet10t", arch_kwargs={}, input_size=64,
                       poolings={"cls": 512}, num_prefix_tokens=1, pretrained=False, precision="fp32")
    enc = build_encoder(spec, weights="random")
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        grid = token_grid(enc, x)
        fmap = enc.backbone.forward_features(enc.normalize(x))
        tokens = enc.forward_tokens(x)
    assert grid.shape == fmap.shape == (2, 512, 2, 2)
    assert torch.allclose(grid, fmap, atol=1e-5)
    # the same numbers as pathrobust's tokens after their leading global-average token
    assert torch.allclose(grid.flatten(2).transpose(1, 2), tokens[:, 1:], atol=1e-5)


def test_no_patch_tokens_is_one_line_user_error(vit):
    hist = build_encoder("rgb-histogram", weights="random")
    x = torch.zeros(1, 3, 56, 56, dtype=torch.uint8)
    for enc, inp in ((hist, x), (vit, torch.zeros(1, 3, 10, 10, dtype=torch.uint8)),
                     (vit, torch.zeros(1, 3, 112, 112, dtype=torch.uint8))):
        with pytest.raises(UserError) as err:
            token_grid(enc, inp)
        msg = str(err.value)
        assert "\n" not in msg and "patch-token grid" in msg and enc.name in msg
    assert token_grid_shape(hist) is None and token_grid_shape(vit, 10) is None
    assert token_grid_shape(vit) == (32, 4, 4)


def test_grid_cache_file(vit, tmp_path):
    tiles = np.random.default_rng(0).integers(0, 256, (5, 56, 56, 3), dtype=np.uint8)
    source = ArrayTiles(tiles, name="toy", tile_ids=[f"t{i}" for i in range(5)])
    path = embed_token_grids(vit, source, tmp_path / "g.h5", batch_size=2)
    grids, attrs = load_token_grids(path)
    assert grids.shape == (5, 32, 4, 4) and grids.dtype == np.float16
    assert attrs["kind"] == "token_grid" and attrs["model"] == vit.name and attrs["dtype"] == "float16"
    with torch.no_grad():
        direct = token_grid(vit, torch.from_numpy(tiles).permute(0, 3, 1, 2)).numpy()
    assert np.allclose(grids, direct, atol=2e-3 * np.abs(direct).max())
    assert not list(tmp_path.glob("*.tmp"))
    mtime = path.stat().st_mtime_ns
    assert embed_token_grids(vit, source, path) == path and path.stat().st_mtime_ns == mtime  # reused
    with pytest.raises(UserError, match="another model"):
        embed_token_grids(vit, source, path, dtype="float32")
    f32 = embed_token_grids(vit, source, path, dtype="float32", overwrite=True)
    assert load_token_grids(f32)[0].dtype == np.float32
    with pytest.raises(UserError, match="empty"):
        embed_token_grids(vit, ArrayTiles(tiles[:0], name="none"), tmp_path / "e.h5")
