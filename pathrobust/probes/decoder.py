"""eva 0.4.5's online segmentation decoder and its training protocol, on cached token grids.

What is reproduced (kaiko-ai/eva 0.4.5: ``configs/vision/pathology/online/segmentation/
{consep,monusac}.yaml``, ``ConvDecoderWithImage``, ``SemanticSegmentationModule``,
``eva.vision.losses.DiceLoss``; MONAI 1.3.2, Lightning 2.4.0 as eva's lock file pins):

* decoder :class:`ConvDecoderWithImage` (hidden ``[64, 32, 32]``): ``Upsample(scale 2,
  nearest)`` -> Conv3x3(pad 1)-BN-ReLU (C -> 64) -> bilinear resize (align_corners False)
  to the mask size -> concatenate the normalised input image -> Conv3x3-BN-ReLU (67 -> 32)
  -> Conv3x3-BN-ReLU (32 -> 32) -> Conv1x1 (-> classes). Submodule names follow eva's
  (``_layers``, ``image_block``, ``classifier``), so state dicts are interchangeable. The
  forward computes the same function in a cheaper order (same weights; float32 results
  differ by rounding only, the tests check both against the literal layer sequence,
  :meth:`ConvDecoderWithImage.forward_layers`): the 67-channel convolution is the sum of its
  feature-channel and image-channel parts (no input gradient for the image), and the
  feature part — a 3x3 convolution of a bilinear resize, both linear — is a 1x1 convolution
  to 9 x 32 tap channels at grid resolution followed by the resize's interpolation matrices
  (shifted per tap) as two matrix products, so no 64-channel full-resolution map is built or
  convolved; the 1x1 classifier is a batched matrix product. A CPU training step on a
  ViT-B/14 grid at 224 px is ~1.7x faster than the literal sequence (benchmarks/dense_decoder.py);
* loss :func:`dice_loss`: MONAI ``DiceLoss(softmax=True, batch=True)`` with its defaults
  (background included, ``smooth_nr = smooth_dr = 1e-5``, mean over classes), targets
  one-hot; eva's ``ignore_index`` handling (MoNuSAC's ambiguous class 5): those pixels get
  background as target and zeroed logits (``ignore_mode="eva"``); ``"exclude"`` drops them
  from every sum instead (the clean variant);
* ``torch.optim.AdamW(lr=2e-3)`` (torch's default ``weight_decay=0.01``, betas (0.9, 0.999),
  eps 1e-8); the module's default scheduler ``ConstantLR(factor=1/3, total_iters=5)`` stepped
  per epoch (lr/3 for the first five epochs); batch 64, reshuffled every epoch, last partial
  batch kept; at most ``max_steps=2000`` optimiser steps;
* validation after every *complete* epoch (Lightning does not validate when ``max_steps``
  ends an epoch early); ``EarlyStopping(min_delta=0, mode="max")`` on the validation MONAI
  Dice (stop after ``patience`` validations in a row without a strict improvement: 200 for
  CoNSeP, 100 for MoNuSAC) and ``ModelCheckpoint(save_top_k=1)`` on the same score (the first
  validation reaching the best); the best checkpoint is the run's result;
* 5 runs seeded once (``seed_everything(42)``): the decoder is built once and copied for
  every run, so the runs share one initialisation and differ in their batch order.

The frozen encoder is not run here: inputs are the token grids it produced once per tile
(:mod:`pathrobust.encoders.grid`). So eva's per-step augmentation (MoNuSAC's training
``RandomResizedCrop``) becomes a fixed set of cached views per image (``DenseSplit.groups``:
each epoch uses one randomly drawn view of every image). eva keeps the whole module, frozen
encoder included, in train mode while fitting; that only matters for encoders with dropout or
batch norm, which cached grids (computed in eval mode) do not see.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pathrobust.data.eva_dense import DenseLabels, DenseTiles
from pathrobust.metrics.classification import mean_std
from pathrobust.metrics.segmentation import IGNORE_MODES, consistency_dice, segmentation_scores

MONITOR = "dice"  # eva's val/MonaiDiceScore


class Conv2dBnReLU(nn.Sequential):
    """Conv (k x k, padding) -> BatchNorm2d -> ReLU, as eva's block of the same name."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, padding: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=kernel_size, padding=padding),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class ConvDecoderWithImage(nn.Module):
    """eva's ``ConvDecoderWithImage`` on one feature map.

    ``forward(features, images)``: ``features`` ``(B, C, h, w)`` token grid, ``images``
    ``(B, 3, H, W)`` the *normalised* input images (or ``(B, 1, H, W)`` with ``greyscale``)
    -> logits ``(B, classes, H, W)``. ``size`` overrides the output size (default: the images')."""

    def __init__(self, in_features: int, num_classes: int, hidden_dims: Sequence[int] = (64, 32, 32),
                 greyscale: bool = False) -> None:
        super().__init__()
        if len(hidden_dims) != 3:
            raise ValueError("hidden_dims must have 3 elements")
        self._layers = nn.Sequential(nn.Upsample(scale_factor=2), Conv2dBnReLU(in_features, hidden_dims[0]))
        self.greyscale = greyscale
        self.image_block = nn.Sequential(
            Conv2dBnReLU(hidden_dims[0] + (1 if greyscale else 3), hidden_dims[1]),
            Conv2dBnReLU(hidden_dims[1], hidden_dims[2]),
        )
        self.classifier = nn.Conv2d(hidden_dims[2], num_classes, kernel_size=1)

    def forward(self, features: torch.Tensor, images: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        size = tuple(size or images.shape[-2:])
        x = self._layers(features)
        if self.greyscale:
            images = _greyscale(images)
        conv, bn, relu = self.image_block[0]
        n, k, h, w = x.shape
        o = conv.out_channels
        # image_block[0] on cat([resize(x), images]) = its image-channel convolution (bias
        # included) + its feature-channel convolution of the bilinear resize. The latter is
        # linear in x: tap (ky, kx) of the 3x3 kernel is a 1x1 convolution at grid resolution,
        # resized and shifted by (ky - 1, kx - 1) with zero fill; resizing is one matrix per
        # axis, so out = Ah @ Y @ Aw^T with Y the (3h, 3w) block matrix of the taps' outputs
        # and Ah = [A shifted by -1 | A | A shifted by +1] (size, 3h), likewise Aw
        ah, aw_t = _tap_matrices(h, w, size, x.dtype, x.device)
        taps = conv.weight[:, :k].permute(0, 2, 3, 1).reshape(o * 9, k, 1, 1)  # rows (o, ky, kx)
        y = F.conv2d(x, taps).view(n, o, 3, 3, h, w).permute(0, 1, 2, 4, 3, 5).reshape(n, o, 3 * h, 3 * w)
        x = F.conv2d(images, conv.weight[:, k:], conv.bias, padding=conv.padding) + torch.matmul(torch.matmul(ah, y), aw_t)
        x = self.image_block[1](relu(bn(x)))
        c = self.classifier  # 1x1 convolution as one batched matrix product (~2x faster on CPU)
        out = torch.baddbmm(c.bias.view(1, -1, 1), c.weight.view(1, c.out_channels, -1).expand(n, -1, -1),
                            x.reshape(n, x.shape[1], -1))
        return out.view(n, c.out_channels, *x.shape[-2:])

    def forward_layers(self, features: torch.Tensor, images: torch.Tensor,
                       size: tuple[int, int] | None = None) -> torch.Tensor:
        """eva's layer sequence literally (the reference :meth:`forward` is checked against;
        the same function, slower): upsample, conv, bilinear resize, concatenation, convs."""
        size = tuple(size or images.shape[-2:])
        x = F.interpolate(self._layers(features), size, mode="bilinear", align_corners=False)  # Decoder2D._upscale
        if self.greyscale:
            images = _greyscale(images)
        return self.classifier(self.image_block(torch.cat([x, images], dim=1)))


def _greyscale(images: torch.Tensor) -> torch.Tensor:
    from torchvision.transforms.functional import rgb_to_grayscale

    return rgb_to_grayscale(images)


def bilinear_matrix(n: int, size: int) -> torch.Tensor:
    """``(size, n)`` float64: row ``i`` holds the weights ``F.interpolate(mode="bilinear",
    align_corners=False)`` gives the ``n`` inputs of output ``i`` along one axis (taken from
    torch's own kernel, so the two agree exactly)."""
    eye = torch.eye(n, dtype=torch.float64).view(n, 1, n, 1)
    return F.interpolate(eye, size=(size, 1), mode="bilinear", align_corners=False)[:, 0, :, 0].T.contiguous()


def _shifted_blocks(a: torch.Tensor) -> torch.Tensor:
    """``[A(-1) | A(0) | A(+1)]`` ``(size, 3n)`` where ``A(d)[i] = A[i + d]`` (0 outside)."""
    blocks = []
    for d in (-1, 0, 1):
        b = torch.zeros_like(a)
        if d < 0:
            b[1:] = a[:-1]
        elif d > 0:
            b[:-1] = a[1:]
        else:
            b = a
        blocks.append(b)
    return torch.cat(blocks, dim=1)


@functools.lru_cache(maxsize=16)
def _tap_matrices(h: int, w: int, size: tuple[int, int], dtype: torch.dtype, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``Ah`` ``(H, 3h)`` and ``Aw^T`` ``(3w, W)`` of :meth:`ConvDecoderWithImage.forward`
    (constant per grid and mask size: built once)."""
    ah = _shifted_blocks(bilinear_matrix(h, size[0])).to(device=device, dtype=dtype)
    aw_t = _shifted_blocks(bilinear_matrix(w, size[1])).T.contiguous().to(device=device, dtype=dtype)
    return ah, aw_t


def dice_loss(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int | None = None,
              ignore_mode: str = "eva", smooth_nr: float = 1e-5, smooth_dr: float = 1e-5) -> torch.Tensor:
    """MONAI ``DiceLoss(softmax=True, batch=True)`` with eva's index targets.

    Args:
        logits: ``(B, C, H, W)``.
        target: int ``(B, H, W)``, class ids in ``[0, C)`` or ``ignore_index``.
        ignore_index: eva: where the target is this class the target becomes background and the
            logits zero (``ignore_mode="eva"``); ``"exclude"`` leaves those pixels out.

    Returns:
        Scalar: ``mean_c [1 - (2 sum(p_c y_c) + nr) / (sum(y_c) + sum(p_c) + dr)]`` with
        sums over batch and pixels, ``p = softmax(logits)``, ``y`` one-hot.
    """
    if ignore_mode not in IGNORE_MODES:
        raise ValueError(f"ignore_mode '{ignore_mode}': expected one of {IGNORE_MODES}")
    target = target.long()
    weight = None
    if ignore_index is not None:
        keep = target != ignore_index
        target = target * keep
        if ignore_mode == "eva":
            logits = logits * keep[:, None]
        else:
            weight = keep[:, None].to(logits.dtype)
    probs = torch.softmax(logits, dim=1)
    onehot = torch.zeros_like(probs).scatter_(1, target[:, None], 1.0)
    if weight is not None:
        probs, onehot = probs * weight, onehot * weight
    dims = (0, 2, 3)
    intersection = (probs * onehot).sum(dim=dims)
    denominator = onehot.sum(dim=dims) + probs.sum(dim=dims)
    return (1.0 - (2.0 * intersection + smooth_nr) / (denominator + smooth_dr)).mean()


@dataclass(frozen=True)
class DecoderConfig:
    """Protocol parameters (values: ``suites/eva.toml``, ``[dense]`` and ``[dense.tasks.*]``)."""

    lr: float = 2e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    batch_size: int = 64
    eval_batch_size: int = 64
    max_steps: int = 2000
    warmup_epochs: int = 5
    warmup_factor: float = 1.0 / 3.0
    patience: int = 200
    n_runs: int = 5
    seed: int = 42
    hidden_dims: tuple[int, int, int] = (64, 32, 32)
    smooth_nr: float = 1e-5
    smooth_dr: float = 1e-5
    ignore_mode: str = "eva"

    def __post_init__(self) -> None:
        if self.ignore_mode not in IGNORE_MODES:
            raise ValueError(f"ignore_mode '{self.ignore_mode}': expected one of {IGNORE_MODES}")
        if min(self.batch_size, self.eval_batch_size, self.max_steps, self.n_runs, self.patience) < 1:
            raise ValueError("batch sizes, max_steps, n_runs and patience must be >= 1")

    def lr_at_epoch(self, epoch: int) -> float:
        """ConstantLR: ``lr * warmup_factor`` for epochs ``0 .. warmup_epochs - 1``, then ``lr``."""
        return self.lr * (self.warmup_factor if epoch < self.warmup_epochs else 1.0)


@dataclass
class DenseSplit:
    """One split's decoder inputs.

    ``grids`` ``(N, C, h, w)`` float16/32 token grids; ``images`` ``(N, 3, H, W)`` uint8 tiles
    (the encoder's input, normalised here for the decoder); ``masks`` ``(N, H, W)`` int class
    ids; ``groups`` ``(N,)`` int or None: rows with one group id are views of one image
    (training draws one of them per epoch)."""

    grids: torch.Tensor
    images: torch.Tensor
    masks: torch.Tensor
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.grids = torch.as_tensor(self.grids)
        self.images = torch.as_tensor(self.images)
        self.masks = torch.as_tensor(self.masks).long()
        n = len(self.grids)
        if self.grids.ndim != 4 or self.images.ndim != 4 or self.masks.ndim != 3:
            raise ValueError(f"DenseSplit: grids {tuple(self.grids.shape)}, images {tuple(self.images.shape)}, "
                             f"masks {tuple(self.masks.shape)}; expected (N,C,h,w), (N,3,H,W), (N,H,W)")
        if len(self.images) != n or len(self.masks) != n:
            raise ValueError(f"DenseSplit: {n} grids, {len(self.images)} images, {len(self.masks)} masks")
        if self.images.shape[-2:] != self.masks.shape[-2:]:
            raise ValueError(f"DenseSplit: images {tuple(self.images.shape[-2:])} and masks "
                             f"{tuple(self.masks.shape[-2:])} differ in size")
        if self.groups is not None:
            self.groups = np.asarray(self.groups, dtype=np.int64)
            if self.groups.shape != (n,):
                raise ValueError(f"DenseSplit: groups {self.groups.shape}, expected ({n},)")

    def __len__(self) -> int:
        return len(self.grids)

    @classmethod
    def from_tiles(cls, tiles: DenseTiles, grids) -> DenseSplit:
        """A reader's split with its cached token grids (``(N, C, h, w)``, the tiles' order)."""
        images, masks = tiles.arrays()
        return cls(torch.as_tensor(np.asarray(grids)), images, masks, tiles.groups if tiles.views else None)


@dataclass
class DecoderRun:
    """One run: ``scores`` of its best checkpoint on the validation split, ``best_epoch``
    (1-based), ``epochs`` validated, ``steps`` trained, ``state`` the best decoder weights;
    ``split_scores`` / ``predictions`` (``(N, H, W)`` uint8) of that checkpoint on the extra
    splits asked for."""

    scores: dict[str, float]
    best_epoch: int
    epochs: int
    steps: int
    state: dict[str, torch.Tensor] = field(repr=False)
    split_scores: dict[str, dict[str, float]] = field(default_factory=dict)
    predictions: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


@dataclass
class DecoderResult:
    runs: list[DecoderRun]
    labels: DenseLabels
    config: DecoderConfig

    def summary(self, split: str | None = None) -> dict[str, tuple[float, float]]:
        """Metric -> (mean, sample std) over runs (as eva's session recorder), on the
        validation split or on one of the extra ``split``s."""
        scores = [r.scores if split is None else r.split_scores[split] for r in self.runs]
        return {k: mean_std([s[k] for s in scores]) for k in scores[0]}

    def consistency(self, reference: str, renderings: Sequence[str]) -> dict[str, tuple[float, float]]:
        """Segmentation consistency per rendering: each run's mean over tiles of
        :func:`~pathrobust.metrics.segmentation.consistency_dice` (its predictions on the
        rendering against its predictions on ``reference``), then (mean, std) over runs.
        Needs ``predict_splits`` to have covered ``reference`` and the renderings."""
        return {name: mean_std(per_run) for name, per_run in self.consistency_per_run(reference, renderings).items()}

    def consistency_per_run(self, reference: str, renderings: Sequence[str]) -> dict[str, list[float]]:
        """Rendering -> each run's mean over tiles of the segmentation consistency (see
        :meth:`consistency`)."""
        return {name: [float(np.nanmean(consistency_dice(r.predictions[name], r.predictions[reference],
                                                         self.labels.num_classes))) for r in self.runs]
                for name in renderings}

    def decoder(self, run: int, in_features: int) -> ConvDecoderWithImage:
        """Run ``run``'s best checkpoint as an eval-mode module."""
        dec = ConvDecoderWithImage(in_features, self.labels.num_classes, self.config.hidden_dims)
        dec.load_state_dict(self.runs[run].state)
        return dec.eval()


def normalize_images(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` -> float32, ``(x / 255 - mean) / std`` (eva's ToDtype + Normalize)."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s


@torch.no_grad()
def predict_masks(decoder: nn.Module, split: DenseSplit, mean: Sequence[float], std: Sequence[float],
                  batch_size: int = 64, device: str | torch.device = "cpu") -> torch.Tensor:
    """Argmax class maps ``(N, H, W)`` int64 of an eval-mode decoder on a split."""
    decoder.eval()
    out = []
    for start in range(0, len(split), batch_size):
        sl = slice(start, start + batch_size)
        grids = split.grids[sl].to(device, torch.float32)
        images = normalize_images(split.images[sl].to(device), mean, std)
        out.append(decoder(grids, images).argmax(dim=1).cpu())
    return torch.cat(out) if out else torch.zeros((0, *split.masks.shape[1:]), dtype=torch.long)


def _epoch_rows(split: DenseSplit, generator: torch.Generator) -> torch.Tensor:
    """Row order of one epoch: a permutation of the rows, or of the groups with one random
    view drawn per group."""
    if split.groups is None:
        return torch.randperm(len(split), generator=generator)
    uniq, inverse = np.unique(split.groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    order = torch.randperm(len(uniq), generator=generator).tolist()
    picks = torch.rand(len(uniq), generator=generator).tolist()
    return torch.tensor([int(members[g][int(picks[g] * len(members[g]))]) for g in order], dtype=torch.long)


def _check(train: DenseSplit, val: DenseSplit, labels: DenseLabels) -> None:
    for name, split in (("train", train), ("val", val)):
        if len(split) == 0:
            raise ValueError(f"the {name} split is empty")
        allowed = labels.metric_num_classes
        if int(split.masks.min()) < 0 or int(split.masks.max()) >= allowed:
            raise ValueError(f"{name} masks hold class ids outside [0, {allowed})")
    if train.grids.shape[1] != val.grids.shape[1]:
        raise ValueError(f"train grids have {train.grids.shape[1]} channels, val grids {val.grids.shape[1]}")


def evaluate_decoder(decoder: nn.Module, split: DenseSplit, labels: DenseLabels, config: DecoderConfig,
                     mean: Sequence[float], std: Sequence[float], device: str | torch.device = "cpu") -> dict[str, float]:
    """All segmentation scores of a decoder on a split (see :mod:`pathrobust.metrics.segmentation`)."""
    return _scores(predict_masks(decoder, split, mean, std, config.eval_batch_size, device), split, labels, config)


def _scores(pred: torch.Tensor, split: DenseSplit, labels: DenseLabels, config: DecoderConfig) -> dict[str, float]:
    return segmentation_scores(pred, split.masks, labels.metric_num_classes, class_names=labels.class_names,
                               ignore_index=labels.ignore_index, ignore_mode=config.ignore_mode,
                               batch_size=config.eval_batch_size)


def train_decoder_runs(train: DenseSplit, val: DenseSplit, labels: DenseLabels, config: DecoderConfig = DecoderConfig(),
                       *, mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                       score_splits: dict[str, DenseSplit] | None = None, predict_splits: Sequence[str] = (),
                       device: str | torch.device = "cpu", progress: Any = None) -> DecoderResult:
    """Train ``config.n_runs`` decoders with eva's protocol (module docstring) and score each
    run's best checkpoint on ``val``.

    Args:
        train, val: the splits (``val`` chooses the checkpoint and is scored, as in eva).
        labels: classes (decoder outputs, metric classes, ignored class).
        config: protocol parameters.
        mean, std: the encoder's normalisation, applied to the images the decoder sees.
        score_splits: more splits (name -> split) to score each run's best checkpoint on
            (e.g. a test split, renderings under other stainings); ``"val"`` names ``val``.
        predict_splits: names (in ``score_splits`` or ``"val"``) whose argmax predictions are
            kept per run (for :meth:`DecoderResult.consistency`).
        device: where to train.
        progress: optional callable ``progress(steps_done)`` called after each step.

    Returns:
        :class:`DecoderResult` with one :class:`DecoderRun` per run.
    """
    _check(train, val, labels)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        initial = ConvDecoderWithImage(train.grids.shape[1], labels.num_classes, config.hidden_dims)
    generator = torch.Generator().manual_seed(config.seed)  # batch orders; runs continue the stream
    train_dev = DenseSplit(train.grids.to(device), train.images.to(device), train.masks.to(device), train.groups)
    extra = {"val": val, **(score_splits or {})}
    unknown = [name for name in predict_splits if name not in extra]
    if unknown:
        raise ValueError(f"predict_splits {unknown} are not among the scored splits {sorted(extra)}")
    runs = []
    for _ in range(config.n_runs):
        run = _train_one(copy.deepcopy(initial).to(device), train_dev, val, labels, config, mean, std,
                         device, generator, progress)
        decoder = ConvDecoderWithImage(train.grids.shape[1], labels.num_classes, config.hidden_dims).to(device)
        decoder.load_state_dict(run.state)
        for name, split in (score_splits or {}).items():
            pred = predict_masks(decoder, split, mean, std, config.eval_batch_size, device)
            run.split_scores[name] = _scores(pred, split, labels, config)
            if name in predict_splits:
                run.predictions[name] = pred.to(torch.uint8)
        if "val" in predict_splits:
            run.predictions["val"] = predict_masks(decoder, val, mean, std, config.eval_batch_size, device).to(torch.uint8)
        runs.append(run)
    return DecoderResult(runs=runs, labels=labels, config=config)


def _train_one(decoder: ConvDecoderWithImage, train: DenseSplit, val: DenseSplit, labels: DenseLabels,
               config: DecoderConfig, mean, std, device: torch.device, generator: torch.Generator,
               progress) -> DecoderRun:
    opt = torch.optim.AdamW(decoder.parameters(), lr=config.lr, betas=config.betas, eps=config.eps,
                            weight_decay=config.weight_decay)
    best, best_scores, best_state, best_epoch = -float("inf"), None, None, 0
    wait = steps = epoch = 0
    while steps < config.max_steps:
        for group in opt.param_groups:
            group["lr"] = config.lr_at_epoch(epoch)
        rows = _epoch_rows(train, generator)
        batches = rows.split(config.batch_size)
        decoder.train()
        done = 0
        for batch in batches:
            batch = batch.to(device)
            grids = train.grids[batch].float()
            images = normalize_images(train.images[batch], mean, std)
            logits = decoder(grids, images)
            loss = dice_loss(logits, train.masks[batch], ignore_index=labels.ignore_index,
                             ignore_mode=config.ignore_mode, smooth_nr=config.smooth_nr, smooth_dr=config.smooth_dr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            done += 1
            if progress is not None:
                progress(1)
            if steps >= config.max_steps:
                break
        epoch += 1
        if done < len(batches):
            break  # max_steps inside an epoch: Lightning stops without validating
        scores = evaluate_decoder(decoder, val, labels, config, mean, std, device)
        if scores[MONITOR] > best:
            best, best_scores, best_epoch, wait = scores[MONITOR], scores, epoch, 0
            best_state = {k: v.detach().cpu().clone() for k, v in decoder.state_dict().items()}
        else:
            wait += 1
            if wait >= config.patience:
                break
    if best_state is None:  # max_steps ended inside the first epoch: score the last weights
        best_scores = evaluate_decoder(decoder, val, labels, config, mean, std, device)
        best_state = {k: v.detach().cpu().clone() for k, v in decoder.state_dict().items()}
        best_epoch = 0
    return DecoderRun(scores=best_scores, best_epoch=best_epoch, epochs=epoch, steps=steps, state=best_state)
