"""Untrusted files name no code: ``module:attr`` references in an ``encoder.json``, a
``config.json`` beside the weights or in the Hugging Face cache, or a distillation recipe
are imported only when they name torch/timm layer classes or pathrobust's own callables,
unless ``trust_code=True``."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from pathrobust import trust
from pathrobust.encoders.backbone import create_backbone
from pathrobust.encoders.base import build_encoder
from pathrobust.errors import UserError
from pathrobust.registry import list_specs, resolve_spec, save_spec_dir
from tests.helpers import assert_one_line_error, run_cli, tiny_vit_spec

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def marker_module(tmp_path, monkeypatch):
    """A module whose import leaves a file behind: proof that a reference was imported."""
    site = tmp_path / "site"
    site.mkdir()
    marker = tmp_path / "imported"
    (site / "marker_layers.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        from torch import nn
        Path({str(marker)!r}).write_text("imported")

        class Norm(nn.LayerNorm):
            pass

        def build(spec):
            return nn.Identity()
    """))
    monkeypatch.syspath_prepend(str(site))
    return marker


@pytest.mark.parametrize("target,allowed", [
    ("torch.nn:SiLU", True), ("torch.nn:LayerNorm", True), ("timm.layers:SwiGLUPacked", True),
    ("timm.layers.mlp:SwiGLUPacked", True), ("pathrobust.encoders.convert:LayerNormEps12", True),
    ("pathrobust.encoders.conch:build_conch_vision", True),
    ("os:abort", False), ("subprocess:call", False), ("torch.nn.functional:relu", False),
    ("timm.layers:get_act_layer", False), ("torch:load", False), ("torch.nn:NoSuchLayer", False),
    ("pathrobust.store:connect", False), ("torch.nnx:SiLU", False),
])
def test_allow_list(target, allowed):
    assert trust.is_allowed(target) is allowed


def test_every_builtin_spec_passes_without_trust():
    for spec in list_specs():
        trust.check_spec_data(spec.to_dict(), f"<{spec.name}>")  # raises if not


def test_encoder_json_cannot_name_foreign_code(tmp_path, marker_module):
    spec = tiny_vit_spec(pretrained=False)
    for key, value in (("builder", "marker_layers:build"), ("arch_kwargs", {**spec.arch_kwargs, "norm_layer": "marker_layers:Norm"}),
                       ("weights_format", "marker_layers:build")):
        d = tmp_path / key
        save_spec_dir(spec, d)
        data = json.loads((d / "encoder.json").read_text())
        data[key] = value
        (d / "encoder.json").write_text(json.dumps(data))
        shown_key = "arch_kwargs.norm_layer" if key == "arch_kwargs" else key
        with pytest.raises(UserError) as err:
            build_encoder(str(d))
        msg = str(err.value)
        assert msg.startswith(f"{d / 'encoder.json'}: '{shown_key}' = 'marker_layers:") and "--trust-code" in msg, msg
        assert "\n" not in msg
        assert not marker_module.exists()
    enc = build_encoder(str(tmp_path / "arch_kwargs"), trust_code=True)
    assert marker_module.exists() and type(enc.backbone.norm).__name__ == "Norm"


def test_unknown_or_malformed_builder_is_one_line(tmp_path):
    spec = tiny_vit_spec(pretrained=False)
    save_spec_dir(spec, tmp_path / "m")
    path = tmp_path / "m" / "encoder.json"
    data = json.loads(path.read_text())
    for builder, trusted, message in (("nope.module:build", False, "'builder' = 'nope.module:build' is not"),
                                      ("nope.module:build", True, "cannot import module 'nope.module'"),
                                      ("justaword", False, "'builder' = 'justaword' must be MODULE:FUNCTION"),
                                      (42, False, "'builder' must be a string")):
        path.write_text(json.dumps(data | {"builder": builder}))
        with pytest.raises(UserError, match=message) as err:
            build_encoder(str(tmp_path / "m"), trust_code=trusted)
        assert "\n" not in str(err.value)
    for broken, message in (({"name": "x"}, "missing field"), (data | {"input_size": "big"}, "invalid value"),
                            ([1, 2], "expected a JSON object"), (data | {"poolings": {"cls": -3}}, "invalid dim")):
        path.write_text(json.dumps(broken))
        with pytest.raises(UserError, match=message) as err:
            resolve_spec(str(tmp_path / "m"))
        assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def _weights_dir(tmp_path: Path, model_args: dict) -> tuple[Path, object]:
    spec = tiny_vit_spec(pretrained=True)
    model = create_backbone(spec.replace(seed=2))
    d = tmp_path / "weights"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"architecture": spec.arch, "model_args": {**spec.arch_kwargs, **model_args}}))
    return d, spec


def test_config_json_beside_weights_cannot_name_foreign_code(tmp_path, marker_module):
    d, spec = _weights_dir(tmp_path, {"norm_layer": "marker_layers:Norm"})
    with pytest.raises(UserError) as err:
        build_encoder(spec, weights=str(d))
    assert str(err.value).startswith(f"{d / 'config.json'}: 'model_args.norm_layer' = 'marker_layers:Norm'")
    assert not marker_module.exists()
    assert type(build_encoder(spec, weights=str(d), trust_code=True).backbone.norm).__name__ == "Norm"
    (d / "config.json").write_text(json.dumps({"architecture": spec.arch,
                                               "model_args": {**spec.arch_kwargs, "act_layer": "torch.nn:SiLU"}}))
    assert isinstance(build_encoder(spec, weights=str(d)).backbone.blocks[0].mlp.act, torch.nn.SiLU)


def test_config_json_in_the_hf_cache_cannot_name_foreign_code(tmp_path, monkeypatch, marker_module):
    spec = tiny_vit_spec(pretrained=True, hub_id="acme/tiny")
    snap = tmp_path / "hf" / "hub" / "models--acme--tiny" / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text(COMMIT)
    model = create_backbone(spec)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snap / "model.safetensors"))
    (snap / "config.json").write_text(json.dumps({"architecture": spec.arch,
                                                  "model_args": {**spec.arch_kwargs, "mlp_layer": "marker_layers:Norm"}}))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("PATHROBUST_WEIGHTS_DIR", raising=False)
    with pytest.raises(UserError, match=r"config\.json: 'model_args\.mlp_layer' = 'marker_layers:Norm'"):
        build_encoder(spec)
    assert not marker_module.exists()


def test_os_abort_in_files_is_one_line_through_the_cli(tmp_path):
    """The issue's example: ``"act_layer": "os:abort"`` aborted the process."""
    spec = tiny_vit_spec(pretrained=False)
    save_spec_dir(spec, tmp_path / "m")
    data = json.loads((tmp_path / "m" / "encoder.json").read_text())
    data["arch_kwargs"]["act_layer"] = "os:abort"
    (tmp_path / "m" / "encoder.json").write_text(json.dumps(data))
    shown = run_cli("models", "show", str(tmp_path / "m"), "--json")  # shown, not built: nothing imported
    assert shown.returncode == 0 and json.loads(shown.stdout)["arch_kwargs"]["act_layer"] == "os:abort"
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    Image.fromarray(np.zeros((56, 56, 3), np.uint8)).save(tiles / "a.png")
    proc = run_cli("extract", "--model", str(tmp_path / "m"), "--data", str(tiles), "--out", str(tmp_path / "f"))
    assert_one_line_error(proc, "encoder.json", "'arch_kwargs.act_layer' = 'os:abort'", "--trust-code")
    assert proc.returncode == 2 and not (tmp_path / "f").exists()


def test_recipe_cannot_name_foreign_code(tmp_path, marker_module):
    import tomllib

    from pathrobust.distill.recipe import recipe_from_dict
    from pathrobust.distill.trainer import build_student_backbone
    from tests.test_distill_train import tiny_recipe_toml

    data = tomllib.loads(tiny_recipe_toml("rgb-histogram"))
    data["student"]["arch_kwargs"]["norm_layer"] = "marker_layers:Norm"
    r = recipe_from_dict(data, "tiny.toml")
    with pytest.raises(UserError, match="tiny.toml: 'student.arch_kwargs.norm_layer' = 'marker_layers:Norm'"):
        build_student_backbone(r)
    assert not marker_module.exists()
    assert type(build_student_backbone(r, trust_code=True).norm).__name__ == "Norm"
