"""Owkin: Phikon (iBOT ViT-B/16) and Phikon-v2 (DINOv2 ViT-L/16), transformers layout."""

from pathrobust.registry import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, register_encoder


@register_encoder
def phikon() -> EncoderSpec:
    return EncoderSpec(
        name="phikon",
        family="owkin",
        arch="vit_base_patch16_224",
        # transformers ViTModel: LayerNorm eps 1e-12, final layernorm; loaded via key conversion
        arch_kwargs={"img_size": 224, "norm_layer": "pathrobust.encoders.convert:LayerNormEps12"},
        hub_id="owkin/phikon",
        weights_format="transformers-vit",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        poolings={"cls": 768, "cls+mean": 1536, "mean": 768},
        num_prefix_tokens=1,
        params=86_000_000,
        license="owkin non-commercial",
        gated=False,
        description="iBOT ViT-B/16 trained on 40M TCGA tiles",
    )


@register_encoder
def phikon_v2() -> EncoderSpec:
    return EncoderSpec(
        name="phikon-v2",
        family="owkin",
        arch="vit_large_patch16_224",
        arch_kwargs={"img_size": 224, "init_values": 1e-5},
        hub_id="owkin/phikon-v2",
        weights_format="transformers-dinov2",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        poolings={"cls": 1024, "cls+mean": 2048, "mean": 1024},
        num_prefix_tokens=1,
        params=303_000_000,
        license="owkin non-commercial",
        gated=False,
        description="DINOv2 ViT-L/16 trained on 456M tiles (PANCAN-XL)",
    )
