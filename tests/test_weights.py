"""Weights: Hugging Face cache layout, local files, env dir, and the error messages."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pathrobust.encoders.base import build_encoder, create_backbone
from pathrobust.errors import UserError
from pathrobust.registry import get_spec
from pathrobust.weights import locate_weights, sha256_file
from tests.helpers import assert_one_line_error, run_cli, tiny_vit_spec

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_hf_cache(home: Path, repo_id: str, state_dict: dict, config: dict) -> Path:
    """The on-disk layout huggingface_hub uses: refs/main -> snapshot dir with the files."""
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(snap / "model.safetensors"))
    (snap / "config.json").write_text(json.dumps(config))
    return snap / "model.safetensors"


@pytest.fixture(scope="module")
def h0_mini_cache(tmp_path_factory):
    """A fake HF cache holding randomly initialised weights of the exact H0-mini architecture
    (ViT-B/14, 4 registers, SwiGLU), with a timm-style config.json like the hub's."""
    home = tmp_path_factory.mktemp("hf_home")
    spec = get_spec("h0-mini")
    model = create_backbone(spec.replace(seed=123))
    config = {
        "architecture": "vit_base_patch14_reg4_dinov2",
        "num_classes": 0,
        "model_args": {"img_size": 224, "mlp_ratio": 5.33334, "init_values": 1e-5, "num_classes": 0},
        "pretrained_cfg": {"mean": list(spec.mean), "std": list(spec.std)},
    }
    weights = make_hf_cache(home, "bioptimus/H0-mini", model.state_dict(), config)
    return home, weights, model


@pytest.fixture(scope="module")
def tile_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiles")
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(d / f"tile_{i * 224}_0.png")
    return d


def test_extract_h0_mini_from_a_fake_hf_cache(h0_mini_cache, tile_dir, tmp_path):
    home, weights, model = h0_mini_cache
    env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PATHROBUST_CACHE": str(tmp_path / "cache")}
    feats = {}
    for pooling, dim in (("cls", 768), ("cls+mean", 1536)):
        out = tmp_path / pooling
        run_cli("extract", "--model", "h0-mini", "--pooling", pooling, "--data", str(tile_dir), "--out", str(out),
                "--workers", "0", env=env, check=True)
        with h5py.File(out / "h0-mini" / f"{tile_dir.name}.h5") as f:
            feats[pooling] = f["features"][:]
            assert feats[pooling].shape == (3, dim)
            assert f.attrs["weights_sha256"] == sha256_file(weights)
            assert f.attrs["pooling"] == pooling
            assert f.attrs["weights_source"].startswith("hf:bioptimus/H0-mini")
    # The features are those of the cached weights, not of a fresh random init.
    from PIL import Image

    x = torch.from_numpy(np.array(Image.open(sorted(tile_dir.glob("*.png"))[0]))).permute(2, 0, 1)[None]
    spec = get_spec("h0-mini")
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        expected = model.eval().forward_features((x / 255.0 - mean) / std)[:, 0]
    np.testing.assert_allclose(feats["cls"][0], expected[0].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(feats["cls+mean"][:, :768], feats["cls"], rtol=1e-5, atol=1e-5)


def test_missing_gated_weights_message(tmp_path, tile_dir):
    proc = run_cli("extract", "--model", "h0-mini", "--data", str(tile_dir), "--out", str(tmp_path / "o"),
                   env={"HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"})
    assert_one_line_error(proc, "models--bioptimus--H0-mini", "https://huggingface.co/bioptimus/H0-mini", "--weights")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.h5"))
    spec = get_spec("h0-mini")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(tmp_path / "empty"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.delenv("PATHROBUST_WEIGHTS_DIR", raising=False)
        with pytest.raises(UserError) as err:
            locate_weights(spec)
    msg = str(err.value)
    assert "\n" not in msg
    assert "models--bioptimus--H0-mini" in msg  # where it looked
    assert "https://huggingface.co/bioptimus/H0-mini" in msg  # how to get access
    assert "--weights" in msg and "gated" in msg  # how to pass a local file


def test_explicit_file_torch_and_safetensors_and_env_dir(tmp_path, monkeypatch):
    spec = tiny_vit_spec(pretrained=True)
    reference = create_backbone(spec.replace(seed=7))
    sd = reference.state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    x = torch.rand(2, 3, 56, 56)
    with torch.inference_mode():
        want = reference.eval().forward_features((x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1))[:, 0]
        for path in (tmp_path / "w.pth", tmp_path / "w.safetensors"):
            enc = build_encoder(spec, weights=str(path))
            torch.testing.assert_close(enc(x), want)
            assert enc.weights_sha256 == sha256_file(path)
        (tmp_path / "dir" / spec.name).mkdir(parents=True)
        (tmp_path / "w.safetensors").rename(tmp_path / "dir" / spec.name / "model.safetensors")
        monkeypatch.setenv("PATHROBUST_WEIGHTS_DIR", str(tmp_path / "dir"))
        torch.testing.assert_close(build_encoder(spec)(x), want)


def test_mismatched_checkpoint_names_first_key_and_shapes(tmp_path):
    spec = tiny_vit_spec(pretrained=True)
    other = create_backbone(tiny_vit_spec(dim=32))
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(UserError) as err:
        build_encoder(spec, weights=str(tmp_path / "bad.safetensors"))
    msg = str(err.value)
    assert "bad.safetensors" in msg and "'cls_token'" in msg and "(1, 1, 32)" in msg and "(1, 1, 64)" in msg


def test_unreadable_weights_file(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.safetensors: cannot read weights"):
        build_encoder(tiny_vit_spec(pretrained=True), weights=str(tmp_path / "junk.safetensors"))
