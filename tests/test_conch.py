"""CONCH: a full CoCa checkpoint (vision + text towers) loads into the vision tower and gives
``encode_image(x, proj_contrast=False, normalize=False)``, checked against the pooler's math
written out by hand from the checkpoint tensors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from pathrobust.encoders.base import build_encoder, create_backbone
from pathrobust.encoders.mahmood import CLIP_MEAN, CLIP_STD
from pathrobust.errors import UserError
from pathrobust.registry import get_spec

COMMIT = "c0ffee0000000000000000000000000000c0ffee"
WIDTH, EMBED, POOL_HEADS, IMG = 768, 512, 8, 224


def small_spec(**arch_changes):
    """The registered spec with one block and 224 px inputs (widths, heads and dims kept)."""
    spec = get_spec("conch")
    return spec.replace(arch_kwargs={**spec.arch_kwargs, "depth": 1, **arch_changes}, input_size=IMG, resize_size=IMG)


@pytest.fixture(scope="module")
def checkpoint() -> dict[str, torch.Tensor]:
    """What MahmoodLab's pytorch_model.bin holds, shrunk: ``visual.*`` with random values in
    every tensor (LayerNorm weights and biases too), the captioning pooler, the text tower,
    the text decoder and the logit scale."""
    model = create_backbone(small_spec().replace(seed=11))
    gen = torch.Generator().manual_seed(5)
    sd = {}
    for key, value in model.state_dict().items():
        sd[f"visual.{key}"] = value + 0.05 * torch.randn(value.shape, generator=gen)
    sd.update({
        "visual.attn_pool_caption.query": torch.randn(256, WIDTH, generator=gen),
        "visual.attn_pool_caption.attn.in_proj_weight": torch.randn(3 * WIDTH, WIDTH, generator=gen),
        "visual.attn_pool_caption.ln_k.weight": torch.ones(WIDTH),
        "visual.ln_caption.weight": torch.ones(WIDTH),
        "visual.ln_caption.bias": torch.zeros(WIDTH),
        "text.token_embedding.weight": torch.randn(32, WIDTH, generator=gen),
        "text.positional_embedding": torch.randn(128, WIDTH, generator=gen),
        "text.text_projection": torch.randn(WIDTH, EMBED, generator=gen),
        "text_decoder.ln_final.weight": torch.ones(WIDTH),
        "logit_scale": torch.tensor(4.6052),
    })
    return sd


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory, checkpoint) -> Path:
    """The Hugging Face cache layout of MahmoodLab/conch: refs/main -> snapshot/pytorch_model.bin."""
    hub = tmp_path_factory.mktemp("hf") / "hub"
    repo = hub / "models--MahmoodLab--conch"
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    torch.save(checkpoint, snap / "pytorch_model.bin")
    return hub


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def reference_embedding(sd: dict[str, torch.Tensor], images: torch.Tensor, project: bool = False) -> torch.Tensor:
    """CONCH's VisualModel.forward_no_head (and + proj_contrast) from the raw checkpoint:
    timm trunk, then the attentional pooler, ln_contrast and projection written out."""
    def g(key: str) -> torch.Tensor:
        return sd[f"visual.{key}"]

    x = (images - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    trunk = VisionTransformer(img_size=IMG, patch_size=16, embed_dim=WIDTH, depth=1, num_heads=12, num_classes=0)
    trunk.load_state_dict({k[len("visual.trunk."):]: v for k, v in sd.items() if k.startswith("visual.trunk.")})
    tokens = trunk.eval().forward_features(x)  # (B, 1 + 14*14, 768), after the final LayerNorm
    assert tokens.shape == (len(images), 1 + (IMG // 16) ** 2, WIDTH)

    p = "attn_pool_contrast."
    keys = layer_norm(tokens, g(p + "ln_k.weight"), g(p + "ln_k.bias"))
    query = layer_norm(g(p + "query"), g(p + "ln_q.weight"), g(p + "ln_q.bias"))  # (1, 512)
    bq, bk, bv = g(p + "attn.in_proj_bias").chunk(3)
    q = query @ g(p + "attn.q_proj_weight").T + bq                 # (1, 512)
    k = keys @ g(p + "attn.k_proj_weight").T + bk                  # (B, N, 512)
    v = keys @ g(p + "attn.v_proj_weight").T + bv
    head_dim = EMBED // POOL_HEADS
    qh = q.view(POOL_HEADS, head_dim)
    kh = k.view(k.shape[0], k.shape[1], POOL_HEADS, head_dim)
    vh = v.view(v.shape[0], v.shape[1], POOL_HEADS, head_dim)
    weights = torch.softmax(torch.einsum("hd,bnhd->bhn", qh, kh) / math.sqrt(head_dim), dim=-1)
    pooled = torch.einsum("bhn,bnhd->bhd", weights, vh).reshape(len(images), EMBED)
    pooled = pooled @ g(p + "attn.out_proj.weight").T + g(p + "attn.out_proj.bias")
    embedding = layer_norm(pooled, g("ln_contrast.weight"), g("ln_contrast.bias"))
    return embedding @ g("proj_contrast") if project else embedding


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))


def test_full_checkpoint_from_hf_cache_gives_the_conch_embedding(hf_cache, checkpoint, images, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("PATHROBUST_WEIGHTS_DIR", raising=False)
    encoder = build_encoder(small_spec())
    assert encoder.weights_source.startswith("hf:MahmoodLab/conch")
    assert encoder.output_dim == 512
    with torch.inference_mode():
        got = encoder(images)
        tokens = encoder.forward_tokens(images)
    assert got.shape == (2, 512) and tokens.shape == (2, 1, 512)
    expected = reference_embedding(checkpoint, images)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    # the text-aligned projection is a different 512-d space: the spec's choice is visible
    assert not torch.allclose(got, reference_embedding(checkpoint, images, project=True), atol=1e-2)


def test_projected_embedding_when_the_spec_asks_for_it(hf_cache, checkpoint, images):
    weights = next(hf_cache.rglob("pytorch_model.bin"))
    encoder = build_encoder(small_spec(proj_contrast=True), weights=str(weights))
    with torch.inference_mode():
        got = encoder(images)
    expected = reference_embedding(checkpoint, images, project=True)
    assert got.shape == (2, 512)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_vision_only_and_ddp_wrapped_checkpoints_load_too(checkpoint, images, tmp_path):
    vision = {f"module.{k[len('visual.'):]}": v for k, v in checkpoint.items() if k.startswith("visual.")}
    path = tmp_path / "conch_visual.pth"
    torch.save(vision, path)
    encoder = build_encoder(small_spec(), weights=str(path))
    with torch.inference_mode():
        got = encoder(images[:1])
    assert torch.allclose(got, reference_embedding(checkpoint, images[:1]), atol=1e-5)


def test_a_missing_vision_key_is_named(checkpoint, tmp_path):
    broken = {k: v for k, v in checkpoint.items() if k != "visual.attn_pool_contrast.attn.k_proj_weight"}
    path = tmp_path / "pytorch_model.bin"
    torch.save(broken, path)
    with pytest.raises(UserError, match=r"attn_pool_contrast\.attn\.k_proj_weight' missing.*\(512, 768\)"):
        build_encoder(small_spec(), weights=str(path))


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"cls_token": torch.zeros(1, 1, WIDTH), "pos_embed": torch.zeros(1, 197, WIDTH)}, path)
    with pytest.raises(UserError, match="not a CONCH checkpoint"):
        build_encoder(small_spec(), weights=str(path))


def test_448_checkpoint_pos_embed_is_resampled_like_force_image_size(checkpoint, tmp_path):
    """CONCH's resize_pos_embed (used by force_image_size=224, as plismbench does):
    CLS position kept, the 28x28 grid resized bilinearly without antialiasing."""
    pos448 = torch.randn(1, 1 + 28 * 28, WIDTH, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "pytorch_model.bin"
    torch.save({**checkpoint, "visual.trunk.pos_embed": pos448}, path)
    encoder = build_encoder(small_spec(), weights=str(path))
    grid = pos448[:, 1:].reshape(1, 28, 28, WIDTH).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(14, 14), mode="bilinear", align_corners=False)
    expected = torch.cat([pos448[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 196, WIDTH)], dim=1)
    assert torch.allclose(encoder.backbone.trunk.pos_embed, expected)


def test_registered_spec_matches_conch_vit_b16_layout():
    """conch_ViT-B-16.json (448 px, patch 16, 1 contrast query, 8 pooler heads, embed_dim 512),
    open_clip_custom/transform.py (Resize 448 bicubic + CenterCrop 448) and OpenAI CLIP stats."""
    spec = get_spec("conch")
    assert (spec.input_size, spec.resize_size, spec.interpolation) == (448, 448, "bicubic")
    assert spec.mean == (0.48145466, 0.4578275, 0.40821073) and spec.std == (0.26862954, 0.26130258, 0.27577711)
    assert spec.weights_format == "conch" and spec.poolings == {"cls": 512} and spec.num_prefix_tokens == 1
    model = create_backbone(spec.replace(arch_kwargs={**spec.arch_kwargs, "depth": 1}))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("trunk.blocks.")}
    assert shapes == {
        "trunk.cls_token": (1, 1, 768), "trunk.pos_embed": (1, 785, 768),
        "trunk.patch_embed.proj.weight": (768, 3, 16, 16), "trunk.patch_embed.proj.bias": (768,),
        "trunk.norm.weight": (768,), "trunk.norm.bias": (768,),
        "attn_pool_contrast.query": (1, 512),
        "attn_pool_contrast.attn.q_proj_weight": (512, 512),
        "attn_pool_contrast.attn.k_proj_weight": (512, 768),
        "attn_pool_contrast.attn.v_proj_weight": (512, 768),
        "attn_pool_contrast.attn.in_proj_bias": (1536,),
        "attn_pool_contrast.attn.out_proj.weight": (512, 512), "attn_pool_contrast.attn.out_proj.bias": (512,),
        "attn_pool_contrast.ln_q.weight": (512,), "attn_pool_contrast.ln_q.bias": (512,),
        "attn_pool_contrast.ln_k.weight": (768,), "attn_pool_contrast.ln_k.bias": (768,),
        "ln_contrast.weight": (512,), "ln_contrast.bias": (512,),
        "proj_contrast": (512, 512),
    }
    block = {k[len("trunk.blocks.0."):] for k in model.state_dict() if k.startswith("trunk.blocks.0.")}
    assert block == {f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                     for p in ("weight", "bias")}


def test_unknown_arch_kwargs_are_refused():
    with pytest.raises(UserError, match="unknown CONCH arch_kwargs \\['embed_dim'\\]"):
        create_backbone(small_spec(embed_dim=768))
