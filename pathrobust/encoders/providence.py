"""Providence / Microsoft: Prov-GigaPath tile encoder (ViT-g, patch 16)."""

from pathrobust.registry import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, register_encoder


@register_encoder
def prov_gigapath() -> EncoderSpec:
    return EncoderSpec(
        name="prov-gigapath",
        family="providence",
        arch="vit_giant_patch14_dinov2",
        arch_kwargs={
            "img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40,
            "num_heads": 24, "init_values": 1e-5, "mlp_ratio": 5.33334,
        },
        hub_id="prov-gigapath/prov-gigapath",
        resize_size=256,  # resize 256 bicubic, centre crop 224 (model card)
        interpolation="bicubic",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        poolings={"cls": 1536, "cls+mean": 3072, "mean": 1536},
        num_prefix_tokens=1,
        params=1_135_000_000,
        license="Apache-2.0",
        gated=True,
        description="ViT-g/16 tile encoder of Prov-GigaPath, 1.3B tiles",
    )
