"""kaiko.ai: the "towards large pathology FMs" ViTs and Midnight-12k (ViT-g/14)."""

from pathrobust.registry import EncoderSpec, register_encoder

HALF = (0.5, 0.5, 0.5)
KAIKO = [
    # name, timm arch, dim, prefix tokens, params
    ("kaiko-vit-s16", "vit_small_patch16_224", 384, 1, 22_000_000),
    ("kaiko-vit-s8", "vit_small_patch8_224", 384, 1, 22_000_000),
    ("kaiko-vit-b16", "vit_base_patch16_224", 768, 1, 86_000_000),
    ("kaiko-vit-b8", "vit_base_patch8_224", 768, 1, 86_000_000),
    ("kaiko-vit-l14", "vit_large_patch14_reg4_dinov2", 1024, 5, 304_000_000),
]


def _kaiko(name: str, arch: str, dim: int, prefix: int, params: int) -> EncoderSpec:
    return EncoderSpec(
        name=name,
        family="kaiko",
        arch=arch,
        arch_kwargs={"img_size": 224, "dynamic_img_size": True},
        hub_id="kaiko-ai/towards_large_pathology_fms",
        mean=HALF,
        std=HALF,
        poolings={"cls": dim, "cls+mean": 2 * dim, "mean": dim},
        num_prefix_tokens=prefix,
        params=params,
        license="Apache-2.0",
        gated=False,
        description=f"{arch} trained with DINO/DINOv2 on TCGA",
    )


for _row in KAIKO:
    register_encoder(_kaiko(*_row))


@register_encoder
def midnight_12k() -> EncoderSpec:
    return EncoderSpec(
        name="midnight-12k",
        family="kaiko",
        arch="vit_giant_patch14_dinov2",
        arch_kwargs={"img_size": 224},
        hub_id="kaiko-ai/midnight",
        weights_format="transformers-dinov2",
        mean=HALF,
        std=HALF,
        # eva's leaderboard uses concat(CLS, mean of patch tokens)
        poolings={"cls+mean": 3072, "cls": 1536, "mean": 1536},
        default_pooling="cls+mean",
        num_prefix_tokens=1,
        params=1_137_000_000,
        license="MIT",
        gated=False,
        description="ViT-g/14 trained on 12k TCGA slides",
    )
