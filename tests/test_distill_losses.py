"""Distillation losses, heads and masks against hand computations."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pathrobust.distill.heads import DINOHead, PrototypeHead, kmeans
from pathrobust.distill.losses import EMACenter, dino_loss, ibot_loss, koleo_loss, sinkhorn_knopp
from pathrobust.distill.masking import BlockMaskGenerator, sample_masks


def test_sinkhorn_rows_sum_to_one_and_columns_balance():
    torch.manual_seed(0)
    logits = torch.randn(64, 8) * 3
    q = sinkhorn_knopp(logits, teacher_temp=1.0, n_iterations=3)
    assert q.shape == (64, 8) and q.dtype == torch.float32
    assert torch.allclose(q.sum(1), torch.ones(64), atol=1e-5)
    # columns tend to B/K = 8 each; 3 iterations from very unbalanced logits are close
    cols = q.sum(0)
    assert torch.allclose(cols.sum(), torch.tensor(64.0), atol=1e-4)
    # more balanced than the plain softmax of the same logits
    plain = F.softmax(logits, -1).sum(0)
    assert (cols - 8).std() < 0.8 * (plain - 8).std()
    q50 = sinkhorn_knopp(logits, teacher_temp=1.0, n_iterations=50)
    assert torch.allclose(q50.sum(0), torch.full((8,), 8.0), atol=1e-3)


def test_sinkhorn_matches_hand_iteration():
    logits = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.5, 0.5]])
    q = torch.exp(logits / 0.5).t().double()
    q /= q.sum()
    k, b = 2, 3
    for _ in range(3):
        q /= q.sum(1, keepdim=True); q /= k
        q /= q.sum(0, keepdim=True); q /= b
    expected = (q * b).t().float()
    assert torch.allclose(sinkhorn_knopp(logits, 0.5, 3), expected, atol=1e-6)


def test_dino_skips_global_crop_with_itself():
    torch.manual_seed(1)
    g, b, k = 2, 3, 5
    s = torch.randn(g, b, k)
    t = F.softmax(torch.randn(g, b, k), -1)
    def ce(tp, sl):
        return -(tp * F.log_softmax(sl / 0.1, -1)).sum(-1).mean()
    expected = (ce(t[1], s[0]) + ce(t[0], s[1])) / 2
    assert torch.allclose(dino_loss(s, None, t, 0.1), expected, atol=1e-6)
    # local crops pair with every teacher global crop
    loc = torch.randn(3, b, k)
    terms = [ce(t[1], s[0]), ce(t[0], s[1])] + [ce(t[j], loc[l]) for l in range(3) for j in range(2)]
    assert torch.allclose(dino_loss(s, loc, t, 0.1), sum(terms) / len(terms), atol=1e-5)


def test_ema_center_update():
    c = EMACenter(4, momentum=0.5)
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [3.0, 2.0, 1.0, 0.0]])
    probs = c.targets(logits, 0.1)
    assert torch.allclose(probs, F.softmax(logits / 0.1, -1))  # centre was 0
    assert torch.allclose(c.center, torch.tensor([[1.0, 1.0, 1.0, 1.0]]))  # 0.5 * mean (2,2,2,2)


def test_ibot_averages_per_image_over_all_global_crops():
    torch.manual_seed(2)
    masks = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)  # 3 images, 4 tokens
    m = int(masks.sum())
    s = torch.randn(m, 6)
    t = F.softmax(torch.randn(m, 6), -1)
    ce = -(t * F.log_softmax(s / 0.1, -1)).sum(-1)
    expected = (ce[:2].mean() + 0.0 + ce[2:].mean()) / 3
    assert torch.allclose(ibot_loss(s, t, masks, 0.1), expected, atol=1e-6)
    assert ibot_loss(s[:0], t[:0], torch.zeros(2, 4, dtype=torch.bool)).item() == 0.0


def test_koleo_equals_brute_force():
    torch.manual_seed(3)
    x = torch.randn(17, 8)
    xn = x / x.norm(dim=1, keepdim=True)
    expected = 0.0
    for i in range(17):
        d = min(float((xn[i] - xn[j]).norm()) for j in range(17) if j != i)
        expected += -math.log(d + 1e-8)
    assert koleo_loss(x).item() == pytest.approx(expected / 17, rel=1e-4)


def test_koleo_gradient_spreads_points():
    x = torch.tensor([[1.0, 0.0], [0.99, 0.1], [-1.0, 0.0]], requires_grad=True)
    koleo_loss(x).backward()
    step = x - 0.1 * x.grad
    assert koleo_loss(step) < koleo_loss(x)


def test_dino_head_shapes_and_fixed_norm():
    head = DINOHead(32, 100, hidden_dim=64, bottleneck_dim=16)
    out = head(torch.randn(4, 7, 32))
    assert out.shape == (4, 7, 100)
    w = head.last_layer.weight
    assert torch.allclose(w.norm(dim=1), torch.ones(100), atol=1e-5)
    assert all(p.requires_grad for p in head.last_layer_parameters())
    # logits are cosines of a unit bottleneck vector with unit prototypes
    assert out.abs().max() <= 1.0 + 1e-5


def test_prototype_head_and_kmeans():
    torch.manual_seed(4)
    centers = F.normalize(torch.randn(3, 5), dim=-1)
    x = (centers[torch.arange(60) % 3] + 0.01 * torch.randn(60, 5))
    found = kmeans(x, 3, seed=0)
    sims = (found @ centers.t()).max(0).values
    assert (sims > 0.99).all()
    head = PrototypeHead(found, scale=10.0)
    logits = head(x)
    assert logits.shape == (60, 3) and logits.max() <= 10.0 + 1e-4


def test_block_mask_exact_counts_and_ratio_range():
    rng = np.random.default_rng(0)
    gen = BlockMaskGenerator((8, 8))
    for n in (3, 10, 20, 32):
        assert gen(n, rng).sum() == n
    masks = sample_masks(40, (8, 8), rng, 0.5, 0.1, 0.5)
    counts = masks.sum(1)
    masked = counts[counts > 0]
    assert len(masked) == 20 and (counts == 0).sum() == 20
    assert masked.min() >= int(0.1 * 64) and masked.max() <= int(0.5 * 64)
    # stratified: the sorted ratios cover the range evenly
    ratios = np.sort(masked / 64)
    edges = np.linspace(0.1, 0.5, 21)
    assert np.all(ratios >= np.floor(edges[:-1] * 64) / 64 - 1e-9)
    assert np.all(ratios <= edges[1:] + 1e-9)
    assert np.array_equal(sample_masks(40, (8, 8), np.random.default_rng(7)), sample_masks(40, (8, 8), np.random.default_rng(7)))


def test_schedules():
    from pathrobust.distill.schedules import cosine, linear_warmup, scaled_lr

    assert cosine(0, 100, 1.0, 0.0, warmup_steps=10) == 0.0
    assert cosine(5, 100, 1.0, 0.0, warmup_steps=10) == pytest.approx(0.5)
    assert cosine(10, 100, 1.0, 0.0, warmup_steps=10) == pytest.approx(1.0)
    assert cosine(99, 100, 1.0, 0.1, warmup_steps=10) == pytest.approx(0.1)
    assert cosine(500, 100, 1.0, 0.1) == pytest.approx(0.1)
    mid = cosine(50, 101, 0.04, 0.2)
    assert mid == pytest.approx(0.12)
    assert linear_warmup(0, 30, 0.04, 0.07) == 0.04
    assert linear_warmup(15, 30, 0.04, 0.07) == pytest.approx(0.055)
    assert linear_warmup(40, 30, 0.04, 0.07) == 0.07
    assert scaled_lr(4e-3, 256) == pytest.approx(2e-3)


def test_sinkhorn_is_finite_for_large_logits():
    logits = torch.tensor([[10.0, -10.0, 0.0], [9.0, 10.0, -3.0]])
    q = sinkhorn_knopp(logits, teacher_temp=0.04)  # exp(250) overflows float32 without the shift
    assert torch.isfinite(q).all() and torch.allclose(q.sum(1), torch.ones(2), atol=1e-5)
