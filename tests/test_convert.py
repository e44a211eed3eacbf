"""transformers-layout checkpoints (Phikon, Phikon-v2, Hibou, Midnight) load into timm ViTs
and give the same tokens as the transformers model itself."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from pathrobust.encoders.base import build_encoder
from pathrobust.registry import EncoderSpec

transformers = pytest.importorskip("transformers")

SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}


def _randomise(model: torch.nn.Module) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)


def _spec(arch: str, fmt: str, img: int, **kwargs) -> EncoderSpec:
    return EncoderSpec(name="hf-test", family="test", arch=arch, weights_format=fmt, input_size=img,
                       arch_kwargs={"img_size": img, "embed_dim": 64, "depth": 2, "num_heads": 2, **kwargs},
                       poolings={"cls": 64}, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), precision="fp32")


def _compare(hf_model, spec, img, tmp_path, rename=None):
    _randomise(hf_model)
    sd = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    if rename:
        sd = {rename(k): v for k, v in sd.items()}
    save_file(sd, str(tmp_path / "model.safetensors"))
    enc = build_encoder(spec, weights=str(tmp_path / "model.safetensors"))
    x = torch.rand(2, 3, img, img)
    with torch.inference_mode():
        want = hf_model.eval()(pixel_values=x).last_hidden_state
        got = enc.forward_tokens(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _classic_vit_names(key: str) -> str:
    """transformers 4 names, as published checkpoints such as owkin/phikon store them."""
    key = key.replace("layers.", "encoder.layer.")
    for new, old in (("attention.q_proj", "attention.attention.query"), ("attention.k_proj", "attention.attention.key"),
                     ("attention.v_proj", "attention.attention.value"), ("attention.o_proj", "attention.output.dense"),
                     ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")):
        key = key.replace(new, old)
    return key


@pytest.mark.parametrize("rename", [None, _classic_vit_names], ids=["transformers5", "classic"])
def test_vit_model_like_phikon(tmp_path, rename):
    hf = transformers.ViTModel(transformers.ViTConfig(**SMALL, image_size=32, patch_size=16), add_pooling_layer=True)
    spec = _spec("vit_base_patch16_224", "transformers-vit", 32, mlp_ratio=2.0,
                 norm_layer="pathrobust.encoders.convert:LayerNormEps12")
    _compare(hf, spec, 32, tmp_path, rename)


def test_dinov2_like_phikon_v2(tmp_path):
    hf = transformers.Dinov2Model(transformers.Dinov2Config(**SMALL, image_size=56, patch_size=14))
    # Dinov2Config sizes its MLP by mlp_ratio (4), not intermediate_size
    _compare(hf, _spec("vit_small_patch14_dinov2", "transformers-dinov2", 56, mlp_ratio=4.0), 56, tmp_path)


def test_dinov2_swiglu_like_midnight(tmp_path):
    hf = transformers.Dinov2Model(transformers.Dinov2Config(**SMALL, image_size=56, patch_size=14, use_swiglu_ffn=True))
    hidden = hf.config.hidden_size * hf.config.mlp_ratio
    packed = 2 * ((int(hidden * 2 / 3) + 7) // 8 * 8)  # transformers' SwiGLU width, packed gate+up
    spec = _spec("vit_small_patch14_dinov2", "transformers-dinov2", 56, mlp_ratio=packed / 64,
                 mlp_layer="timm.layers:SwiGLUPacked", act_layer="torch.nn:SiLU")
    _compare(hf, spec, 56, tmp_path)


def test_dinov2_with_registers_like_hibou(tmp_path):
    hf = transformers.Dinov2WithRegistersModel(
        transformers.Dinov2WithRegistersConfig(**SMALL, image_size=56, patch_size=14, num_register_tokens=4))
    spec = _spec("vit_small_patch14_reg4_dinov2", "transformers-dinov2", 56, mlp_ratio=4.0)
    _compare(hf, spec.replace(num_prefix_tokens=5), 56, tmp_path)
