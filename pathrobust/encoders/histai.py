"""HistAI: Hibou-B and Hibou-L (DINOv2 ViT with 4 registers, transformers remote code)."""

from pathrobust.registry import EncoderSpec, register_encoder

HIBOU_MEAN = (0.7068, 0.5755, 0.722)
HIBOU_STD = (0.195, 0.2316, 0.1816)


def _hibou(name: str, hub_id: str, arch: str, dim: int, params: int) -> EncoderSpec:
    return EncoderSpec(
        name=name,
        family="histai",
        arch=arch,
        arch_kwargs={"img_size": 224, "init_values": 1e-5},
        hub_id=hub_id,
        weights_format="transformers-dinov2",
        mean=HIBOU_MEAN,
        std=HIBOU_STD,
        poolings={"cls": dim, "cls+mean": 2 * dim, "mean": dim},
        num_prefix_tokens=5,
        params=params,
        license="Apache-2.0" if name == "hibou-b" else "CC-BY-NC-SA-4.0",
        gated=True,
        description=f"DINOv2 ViT-{'B' if dim == 768 else 'L'}/14 with registers, 1.2B tiles",
    )


@register_encoder
def hibou_b() -> EncoderSpec:
    return _hibou("hibou-b", "histai/hibou-b", "vit_base_patch14_reg4_dinov2", 768, 86_000_000)


@register_encoder
def hibou_l() -> EncoderSpec:
    return _hibou("hibou-l", "histai/hibou-L", "vit_large_patch14_reg4_dinov2", 1024, 304_000_000)
