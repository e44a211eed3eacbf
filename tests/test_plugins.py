"""Third-party encoders: entry points, module:factory, file.py:factory, h5 output."""

from __future__ import annotations

import textwrap

import h5py
import numpy as np
from PIL import Image

from tests.helpers import assert_one_line_error, run_cli

PLUGIN_SOURCE = textwrap.dedent('''
    from pathrobust import EncoderSpec

    def tiny():
        return EncoderSpec(
            name="{name}", family="acme", arch="vit_small_patch16_224",
            arch_kwargs={{"img_size": 32, "patch_size": 16, "embed_dim": 48, "depth": 1, "num_heads": 2}},
            input_size=32, poolings={{"cls": 48, "cls+mean": 96}}, pretrained=False, precision="fp32",
        )
''')


def _tiles(path, n=5):
    path.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path / f"t{i}.png")
    return path


def test_entry_point_plugin_extracts(tmp_path):
    site = tmp_path / "site"
    (site / "acme_encoders").mkdir(parents=True)
    (site / "acme_encoders" / "__init__.py").write_text(PLUGIN_SOURCE.format(name="acme-tiny"))
    dist = site / "acme_encoders-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-encoders\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[pathrobust.encoders]\nacme = acme_encoders:tiny\n")
    env = {"PYTHONPATH": str(site)}
    listed = run_cli("models", "list", "--json", env=env, check=True)
    assert "acme-tiny" in listed.stdout
    tiles = _tiles(tmp_path / "tiles")
    run_cli("extract", "--model", "acme-tiny", "--pooling", "cls+mean", "--data", str(tiles), "--out",
            str(tmp_path / "out"), "--workers", "0", env=env, check=True)
    with h5py.File(tmp_path / "out" / "acme-tiny" / "tiles.h5") as f:
        assert f["features"].shape == (5, 96)
        assert [t.decode() for t in f["tile_ids"][:]] == [f"t{i}.png" for i in range(5)]


def test_file_and_module_factories(tmp_path):
    (tmp_path / "my_encoder.py").write_text(PLUGIN_SOURCE.format(name="from-file"))
    tiles = _tiles(tmp_path / "tiles")
    run_cli("extract", "--model", f"{tmp_path / 'my_encoder.py'}:tiny", "--data", str(tiles), "--out",
            str(tmp_path / "out"), "--workers", "0", check=True)
    assert h5py.File(tmp_path / "out" / "from-file" / "tiles.h5")["features"].shape == (5, 48)
    shown = run_cli("models", "show", "my_encoder:tiny", "--json", env={"PYTHONPATH": str(tmp_path)}, check=True)
    assert '"name": "from-file"' in shown.stdout


def test_bad_model_references_are_one_line_errors(tmp_path):
    tiles = _tiles(tmp_path / "tiles")
    assert_one_line_error(run_cli("extract", "--model", "nope.module:x", "--data", str(tiles)), "nope.module")
    assert_one_line_error(run_cli("extract", "--model", "missing.py:x", "--data", str(tiles)), "missing.py")
    assert_one_line_error(run_cli("extract", "--model", "no-such-model", "--data", str(tiles)), "no-such-model")
    assert_one_line_error(run_cli("extract", "--model", "rgb-histogram", "--pooling", "cls+mean", "--data", str(tiles)),
                          "--pooling cls+mean")
    assert_one_line_error(run_cli("extract", "--model", "rgb-histogram", "--data", str(tmp_path / "nowhere")), "nowhere")
