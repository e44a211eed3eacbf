"""eva's linear-probe protocol on cached embeddings, with all runs of a task trained at once.

What is reproduced (kaiko-ai/eva, ``configs/vision/pathology/offline/classification/*.yaml``
and ``eva.core.models.modules.HeadModule``):

* head = ``torch.nn.Linear(dim, C)`` (``C = 1`` + ``BCEWithLogitsLoss`` for binary tasks,
  ``CrossEntropyLoss`` otherwise), default ``nn.Linear`` initialisation;
* ``torch.optim.AdamW(lr=3e-4)`` with torch's default ``weight_decay=0.01``, betas
  (0.9, 0.999), eps 1e-8; batch 256, a reshuffled order every epoch, last batch kept;
* ``HeadModule``'s default scheduler ``torch.optim.lr_scheduler.ConstantLR`` (factor 1/3,
  ``total_iters=5``) stepped once per epoch (Lightning's default interval): the first five
  epochs train at lr/3;
* at most ``max_steps=12500`` optimiser steps; validation after every epoch; Lightning's
  ``EarlyStopping(min_delta=0, mode="max")`` on validation balanced accuracy (stop once
  ``patience`` epochs in a row did not strictly improve) and ``ModelCheckpoint(save_top_k=1)``
  (the first epoch reaching the best score is the checkpoint);
* the best checkpoint is then evaluated (``checkpoint_type: best``); ``n_runs=5``.

One deviation, documented: when ``max_steps`` ends in the middle of an epoch the partial
epoch is validated too, so its training is not wasted.

Batching: the ``R`` runs (seeds ``seed + r``) share one weight tensor ``(R, C, D)`` and
advance in lockstep; each run draws its own initialisation and per-epoch order from its own
generator, keeps its own AdamW moments, early-stopping counter and best checkpoint, and
leaves the batch when it stops. Gradients are computed in closed form (softmax/sigmoid
minus target, times the inputs) and AdamW is applied elementwise exactly as
``torch.optim.AdamW``'s single-tensor path does, so each run is the same computation as
:func:`train_probe_reference` — the straightforward one-run-at-a-time loop with
``nn.Linear``, autograd and ``torch.optim.AdamW`` — up to float rounding.

Threads: torch's intra-op setting (``torch.set_num_threads``). Two threads made a step of the
benchmark's shape 1.4x faster than one here. Results are bit-identical for a given thread count;
another count changes the rounding of the matrix products (~1e-8 on the weights).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from pathrobust.metrics.classification import balanced_accuracy_batched, predictions_from_logits


@dataclass(frozen=True)
class ProbeConfig:
    """Protocol parameters. The suite builds them from ``suites/eva.toml``; the defaults are
    eva's published values, the same as that file's (a test holds them equal)."""

    lr: float = 3e-4
    weight_decay: float = 0.01
    batch_size: int = 256
    max_steps: int = 12_500
    warmup_epochs: int = 5
    warmup_factor: float = 1.0 / 3.0
    patience: int = 7
    n_runs: int = 5
    seed: int = 42
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def lr_at_epoch(self, epoch: int) -> float:
        """ConstantLR: ``lr * factor`` for epochs ``0 .. warmup_epochs - 1``, then ``lr``."""
        return self.lr * (self.warmup_factor if epoch < self.warmup_epochs else 1.0)


@dataclass
class ProbeResult:
    """Outcome of ``R`` probe runs.

    ``weight`` ``(R, C, D)`` and ``bias`` ``(R, C)`` are each run's best checkpoint;
    ``val_balanced_accuracy`` ``(R,)`` its validation score; ``best_epoch`` (1-based epoch of
    the checkpoint), ``epochs`` and ``steps`` (how long each run trained)."""

    weight: torch.Tensor
    bias: torch.Tensor
    val_balanced_accuracy: np.ndarray
    best_epoch: np.ndarray
    epochs: np.ndarray
    steps: np.ndarray
    num_classes: int
    history: list[np.ndarray] = field(default_factory=list)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(N, D)`` -> ``(R, N, C)``."""
        x = torch.as_tensor(x, dtype=self.weight.dtype)
        return shared_input_logits(x, self.weight) + self.bias[:, None, :]

    def balanced_accuracy(self, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        """Balanced accuracy of every run's checkpoint on ``(x, y)``: ``(R,)``."""
        preds = predictions_from_logits(self.logits(x))
        y = torch.as_tensor(y, dtype=torch.long)
        return balanced_accuracy_batched(y, preds, self.num_classes).numpy()


def shared_input_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Every run's logits on the same inputs: ``x`` ``(N, D)``, ``weight`` ``(R, C, D)`` ->
    ``(R, N, C)``, as one ``(N, D) @ (D, R * C)`` product (``torch.matmul`` would first copy
    ``x`` ``R`` times to broadcast it, doubling the time of each validation)."""
    runs, classes, dim = weight.shape
    return (x @ weight.reshape(runs * classes, dim).T).view(len(x), runs, classes).transpose(0, 1)


def patience_in_epochs(published_patience: int, published_train_size: int, train_size: int,
                       batch_size: int) -> int:
    """eva's per-task patience in epochs, carried over to a dataset of another size.

    eva's published patiences all equal ``ceil(2500 / steps_per_epoch)`` of the full training
    sets (BACH 268 -> 1250, MHIST 2175 -> 278, CRC 100,000 -> 7, PCam 262,144 -> 3,
    BreakHis 1132 -> 500): about 2,500 optimiser steps without improvement. A smaller or
    larger set keeps that budget in steps; the published size gives the published number."""
    published_steps = published_patience * math.ceil(published_train_size / batch_size)
    steps_per_epoch = math.ceil(train_size / batch_size)
    if train_size == published_train_size:
        return published_patience
    return max(1, math.ceil(published_steps / steps_per_epoch))


def _init_linear(dim: int, out: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``nn.Linear.reset_parameters`` drawn from ``generator``: kaiming_uniform(a=sqrt(5))
    on the weight = U(-1/sqrt(dim), 1/sqrt(dim)), then the bias from the same bound."""
    bound = 1.0 / math.sqrt(dim) if dim > 0 else 0.0
    weight = torch.empty(out, dim).uniform_(-bound, bound, generator=generator)
    bias = torch.empty(out).uniform_(-bound, bound, generator=generator)
    return weight, bias


def _check_inputs(train_x, train_y, val_x, val_y, num_classes: int):
    train_x = torch.as_tensor(np.asarray(train_x), dtype=torch.float32).contiguous()
    val_x = torch.as_tensor(np.asarray(val_x), dtype=torch.float32).contiguous()
    train_y = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
    val_y = torch.as_tensor(np.asarray(val_y), dtype=torch.long)
    if train_x.ndim != 2 or val_x.ndim != 2 or train_x.shape[1] != val_x.shape[1]:
        raise ValueError(f"embeddings must be (N, D) with the same D; got {tuple(train_x.shape)} and {tuple(val_x.shape)}")
    if len(train_x) != len(train_y) or len(val_x) != len(val_y):
        raise ValueError("embeddings and labels differ in length")
    if len(train_x) == 0 or len(val_x) == 0:
        raise ValueError("empty train or validation split")
    for y in (train_y, val_y):
        if int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes})")
    return train_x, train_y, val_x, val_y


def train_linear_probes(train_x, train_y, val_x, val_y, num_classes: int, config: ProbeConfig = ProbeConfig(),
                        progress: Callable[[int], None] | None = None) -> ProbeResult:
    """Train ``config.n_runs`` linear probes at once (see the module docstring).

    Args:
        train_x: ``(N, D)`` float embeddings; train_y: ``(N,)`` int labels in ``[0, C)``.
        val_x, val_y: the validation split (early stopping and checkpoint selection).
        num_classes: ``C``; ``2`` trains eva's one-logit binary head.
        config: protocol parameters.
        progress: called with the number of optimiser steps just taken (progress bars).

    Returns:
        :class:`ProbeResult` holding each run's best checkpoint.
    """
    x, y, vx, vy = _check_inputs(train_x, train_y, val_x, val_y, num_classes)
    binary = num_classes == 2
    n, dim = x.shape
    width = _padded_width(dim + 1)
    x, vx = _with_bias_column(x, width), _with_bias_column(vx, width)
    out = 1 if binary else num_classes
    runs = config.n_runs
    bsz = config.batch_size
    generators = [torch.Generator().manual_seed(config.seed + r) for r in range(runs)]
    inits = [_init_linear(dim, out, g) for g in generators]
    # (A, C, width): nn.Linear's weight layout (fast for bmm), the bias in column ``dim``, zeros after
    params = torch.zeros(runs, out, width)
    for r, (w, b) in enumerate(inits):
        params[r, :, :dim], params[r, :, dim] = w, b
    m, v = torch.zeros_like(params), torch.zeros_like(params)
    # targets as (C, N): the step works on transposed logits (A, C, b), the fast bmm layout
    target = (y.to(torch.float32)[None] if binary else F.one_hot(y, out).to(torch.float32).T).contiguous()
    buffers = _StepBuffers(x=runs * bsz * width, logits=runs * out * bsz, target=out * runs * bsz,
                           grad=runs * out * width)

    best = params.clone()
    best_score = np.full(runs, -np.inf)
    best_epoch = np.zeros(runs, dtype=np.int64)
    stopped_epoch = np.zeros(runs, dtype=np.int64)
    stopped_step = np.zeros(runs, dtype=np.int64)
    wait = np.zeros(runs, dtype=np.int64)
    active = np.arange(runs)  # original run index of each row of the live tensors
    history: list[np.ndarray] = []

    beta1, beta2 = config.betas
    steps_per_epoch = math.ceil(n / bsz)
    step = epoch = 0
    while step < config.max_steps and len(active):
        lr = config.lr_at_epoch(epoch)
        perms = torch.stack([torch.randperm(n, generator=generators[r]) for r in active])
        for k in range(steps_per_epoch):
            if step >= config.max_steps:
                break
            idx = perms[:, k * bsz:(k + 1) * bsz]  # (A, b): every run's own batch
            a, b = idx.shape
            flat = idx.reshape(-1)
            xb = torch.index_select(x, 0, flat, out=buffers.take("x", a * b, width)).view(a, b, width)
            z = torch.bmm(params, xb.mT, out=buffers.take("logits", a, out, b))  # logits, transposed: (A, C, b)
            # d(mean loss)/dz for BCE-with-logits and softmax cross-entropy alike: (p - target) / b
            prob = torch.sigmoid(z) if binary else torch.softmax(z, dim=1)
            batch_target = torch.index_select(target, 1, flat, out=buffers.take("target", out, a * b))
            grad_z = prob.sub_(batch_target.view(out, a, b).transpose(0, 1)).div_(b)
            grad = torch.bmm(grad_z, xb, out=buffers.take("grad", a, out, width))  # weight and bias gradients
            _adamw_(params, grad, m, v, step + 1, lr, beta1, beta2, config.eps, config.weight_decay)
            step += 1
            if progress is not None:
                progress(1)
        epoch += 1
        # validate every live run, then early-stopping / checkpoint bookkeeping per run
        scores = balanced_accuracy_batched(
            vy, predictions_from_logits(shared_input_logits(vx, params)), num_classes).numpy()
        history.append(_spread(scores, active, runs))
        keep = []
        for row, r in enumerate(active):
            if scores[row] > best_score[r]:  # strictly better (min_delta = 0)
                best_score[r], best_epoch[r], wait[r] = scores[row], epoch, 0
                best[r] = params[row]
            else:
                wait[r] += 1
            if wait[r] >= config.patience or step >= config.max_steps:
                stopped_epoch[r], stopped_step[r] = epoch, step
            else:
                keep.append(row)
        if len(keep) < len(active):
            rows = torch.as_tensor(keep, dtype=torch.long)
            params, m, v = (t_.index_select(0, rows).contiguous() for t_ in (params, m, v))
            active = active[keep]
    return ProbeResult(best[..., :dim].contiguous(), best[..., dim].contiguous(), best_score, best_epoch,
                       stopped_epoch, stopped_step, num_classes, history)


def _padded_width(columns: int) -> int:
    """Row length rounded up to 16 floats: every gathered row then starts on a 64-byte cache line,
    which made the step's gather and matrix products ~10 % faster here."""
    return -(-columns // 16) * 16


def _with_bias_column(x: torch.Tensor, width: int) -> torch.Tensor:
    """``(N, D)`` -> ``(N, width)``: the embeddings, a column of ones (the bias input), then zeros.

    The bias rides along as an input column because AdamW treats weight and bias alike (same lr
    and weight decay): one ``(A, C, width)`` tensor then holds both, halving the small per-step ops.
    The zero columns change nothing: their weights start at 0, get gradient 0, and AdamW keeps
    them exactly 0 (decay of 0, update 0 / (0 + eps))."""
    padded = torch.zeros(len(x), width)
    padded[:, :x.shape[1]] = x
    padded[:, x.shape[1]] = 1.0
    return padded


class _StepBuffers:
    """Flat tensors reused by every step. A fresh ~4 MB gather per step cost ~15 % of the step
    (allocation and first-touch page faults); views of the right size are handed out instead."""

    def __init__(self, **numels: int):
        self._flat = {name: torch.empty(numel) for name, numel in numels.items()}

    def take(self, name: str, *shape: int) -> torch.Tensor:
        return self._flat[name][:math.prod(shape)].view(shape)


def _adamw_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: int, lr: float,
            beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW step in place, the arithmetic of ``torch.optim.AdamW`` (single-tensor path)."""
    p.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    step_size = lr / (1 - beta1 ** t)
    denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
    p.addcdiv_(m, denom, value=-step_size)


def _spread(scores: np.ndarray, active: np.ndarray, runs: int) -> np.ndarray:
    full = np.full(runs, np.nan)
    full[active] = scores
    return full


def train_probe_reference(train_x, train_y, val_x, val_y, num_classes: int, config: ProbeConfig = ProbeConfig(),
                          run: int = 0) -> tuple[torch.nn.Linear, float, int]:
    """The straightforward loop for one run (seed ``config.seed + run``): ``nn.Linear``,
    autograd, ``torch.optim.AdamW`` and ``ConstantLR``, validation and early stopping after
    every epoch. It defines what :func:`train_linear_probes` computes per run and is the
    baseline of ``benchmarks/eva_probe.py``.

    Returns ``(best head, best validation balanced accuracy, best epoch)``."""
    x, y, vx, vy = _check_inputs(train_x, train_y, val_x, val_y, num_classes)
    binary = num_classes == 2
    out = 1 if binary else num_classes
    gen = torch.Generator().manual_seed(config.seed + run)
    head = torch.nn.Linear(x.shape[1], out)
    with torch.no_grad():
        w0, b0 = _init_linear(x.shape[1], out, gen)
        head.weight.copy_(w0)
        head.bias.copy_(b0)
    opt = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                            betas=config.betas, eps=config.eps, foreach=False)
    sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=config.warmup_factor, total_iters=config.warmup_epochs)
    best_state, best_score, best_epoch, wait = None, -math.inf, 0, 0
    step = epoch = 0
    while step < config.max_steps:
        perm = torch.randperm(len(x), generator=gen)
        for k in range(0, len(x), config.batch_size):
            if step >= config.max_steps:
                break
            idx = perm[k:k + config.batch_size]
            logits = head(x[idx])
            loss = (F.binary_cross_entropy_with_logits(logits[:, 0], y[idx].float()) if binary
                    else F.cross_entropy(logits, y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        sched.step()
        epoch += 1
        with torch.no_grad():
            preds = predictions_from_logits(head(vx))
        score = float(balanced_accuracy_batched(vy, preds[None], num_classes)[0])
        if score > best_score:
            best_score, best_epoch, wait = score, epoch, 0
            best_state = {k: v.clone() for k, v in head.state_dict().items()}
        else:
            wait += 1
            if wait >= config.patience:
                break
    head.load_state_dict(best_state)
    return head, best_score, best_epoch
