"""Built-in specs: every architecture instantiates and pools to the documented dims."""

from __future__ import annotations

import pytest
import torch

from pathrobust.encoders.base import Encoder, create_backbone, pool_tokens
from pathrobust.errors import UserError
from pathrobust.registry import EncoderSpec, get_spec, list_specs, resolve_spec

# From ../shared/reference/models.md: default pooling and its dim.
EXPECTED_DEFAULT = {
    "h0-mini": ("cls", 768), "h-optimus-0": ("cls", 1536), "h-optimus-1": ("cls", 1536),
    "uni": ("cls", 1024), "uni2-h": ("cls", 1536), "virchow": ("cls+mean", 2560),
    "virchow2": ("cls+mean", 2560), "prov-gigapath": ("cls", 1536), "phikon": ("cls", 768),
    "phikon-v2": ("cls", 1024), "hibou-b": ("cls", 768), "hibou-l": ("cls", 1024),
    "kaiko-vit-s16": ("cls", 384), "kaiko-vit-s8": ("cls", 384), "kaiko-vit-b16": ("cls", 768),
    "kaiko-vit-b8": ("cls", 768), "kaiko-vit-l14": ("cls", 1024), "midnight-12k": ("cls+mean", 3072),
    "conch": ("cls", 512), "conch-224": ("cls", 512), "efficientnet-lite0-imagenet": ("cls", 1280),
    "rgb-histogram": ("cls", 96), "hed-histogram": ("cls", 96), "vit-s14-random": ("cls", 384),
}
PREFIX = {"h0-mini": 5, "h-optimus-0": 5, "uni2-h": 9, "virchow": 1, "virchow2": 5, "hibou-b": 5, "kaiko-vit-l14": 5}


def test_every_reference_model_is_registered():
    names = {s.name for s in list_specs()}
    assert set(EXPECTED_DEFAULT) <= names


@pytest.mark.parametrize("name", sorted(EXPECTED_DEFAULT))
def test_architecture_pools_to_documented_dims(name):
    spec = get_spec(name)
    pooling, dim = EXPECTED_DEFAULT[name]
    assert spec.default_pooling == pooling and spec.dim() == dim
    if name in PREFIX:
        assert spec.num_prefix_tokens == PREFIX[name]
    # Shrink depth of the big models so CPU tests stay fast; width (hence dims) is kept.
    kwargs = dict(spec.arch_kwargs)
    if (spec.arch or "").startswith("vit") or "conch" in (spec.builder or ""):
        kwargs["depth"] = 1
    small = spec.replace(arch_kwargs=kwargs, pretrained=False)
    backbone = create_backbone(small)
    if hasattr(backbone, "num_prefix_tokens"):
        assert backbone.num_prefix_tokens == spec.num_prefix_tokens
    x = torch.rand(1, 3, spec.input_size, spec.input_size)
    for variant, expected in spec.poolings.items():
        enc = Encoder(small, backbone, variant).eval()
        with torch.inference_mode():
            assert enc(x).shape == (1, expected), (name, variant)


def test_h0_mini_full_architecture_matches_the_paper():
    spec = get_spec("h0-mini")
    backbone = create_backbone(spec)
    n_params = sum(p.numel() for p in backbone.parameters())
    assert abs(n_params - 85.7e6) < 0.1e6
    with torch.inference_mode():
        tokens = backbone.forward_features(torch.rand(1, 3, 224, 224))
    assert tokens.shape == (1, 261, 768)


def test_pooling_definitions_by_hand():
    tokens = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)  # 1 CLS + 1 register + 2 patches
    assert torch.equal(pool_tokens(tokens, "cls", 2), tokens[:, 0])
    assert torch.equal(pool_tokens(tokens, "mean", 2), (tokens[:, 2] + tokens[:, 3]) / 2)
    assert torch.equal(pool_tokens(tokens, "cls+mean", 2), torch.cat([tokens[:, 0], (tokens[:, 2] + tokens[:, 3]) / 2], -1))


def test_spec_validation_names_the_problem():
    with pytest.raises(UserError, match="default pooling 'cls' is not among"):
        EncoderSpec(name="x", family="t", arch="vit_small_patch16_224", poolings={"mean": 3})
    with pytest.raises(UserError, match="needs an 'arch'"):
        EncoderSpec(name="x", family="t", poolings={"cls": 3})
    with pytest.raises(UserError, match="--pooling cls\\+mean: 'rgb-histogram' offers cls"):
        get_spec("rgb-histogram").check_pooling("cls+mean")


def test_spec_roundtrips_through_json_and_hash_tracks_preprocessing():
    spec = get_spec("h0-mini")
    again = EncoderSpec.from_dict(spec.to_dict())
    assert again == spec and again.hash == spec.hash
    assert spec.replace(input_size=448).hash != spec.hash
    assert spec.replace(description="other words").hash == spec.hash


def test_unknown_model_suggests_names():
    with pytest.raises(UserError, match="did you mean.*h0-mini"):
        resolve_spec("h0")
