"""eva's ABMIL head: forward and gradients against a hand-written reference, torch-default
initialisation, and the batched runs against one-run-at-a-time training."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pathrobust.probes.abmil import (
    ABMIL,
    ABMILConfig,
    _forward,
    _Layout,
    _split_padding,
    draw_init,
    run_generators,
    train_abmil_reference,
    train_abmil_runs,
)

NEG_INF = float("-inf")


def eva_abmil_by_hand(x: torch.Tensor, p: list[torch.Tensor]) -> torch.Tensor:
    """eva 0.4.5's ABMIL forward written out: ``x`` ``(B, N, D)`` padded with rows of -inf;
    ``p`` = [Wp, bp, Wa, ba, Wb, bb, Wc, bc, W1, b1, W2, b2, W3, b3] (nn.Linear layouts)."""
    wp, bp, wa, ba, wb, bb, wc, bc, w1, b1, w2, b2, w3, b3 = p
    pad = torch.isneginf(x).all(dim=-1, keepdim=True)               # a row of -inf is padding
    x = torch.where(pad, torch.zeros_like(x), x)                     # zero-filled before the projection
    h = x @ wp.T + bp                                                # projector Linear(D, 128)
    gate = torch.tanh(h @ wa.T + ba) * torch.sigmoid(h @ wb.T + bb)  # gated attention
    score = gate @ wc.T + bc                                         # (B, N, 1)
    score = torch.where(pad, torch.full_like(score, NEG_INF), score)
    weights = torch.exp(score - score.max(dim=1, keepdim=True).values)
    weights = weights / weights.sum(dim=1, keepdim=True)             # softmax over instances
    pooled = (weights * h).sum(dim=1)
    z = torch.relu(pooled @ w1.T + b1)
    z = torch.relu(z @ w2.T + b2)
    return z @ w3.T + b3


def _bags(lengths, dim, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    x = torch.full((len(lengths), longest, dim), NEG_INF, dtype=dtype)
    for i, n in enumerate(lengths):
        x[i, :n] = torch.randn(n, dim, generator=g, dtype=dtype)
    return x


def _weights(seed: int, dim: int, out: int, cfg=ABMILConfig(), dtype=torch.float64):
    return draw_init(torch.Generator().manual_seed(seed), cfg.layer_shapes(dim, out), dtype)


@pytest.mark.parametrize("out", [1, 4])
def test_forward_and_gradients_match_eva_by_hand_with_padding(out):
    dim, lengths = 24, [5, 1, 7, 3]
    x = _bags(lengths, dim)
    runs = [_weights(s, dim, out) for s in (1, 2, 3)]
    layout = _Layout(ABMILConfig().layer_shapes(dim, out))
    flat = torch.stack([layout.pack(p) for p in runs]).requires_grad_(True)
    x0, mask = _split_padding(x)
    batched = _forward(layout.views(flat), layout.n_mlp, x0, mask, shared=True)  # (R, B, out)
    # each run's own bags through the gathered path: run r sees the bags in another order
    orders = [torch.tensor(o) for o in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2])]
    xg = torch.stack([x0[o] for o in orders])
    gathered = _forward(layout.views(flat), layout.n_mlp, xg, torch.stack([mask[o] for o in orders]), shared=False)
    y = torch.tensor([1, 0, 1, 0]) if out == 1 else torch.tensor([3, 0, 1, 2])
    for r, params in enumerate(runs):
        params = [t.clone().requires_grad_(True) for t in params]
        ref = eva_abmil_by_hand(x, params)
        module = ABMIL(dim, out).double()
        with torch.no_grad():
            for k, lin in enumerate(module.linears()):
                lin.weight.copy_(params[2 * k])
                lin.bias.copy_(params[2 * k + 1])
        torch.testing.assert_close(batched[r], ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(gathered[r], ref[orders[r]], atol=1e-6, rtol=0)
        torch.testing.assert_close(module(x), ref, atol=1e-6, rtol=0)
        loss = (F.binary_cross_entropy_with_logits(ref[:, 0], y.double()) if out == 1 else F.cross_entropy(ref, y))
        grads = torch.autograd.grad(loss, params)
        flat.grad = None
        mine = batched[r]
        loss_b = (F.binary_cross_entropy_with_logits(mine[:, 0], y.double()) if out == 1 else F.cross_entropy(mine, y))
        loss_b.backward(retain_graph=True)
        for got, want in zip(layout.unpack(flat.grad[r]), grads):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        assert all(g.abs().sum() > 0 for g in grads[:2])  # the projector does get gradient


def test_padding_rows_change_nothing():
    dim = 16
    x = _bags([4, 2], dim)
    params = _weights(0, dim, 1)
    more = torch.cat([x, torch.full((2, 5, dim), NEG_INF, dtype=x.dtype)], dim=1)
    torch.testing.assert_close(eva_abmil_by_hand(more, params), eva_abmil_by_hand(x, params), atol=1e-12, rtol=0)
    module = ABMIL(dim, 1).double()
    with torch.no_grad():
        for k, lin in enumerate(module.linears()):
            lin.weight.copy_(params[2 * k])
            lin.bias.copy_(params[2 * k + 1])
    # a padded bag equals the same bag alone (unpadded)
    torch.testing.assert_close(module(x[1:2, :2]), module(x[1:2]), atol=1e-12, rtol=0)


def test_initialisation_is_torch_default_in_eva_module_order():
    torch.manual_seed(7)
    reference = ABMIL(10, 3)  # nn.Linear.reset_parameters from the global generator, module order
    drawn = draw_init(torch.Generator().manual_seed(7), ABMILConfig().layer_shapes(10, 3))
    ours = [t for lin in reference.linears() for t in (lin.weight, lin.bias)]
    assert len(drawn) == len(ours) == 14
    for a, b in zip(drawn, ours):
        assert torch.equal(a, b.detach())
    # projector 128x10, attention 128x128 (a, b), 1x128 (c), MLP 128 -> 128 -> 64 -> 3
    assert [tuple(t.shape) for t in drawn[::2]] == [(128, 10), (128, 128), (128, 128), (1, 128), (128, 128),
                                                     (64, 128), (3, 64)]
    seeds = run_generators(42, 3)
    assert len({g.initial_seed() for g in seeds}) == 3
    assert [g.initial_seed() for g in seeds] == [g.initial_seed() for g in run_generators(42, 3)]


def _task(n, dim, lengths, seed, classes=2, signal=1.5):
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=(classes, dim)).astype(np.float64)
    bags, labels = [], []
    for i in range(n):
        y = i % classes
        length = int(rng.integers(*lengths))
        x = rng.normal(size=(length, dim))
        x[: max(1, length // 2)] += signal * direction[y]
        bags.append(x)
        labels.append(y)
    return bags, np.array(labels)


@pytest.mark.parametrize("n_train,classes", [(40, 2), (10, 2), (36, 3)])
def test_batched_runs_equal_separate_runs(n_train, classes):
    """40 bags: two batches per epoch (each run its own batches, gathered); 10: one full batch
    (shared projection). float64, so that only the algorithm is compared, not float32 rounding
    of differently shaped kernels, which 25 epochs of Adam would amplify."""
    dim = 12
    train, ty = _task(n_train, dim, (2, 7), seed=1, classes=classes, signal=1.0)
    val, vy = _task(9, dim, (2, 7), seed=2, classes=classes, signal=1.0)
    # a larger lr than eva's 1e-3 so that a few epochs move the runs apart
    cfg = ABMILConfig(n_runs=3, max_epochs=30, patience=6, lr=1e-2, projected_size=16, attention_hidden=8,
                      mlp_hidden=(16, 8))
    batched = train_abmil_runs(train, ty, val, vy, classes, cfg, dtype=torch.float64)
    for r in range(cfg.n_runs):
        net, score, best_epoch, epochs = train_abmil_reference(train, ty, val, vy, classes, cfg, run=r, dtype=torch.float64)
        assert batched.best_epoch[r] == best_epoch and batched.epochs[r] == epochs
        assert batched.val_balanced_accuracy[r] == pytest.approx(score, abs=1e-12)
        for got, want in zip(batched.module(r).parameters(), net.parameters()):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        torch.testing.assert_close(batched.logits(val)[r], net(torch.as_tensor(_pad(val))), atol=1e-6, rtol=0)
    assert len(set(batched.epochs.tolist())) > 1 or len(set(batched.best_epoch.tolist())) > 1  # runs differ


def _pad(bags):
    from pathrobust.data.bags import pad_bags

    return pad_bags(bags).astype(np.float64)


def test_early_stopping_and_checkpoint_rules():
    """Only a strict improvement resets patience; the checkpoint is the first epoch reaching
    the best validation score; a run stops after `patience` epochs without improvement."""
    train, ty = _task(20, 8, (2, 5), seed=3, signal=0.6)
    val, vy = _task(8, 8, (2, 5), seed=4, signal=0.6)
    cfg = ABMILConfig(n_runs=4, max_epochs=30, patience=3, lr=1e-2, projected_size=8, attention_hidden=8,
                      mlp_hidden=(8, 8))
    res = train_abmil_runs(train, ty, val, vy, 2, cfg)
    history = np.stack(res.history)  # (epochs, runs), NaN once stopped
    for r in range(cfg.n_runs):
        scores = history[: res.epochs[r], r]
        assert np.isfinite(scores).all() and np.isnan(history[res.epochs[r]:, r]).all()
        best = int(np.argmax(scores))  # first occurrence of the maximum
        assert res.best_epoch[r] == best + 1 and res.val_balanced_accuracy[r] == scores.max()
        assert res.epochs[r] == min(cfg.max_epochs, best + 1 + cfg.patience)


def test_warmup_lr_is_one_third_for_five_epochs():
    cfg = ABMILConfig()
    assert [cfg.lr_at_epoch(e) for e in range(7)] == [1e-3 / 3] * 5 + [1e-3] * 2
    assert math.isclose(cfg.lr_at_epoch(4) * 3, 1e-3)
    assert (cfg.batch_size, cfg.max_epochs, cfg.patience, cfg.n_runs, cfg.weight_decay) == (32, 100, 20, 20, 0.01)


def test_probabilities_and_multiclass_shapes():
    train, ty = _task(12, 6, (2, 4), seed=5, classes=3)
    cfg = dataclasses.replace(ABMILConfig(n_runs=2, max_epochs=2), projected_size=8, attention_hidden=8,
                              mlp_hidden=(8, 8))
    res = train_abmil_runs(train, ty, train, ty, 3, cfg)
    probs = res.probabilities(train)
    assert probs.shape == (2, 12, 3) and np.allclose(probs.sum(-1), 1)
    with pytest.raises(ValueError, match="labels must lie"):
        train_abmil_runs(train, ty + 1, train, ty, 3, cfg)
