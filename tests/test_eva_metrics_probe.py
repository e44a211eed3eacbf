import math

import numpy as np
import pytest
import torch

from pathrobust.metrics.classification import (balanced_accuracy, balanced_accuracy_batched, mean_std,
                                               predictions_from_logits)
from pathrobust.probes.linear import (ProbeConfig, patience_in_epochs, shared_input_logits, train_linear_probes,
                                         train_probe_reference)


def test_balanced_accuracy_binary_by_hand():
    # class 0: 3 samples, 2 right -> 2/3; class 1: 1 sample, right -> 1; mean 5/6
    assert balanced_accuracy([0, 0, 0, 1], [0, 1, 0, 1]) == pytest.approx(5 / 6)
    # plain accuracy would be 0.8 here; balanced = (1/1 + 3/4) / 2
    assert balanced_accuracy([1, 0, 0, 0, 0], [1, 0, 0, 0, 1]) == pytest.approx(0.875)


def test_balanced_accuracy_multiclass_by_hand():
    y = [0, 0, 1, 1, 1, 2]
    p = [0, 1, 1, 1, 0, 0]
    # recalls 1/2, 2/3, 0/1 -> 7/18
    assert balanced_accuracy(y, p) == pytest.approx(7 / 18)
    # a class only predicted, never present, is left out of the mean
    assert balanced_accuracy([0, 0, 1], [0, 3, 1], num_classes=4) == pytest.approx(0.75)
    batched = balanced_accuracy_batched(torch.tensor(y), torch.tensor([p, y]), 3)
    assert batched.tolist() == pytest.approx([7 / 18, 1.0])


def test_binary_predictions_threshold_at_half_probability():
    logits = torch.tensor([[-0.1], [0.0], [0.2]])
    assert predictions_from_logits(logits).tolist() == [0, 0, 1]
    assert predictions_from_logits(torch.tensor([[0.1, 0.9, 0.0]])).tolist() == [1]


def test_mean_std_is_sample_std():
    mean, std = mean_std([0.8, 0.9, 1.0])
    assert mean == pytest.approx(0.9) and std == pytest.approx(0.1)


def test_published_patience_is_about_2500_steps():
    published = {"bach": (1250, 268), "crc": (7, 100_000), "mhist": (278, 2175), "pcam": (3, 262_144),
                 "breakhis": (500, 1132)}
    for patience, size in published.values():
        assert math.ceil(2500 / math.ceil(size / 256)) == patience
        assert patience_in_epochs(patience, size, size, 256) == patience
    # a CRC-layout set of 360 tiles (2 steps per epoch) keeps CRC's 7 x 391 steps
    assert patience_in_epochs(7, 100_000, 360, 256) == math.ceil(7 * 391 / 2)


def test_lr_schedule_is_one_third_for_five_epochs():
    cfg = ProbeConfig()
    assert [cfg.lr_at_epoch(e) for e in (0, 4)] == pytest.approx([1e-4, 1e-4])
    assert cfg.lr_at_epoch(5) == pytest.approx(3e-4)


def _blobs(n, dim, classes, sep, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * sep
    y = rng.integers(0, classes, n)
    return (centres[y] + rng.normal(size=(n, dim))).astype(np.float32), y


@pytest.mark.parametrize("classes", [2, 5])
def test_linearly_separable_embeddings_reach_099(classes):
    x, y = _blobs(600, 16, classes, 6.0, 0)
    vx, vy = _blobs(200, 16, classes, 6.0, 0)  # same centres (seed), fresh noise below
    vx = vx + np.random.default_rng(1).normal(size=vx.shape).astype(np.float32) * 0.1
    res = train_linear_probes(x, y, vx, vy, classes, ProbeConfig(max_steps=600, patience=50, n_runs=3))
    assert res.balanced_accuracy(vx, vy).min() >= 0.99


def test_shared_input_logits_are_each_runs_own_product():
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(7, 5, generator=gen), torch.randn(3, 4, 5, generator=gen)
    logits = shared_input_logits(x, weight)
    assert logits.shape == (3, 7, 4)
    for r in range(3):
        assert torch.allclose(logits[r], x @ weight[r].T, atol=1e-6)


@pytest.mark.parametrize("classes", [2, 3])  # eva's one-logit BCE head and the softmax head
def test_batched_runs_equal_separate_reference_runs(classes):
    # dim 24: the batched rows are padded to 32 columns (bias + 7 zeros), which must change nothing
    x, y = _blobs(500, 24, classes, 0.7, 3)
    vx, vy = _blobs(150, 24, classes, 0.7, 4)
    cfg = ProbeConfig(max_steps=300, patience=4, n_runs=3, seed=11)
    res = train_linear_probes(x, y, vx, vy, classes, cfg)
    for r in range(cfg.n_runs):
        head, score, epoch = train_probe_reference(x, y, vx, vy, classes, cfg, run=r)
        assert score == pytest.approx(res.val_balanced_accuracy[r])
        assert epoch == res.best_epoch[r]
        assert torch.allclose(head.weight.detach(), res.weight[r], atol=1e-6)
        assert torch.allclose(head.bias.detach(), res.bias[r], atol=1e-6)
    # deterministic given the seed
    again = train_linear_probes(x, y, vx, vy, classes, cfg)
    assert torch.equal(again.weight, res.weight)


def test_early_stopping_returns_best_validation_checkpoint():
    # noisy labels: validation accuracy peaks and then wobbles, so the last state is not the best
    x, y = _blobs(400, 32, 4, 0.35, 5)
    vx, vy = _blobs(120, 32, 4, 0.35, 6)
    cfg = ProbeConfig(max_steps=2000, patience=15, n_runs=4, seed=0, lr=3e-2)
    res = train_linear_probes(x, y, vx, vy, 4, cfg)
    history = np.stack(res.history)  # (epochs, R), NaN after a run stopped
    for r in range(cfg.n_runs):
        curve = history[:, r][~np.isnan(history[:, r])]
        best = int(np.argmax(curve))  # first epoch reaching the maximum
        assert res.best_epoch[r] == best + 1
        assert res.val_balanced_accuracy[r] == pytest.approx(curve.max())
        assert len(curve) - 1 - best == cfg.patience  # stopped after `patience` epochs without gain
    # the returned weights are that checkpoint: they reproduce its validation score
    assert res.balanced_accuracy(vx, vy) == pytest.approx(res.val_balanced_accuracy)
    assert (history[-1][~np.isnan(history[-1])] <= res.val_balanced_accuracy.max()).all()
