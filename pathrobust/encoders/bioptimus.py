"""Bioptimus: H-optimus-0/1 (ViT-g/14, 4 registers) and H0-mini, distilled from H-optimus-0."""

from pathrobust.registry import EncoderSpec, register_encoder

HO_MEAN = (0.707223, 0.578729, 0.703617)
HO_STD = (0.211883, 0.230117, 0.177517)
SWIGLU = {"mlp_layer": "timm.layers:SwiGLUPacked", "act_layer": "torch.nn:SiLU"}


@register_encoder
def h0_mini() -> EncoderSpec:
    return EncoderSpec(
        name="h0-mini",
        family="bioptimus",
        arch="vit_base_patch14_reg4_dinov2",
        # packed SwiGLU hidden 4096 = 768 * 5.33334; 5 prefix tokens (CLS + 4 registers)
        arch_kwargs={"img_size": 224, "mlp_ratio": 5.33334, "init_values": 1e-5, "dynamic_img_size": False, **SWIGLU},
        hub_id="bioptimus/H0-mini",
        mean=HO_MEAN,
        std=HO_STD,
        # cls+mean is the model card's recommendation and the paper's HEST setting
        poolings={"cls": 768, "cls+mean": 1536, "mean": 768},
        default_pooling="cls",
        num_prefix_tokens=5,
        params=85_700_000,
        license="CC-BY-NC-ND-4.0",
        gated=True,
        description="ViT-B/14 distilled from H-optimus-0 with DINO + iBOT (Filiot et al., 2025)",
    )


def _h_optimus(name: str, hub_id: str, gated: bool, description: str) -> EncoderSpec:
    return EncoderSpec(
        name=name,
        family="bioptimus",
        arch="vit_giant_patch14_reg4_dinov2",
        arch_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
        hub_id=hub_id,
        mean=HO_MEAN,
        std=HO_STD,
        poolings={"cls": 1536, "cls+mean": 3072, "mean": 1536},
        num_prefix_tokens=5,
        params=1_134_000_000,
        license="Apache-2.0" if not gated else "CC-BY-NC-ND-4.0",
        gated=gated,
        description=description,
    )


@register_encoder
def h_optimus_0() -> EncoderSpec:
    return _h_optimus("h-optimus-0", "bioptimus/H-optimus-0", False, "ViT-g/14 trained on >500k H&E slides")


@register_encoder
def h_optimus_1() -> EncoderSpec:
    return _h_optimus("h-optimus-1", "bioptimus/H-optimus-1", True, "ViT-g/14 trained on >1M slides")
