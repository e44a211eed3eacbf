"""Mahmood Lab: UNI (ViT-L/16), UNI2-h (ViT-H/14-style giant, 8 registers) and CONCH."""

from pathrobust.registry import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, register_encoder

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@register_encoder
def uni() -> EncoderSpec:
    return EncoderSpec(
        name="uni",
        family="mahmoodlab",
        arch="vit_large_patch16_224",
        arch_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
        hub_id="MahmoodLab/uni",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        poolings={"cls": 1024, "cls+mean": 2048, "mean": 1024},
        num_prefix_tokens=1,
        params=303_000_000,
        license="CC-BY-NC-ND-4.0",
        gated=True,
        description="ViT-L/16 DINOv2-trained on 100M tiles (Mass-100K)",
    )


@register_encoder
def uni2_h() -> EncoderSpec:
    return EncoderSpec(
        name="uni2-h",
        family="mahmoodlab",
        arch="vit_giant_patch14_224",
        arch_kwargs={
            "img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2, "init_values": 1e-5, "no_embed_class": True, "reg_tokens": 8,
            "dynamic_img_size": True, "mlp_layer": "timm.layers:SwiGLUPacked", "act_layer": "torch.nn:SiLU",
        },
        hub_id="MahmoodLab/UNI2-h",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        poolings={"cls": 1536, "cls+mean": 3072, "mean": 1536},
        num_prefix_tokens=9,
        params=681_000_000,
        license="CC-BY-NC-ND-4.0",
        gated=True,
        description="ViT-H/14 (8 registers, SwiGLU) trained on 200M tiles",
    )


@register_encoder
def conch() -> EncoderSpec:
    # CONCH's conch_ViT-B-16.json + coca_model._build_vision_tower; factory/transform.py:
    # Resize(448, bicubic) + CenterCrop(448) with the OpenAI CLIP mean/std.
    return EncoderSpec(
        name="conch",
        family="mahmoodlab",
        builder="pathrobust.encoders.conch:build_conch_vision",
        arch_kwargs={
            "width": 768, "depth": 12, "num_heads": 12, "patch_size": 16,
            "embed_dim_contrast": 512, "attn_pooler_heads": 8, "proj_contrast": False,
        },
        hub_id="MahmoodLab/conch",
        weights_format="conch",
        input_size=448,
        resize_size=448,
        interpolation="bicubic",
        mean=CLIP_MEAN,
        std=CLIP_STD,
        # The single token is encode_image(proj_contrast=False, normalize=False): attentional
        # pooling + ln_contrast, before the text-aligned projection (the README's embedding).
        poolings={"cls": 512},
        num_prefix_tokens=1,
        params=88_000_000,
        license="CC-BY-NC-ND-4.0",
        gated=True,
        description="CONCH vision tower (ViT-B/16 at 448 px + attentional pooler), 512-d image embedding before the contrastive projection",
    )


@register_encoder
def conch_224() -> EncoderSpec:
    # plismbench runs CONCH at 224 px (force_image_size=224: position embeddings resampled
    # 28x28 -> 14x14 at load, as pathrobust's converter does); its published PLISM row used this.
    spec = conch()
    return spec.replace(name="conch-224", input_size=224, resize_size=224,
                        description=spec.description.replace("448 px", "224 px (plismbench's setting)"))
