"""eva's ConvDecoderWithImage and its training protocol on cached token grids, and a tiny
end-to-end run: synthetic tiles -> tiny ViT token grids -> decoder -> Dice."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_vit_spec
from pathrobust.data.eva_dense import DenseLabels, read_generic_dense
from pathrobust.data.synth_dense import SynthDenseConfig, write_synth_dense
from pathrobust.encoders.base import build_encoder
from pathrobust.probes.decoder import (ConvDecoderWithImage, DecoderConfig, DenseSplit, _epoch_rows, dice_loss,
                                       evaluate_decoder, normalize_images, train_decoder_runs)
from pathrobust.probes.dense import evaluate_dense_task


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one thread avoids OpenMP barrier stalls on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randomise(decoder: ConvDecoderWithImage, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in decoder.state_dict().items():
            if t.dtype.is_floating_point:
                values = torch.rand(t.shape, generator=g) + 0.5 if "running_var" in name else torch.randn(t.shape, generator=g) * 0.3
                t.copy_(values)


def _reference_forward(sd: dict, features: torch.Tensor, images: torch.Tensor, training: bool) -> torch.Tensor:
    """eva 0.4.5's layer sequence written out by hand (Decoder2D + ConvDecoderWithImage)."""

    def block(x, prefix):
        x = F.conv2d(x, sd[f"{prefix}.0.weight"], sd[f"{prefix}.0.bias"], padding=1)
        x = F.batch_norm(x, sd[f"{prefix}.1.running_mean"].clone(), sd[f"{prefix}.1.running_var"].clone(),
                         sd[f"{prefix}.1.weight"], sd[f"{prefix}.1.bias"], training=training, momentum=0.1, eps=1e-5)
        return F.relu(x)

    x = torch.cat([F.interpolate(features, size=features.shape[2:], mode="bilinear", align_corners=False)], dim=1)
    x = F.interpolate(x, scale_factor=2, mode="nearest")
    x = block(x, "_layers.1")
    x = F.interpolate(x, images.shape[-2:], mode="bilinear", align_corners=False)
    x = torch.cat([x, images], dim=1)
    x = block(block(x, "image_block.0"), "image_block.1")
    return F.conv2d(x, sd["classifier.weight"], sd["classifier.bias"])


@pytest.mark.parametrize("training", [False, True])
def test_forward_equals_eva_layer_sequence(training):
    # float64: the module sums the first image-block convolution per channel group, which
    # reorders float32 additions (~3e-7 relative); in float64 any difference is structural
    dec = ConvDecoderWithImage(in_features=24, num_classes=5)
    _randomise(dec)
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2, 24, 4, 4, generator=g)
    images = torch.randn(2, 3, 30, 30, generator=g)  # not a multiple of the grid: a real resize
    for dtype, tol in ((torch.float64, 1e-6), (torch.float32, 1e-5)):
        d = copy.deepcopy(dec).to(dtype).train(training)
        sd = {k: v.clone() for k, v in d.state_dict().items()}
        out = d(features.to(dtype), images.to(dtype))
        assert out.shape == (2, 5, 30, 30)
        ref = _reference_forward(sd, features.to(dtype), images.to(dtype), training)
        assert torch.allclose(out, ref, atol=tol, rtol=0), (dtype, float((out - ref).abs().max()))


@pytest.mark.parametrize("grid,size,greyscale", [((4, 4), (30, 30), False), ((3, 5), (17, 40), False),
                                                   ((8, 8), (112, 112), False), ((2, 2), (9, 9), True)])
def test_reordered_forward_equals_literal_layers_with_gradients(grid, size, greyscale):
    """forward (taps at grid resolution + interpolation matrices, matmul classifier) is the
    same function as the literal layer sequence, and so are its parameter gradients."""
    dec = ConvDecoderWithImage(in_features=6, num_classes=4, greyscale=greyscale).double()
    _randomise(dec, seed=3)
    g = torch.Generator().manual_seed(2)
    features = torch.randn(2, 6, *grid, generator=g, dtype=torch.float64)
    images = torch.randn(2, 3, *size, generator=g, dtype=torch.float64)
    target = torch.randint(0, 4, (2, *size), generator=g)
    outs, grads = [], []
    for fn in (dec.forward, dec.forward_layers):
        dec.zero_grad()
        out = fn(features, images)
        dice_loss(out, target).backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in dec.named_parameters()})
    assert outs[0].shape == (2, 4, *size)
    assert torch.allclose(outs[0], outs[1], atol=1e-10, rtol=0)
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-12, rtol=1e-9), name


def test_bilinear_matrix_is_torch_interpolation():
    from pathrobust.probes.decoder import bilinear_matrix

    x = torch.randn(3, 7, 5, dtype=torch.float64)
    want = F.interpolate(x[None], size=(20, 11), mode="bilinear", align_corners=False)[0]
    got = bilinear_matrix(7, 20) @ x @ bilinear_matrix(5, 11).T
    assert torch.allclose(got, want, atol=1e-12)


def test_state_dict_uses_eva_names():
    keys = set(ConvDecoderWithImage(8, 3).state_dict())
    for key in ("_layers.1.0.weight", "_layers.1.1.running_var", "image_block.0.0.weight", "image_block.1.1.bias",
                "classifier.weight"):
        assert key in keys
    assert ConvDecoderWithImage(8, 3).image_block[0][0].in_channels == 64 + 3


def _toy_split(n: int, seed: int, size: int = 16, channels: int = 8) -> DenseSplit:
    """Grids that carry the answer: class 1 where the upsampled first channel is positive."""
    g = torch.Generator().manual_seed(seed)
    grids = torch.randn(n, channels, size // 4, size // 4, generator=g)
    masks = (F.interpolate(grids[:, :1], size=(size, size), mode="nearest")[:, 0] > 0).long()
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    return DenseSplit(grids.half(), images, masks)


LABELS = DenseLabels(("background", "fg"), num_classes=2)


def test_training_protocol_checkpoint_and_early_stopping():
    train, val = _toy_split(20, 0), _toy_split(8, 1)
    cfg = DecoderConfig(batch_size=8, max_steps=90, patience=3, n_runs=2, lr=3e-2)
    result = train_decoder_runs(train, val, LABELS, cfg)
    for run in result.runs:
        assert run.steps <= cfg.max_steps
        if run.steps < cfg.max_steps:  # stopped early: patience validations without a strict improvement
            assert run.epochs - run.best_epoch == cfg.patience
        # the reported scores are those of the stored best checkpoint
        again = evaluate_decoder(result.decoder(0 if run is result.runs[0] else 1, 8), val, LABELS, cfg,
                                 (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        assert again["dice"] == pytest.approx(run.scores["dice"])
        assert run.scores["dice"] > 0.8  # the grids hold the answer
    # one initialisation, two batch orders: different runs
    assert result.runs[0].steps != result.runs[1].steps or not torch.equal(
        result.runs[0].state["classifier.weight"], result.runs[1].state["classifier.weight"])


def test_runs_share_initialisation_and_max_steps_inside_an_epoch():
    train, val = _toy_split(20, 0), _toy_split(4, 1)
    cfg = DecoderConfig(batch_size=8, max_steps=4, n_runs=2, lr=0.0, weight_decay=0.0)  # 3 steps per epoch
    result = train_decoder_runs(train, val, LABELS, cfg)
    # lr 0: weights never move, so both checkpoints are the shared initialisation
    assert torch.equal(result.runs[0].state["_layers.1.0.weight"], result.runs[1].state["_layers.1.0.weight"])
    # step 4 falls inside epoch 2: Lightning validates epoch 1 only
    assert [(r.steps, r.epochs, r.best_epoch) for r in result.runs] == [(4, 2, 1), (4, 2, 1)]


def test_warmup_lr_per_epoch():
    cfg = DecoderConfig(lr=3e-3, warmup_epochs=5)
    assert [cfg.lr_at_epoch(e) for e in (0, 4, 5, 9)] == pytest.approx([1e-3, 1e-3, 3e-3, 3e-3])


def test_views_one_per_group_per_epoch():
    split = DenseSplit(torch.zeros(7, 2, 1, 1), torch.zeros(7, 3, 4, 4, dtype=torch.uint8),
                       torch.zeros(7, 4, 4), groups=np.array([0, 0, 0, 1, 1, 2, 2]))
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(20):
        rows = _epoch_rows(split, g).tolist()
        assert sorted(split.groups[rows].tolist()) == [0, 1, 2]
        seen.update(rows)
    assert seen == set(range(7))


def test_normalised_image_is_what_the_decoder_sees():
    img = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize_images(img, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert out[0, :, 0, 0].tolist() == pytest.approx([2.0, 1.0, 0.5])


def test_ignore_index_eva_mode_trains_on_five_outputs():
    train, val = _toy_split(12, 0), _toy_split(4, 1)
    for split in (train, val):
        split.masks[:, :2, :2] = 2  # an "ambiguous" corner
    labels = DenseLabels(("background", "fg", "ambiguous"), num_classes=2, ignore_index=2)
    for mode in ("eva", "exclude"):
        res = train_decoder_runs(train, val, labels, DecoderConfig(batch_size=8, max_steps=6, n_runs=1,
                                                                   ignore_mode=mode))
        assert "dice_ambiguous" not in res.runs[0].scores
        assert 0.0 <= res.runs[0].scores["dice"] <= 1.0


def test_bad_splits_rejected():
    train = _toy_split(4, 0)
    bad = _toy_split(4, 1)
    bad.masks[0, 0, 0] = 7
    with pytest.raises(ValueError, match="outside"):
        train_decoder_runs(train, bad, LABELS, DecoderConfig(max_steps=1, n_runs=1))
    with pytest.raises(ValueError, match="differ in size"):
        DenseSplit(torch.zeros(1, 2, 1, 1), torch.zeros(1, 3, 4, 4, dtype=torch.uint8), torch.zeros(1, 5, 5))


TINY = SynthDenseConfig(tile=56, train_tiles=8, val_tiles=4, test_tiles=4, renderings=("GIV-AT2", "MY-P"))


@pytest.fixture(scope="module")
def tiny_dense(tmp_path_factory):
    return write_synth_dense(tmp_path_factory.mktemp("synth") / "dense", TINY)


def test_synthetic_layout_and_masks(tiny_dense):
    task = read_generic_dense(tiny_dense, size=56)
    assert sorted(task.splits) == ["test", "train", "val", "val_GIV-AT2", "val_MY-P"]
    assert task.labels.class_names == ("background", "nuclei", "stroma")
    assert (task.train_split, task.val_split, task.eval_split) == ("train", "val", "test")
    images, masks = task.splits["val"].arrays()
    r_images, r_masks = task.splits["val_GIV-AT2"].arrays()
    assert torch.equal(masks, r_masks) and not torch.equal(images, r_images)
    counts = np.bincount(masks.numpy().ravel(), minlength=3)
    assert (counts > 0).all()  # every class occurs
    # nuclei are where haematoxylin is dense: darker than stroma on average
    grey = images.float().mean(1)
    assert grey[masks == 1].mean() < grey[masks == 2].mean() - 20
    assert write_synth_dense(tiny_dense, TINY) == tiny_dense  # reused


def test_end_to_end_tokens_decoder_dice(tiny_dense, tmp_path):
    torch.manual_seed(0)
    encoder = build_encoder(tiny_vit_spec(img=56, dim=32, depth=1), weights="random")
    task = read_generic_dense(tiny_dense, size=56)
    cfg = DecoderConfig(max_steps=6, n_runs=2, batch_size=4, eval_batch_size=4)
    ev = evaluate_dense_task(encoder, task, cfg, tmp_path / "grids")
    assert (tmp_path / "grids" / task.name / "train.h5").is_file()
    assert len(ev.per_run) == 2
    for key in ("dice", "dice_ignore_empty_false", "dice_micro", "dice_macro", "dice_weighted", "mean_iou",
                "dice_background", "dice_nuclei", "dice_stroma"):
        mean, std = ev.scores[key]
        assert 0.0 <= mean <= 1.0 and std >= 0.0, key
    assert set(ev.consistency) == {"val_GIV-AT2", "val_MY-P"}
    assert all(0.0 <= m <= 1.0 for m, _ in ev.consistency.values())
    assert set(ev.render_dice) == {"val_GIV-AT2", "val_MY-P"}
    run = ev.result.runs[0]
    assert run.predictions["val"].shape == (4, 56, 56)
    assert not math.isnan(ev.scores["dice"][0])
