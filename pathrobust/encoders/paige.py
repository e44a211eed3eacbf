"""Paige: Virchow and Virchow2 (ViT-H/14, SwiGLU; Virchow2 with 4 registers)."""

from pathrobust.registry import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, register_encoder

VIRCHOW_KWARGS = {
    "img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "dynamic_img_size": True,
    "mlp_layer": "timm.layers:SwiGLUPacked", "act_layer": "torch.nn:SiLU",
}


def _virchow(name: str, hub_id: str, registers: int, description: str) -> EncoderSpec:
    kwargs = dict(VIRCHOW_KWARGS)
    if registers:
        kwargs["reg_tokens"] = registers
    return EncoderSpec(
        name=name,
        family="paige",
        arch="vit_huge_patch14_224",
        arch_kwargs=kwargs,
        hub_id=hub_id,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        # the model card's embedding: concat(CLS, mean of patch tokens after the prefix)
        poolings={"cls+mean": 2560, "cls": 1280, "mean": 1280},
        default_pooling="cls+mean",
        num_prefix_tokens=1 + registers,
        params=632_000_000,
        license="CC-BY-NC-ND-4.0",
        gated=True,
        description=description,
    )


@register_encoder
def virchow() -> EncoderSpec:
    return _virchow("virchow", "paige-ai/Virchow", 0, "ViT-H/14 trained on 1.5M slides")


@register_encoder
def virchow2() -> EncoderSpec:
    return _virchow("virchow2", "paige-ai/Virchow2", 4, "ViT-H/14 with 4 registers, 3.1M slides, mixed magnifications")
