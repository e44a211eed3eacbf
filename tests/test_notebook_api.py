"""The Python API as a new user meets it from the docstrings: names, paths, specs and plain
torch modules all work where a model or a tile source is expected."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import pathrobust


class TinyCNN(nn.Module):
    """A user's own model: a feature map out of forward_features."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 4, stride=4)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _tiles(path, n=3, size=40):
    path.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path / f"t_{i * 40}_0.png")
    return path


def test_help_lists_the_entry_points():
    doc = pathrobust.__doc__
    for name in ("build_encoder", "extract_features", "run_suite", "register_suite", "list_suites"):
        assert name in doc and name in pathrobust.__all__


def test_extract_features_from_a_name_and_a_folder(tmp_path):
    tiles = _tiles(tmp_path / "tiles")
    out = pathrobust.extract_features("rgb-histogram", str(tiles), tmp_path / "x.h5", progress=False)
    ff = pathrobust.load_features(out)
    assert ff.features.shape[0] == 3 and ff.tile_ids == ["t_0_0.png", "t_40_0.png", "t_80_0.png"]
    assert ff.coords.tolist() == [[0, 0], [40, 0], [80, 0]]  # x, y from the file names


def test_plain_module_with_a_torchvision_transform(tmp_path):
    from torchvision import transforms

    transform = transforms.Compose([transforms.Resize(36), transforms.CenterCrop(32), transforms.ToTensor(),
                                    transforms.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))])
    enc = pathrobust.build_encoder(TinyCNN(), transform=transform, name="tiny-cnn")
    assert (enc.spec.input_size, enc.spec.resize_size, enc.spec.mean) == (32, 36, (0.5, 0.5, 0.5))
    assert enc.spec.poolings == {"cls": 8, "mean": 8, "cls+mean": 16} and enc.output_dim == 8
    x = torch.rand(2, 3, 32, 32)
    expected = TinyCNN().forward_features((x - 0.5) / 0.25).mean(dim=(2, 3))
    torch.testing.assert_close(enc(x), expected)
    again = pathrobust.build_encoder(TinyCNN(), transform=transform, name="tiny-cnn")
    assert again.weights_sha256 == enc.weights_sha256  # the same weights, the same identity
    out = pathrobust.extract_features(enc, _tiles(tmp_path / "tiles"), tmp_path / "f.h5", progress=False)
    assert pathrobust.load_features(out).features.shape == (3, 8)
    with pytest.raises(pathrobust.UserError, match="RandomCrop"):
        pathrobust.build_encoder(TinyCNN(), transform=transforms.Compose([transforms.RandomCrop(8)]))


def test_run_suite_with_a_module_and_an_encoder_object(tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parent / "plugins"))
    first = pathrobust.run_suite("acme_suites:ToySuite", TinyCNN(), None, tmp_path / "runs", progress=False)
    enc = pathrobust.build_encoder(TinyCNN(), name="tinycnn")
    again = pathrobust.run_suite("acme_suites:ToySuite", enc, None, tmp_path / "runs", progress=False)
    assert first["run_id"] == again["run_id"]  # same module, same weights: the same run
    assert first["model"] == "tinycnn"


def test_run_plism_accepts_a_module(tmp_path):
    from pathrobust.data.synth_plism import SynthPlismConfig, synth_plism
    from pathrobust.suites.plism import run_plism

    data = synth_plism(tmp_path / "plism", SynthPlismConfig(tiles_per_slide=4, stainings=("GV", "HR"),
                                                             scanners=("AT2", "S60"), tile_size=32), progress=False)
    with pytest.warns(UserWarning):
        summary = run_plism(model=TinyCNN(), data=data, out=tmp_path / "runs", bootstrap=0, probes=False,
                            progress=False)
    assert summary["n_pairs"] == 6 and summary["model"] == "tinycnn"
