"""eva's slide-level ABMIL head and training protocol, with all runs trained at once.

What is reproduced (kaiko-ai/eva 0.4.5: ``vision/models/networks/abmil.py``,
``core/models/networks/mlp.py``, ``core/models/modules/head.py``, configs
``offline/classification/camelyon16_small.yaml`` and ``panda_small.yaml``):

* network ``ABMIL(input_size, output_size, projected_input_size=128)``: a bag ``(N, D)`` padded
  with rows of ``-inf`` (eva's ``Pad2DTensor``); a row whose every value is ``-inf`` is padding:
  zero-filled before the projection ``Linear(D, 128)``, its attention logit set to ``-inf``;
  gated attention ``Linear(128, 1)(tanh(Linear(128, 128)(h)) * sigmoid(Linear(128, 128)(h)))``,
  softmax over the instances, attention-weighted sum of the projected instances, classifier
  MLP ``Linear(128, 128) -> ReLU -> Linear(128, 64) -> ReLU -> Linear(64, out)``; all dropouts 0;
  torch's default ``nn.Linear`` initialisation, drawn in eva's module order;
* ``out = 1`` + ``BCEWithLogitsLoss`` for binary tasks, ``out = C`` + ``CrossEntropyLoss``
  otherwise; ``torch.optim.AdamW(lr=1e-3, betas=(0.9, 0.999), eps=1e-8)`` with torch's default
  ``weight_decay=0.01``; ``HeadModule``'s default ``ConstantLR`` (factor 1/3, 5 epochs)
  stepped once per epoch;
* 32 bags per batch, reshuffled every epoch, last batch kept; at most 100 epochs; validation
  after every epoch; Lightning's ``EarlyStopping(patience=20, min_delta=0, mode="max")`` on the
  validation balanced accuracy (binary at threshold 0.5, i.e. logit > 0; macro mean recall for
  multiclass) and ``ModelCheckpoint(save_top_k=1)``: only a strict improvement counts, the
  first epoch reaching the maximum is the checkpoint evaluated on test; 20 runs.

Runs and seeds: one seeded stream (``torch.Generator().manual_seed(seed)``) draws one seed per
run; run ``r``'s generator then draws its initialisation and every epoch's order. (eva runs
its 20 runs one after the other from Lightning's global generator; the run-by-run streams
make run ``r`` independent of how long the others trained, which batching needs.)

Batching: the ``R`` runs share stacked weights (each layer one ``(R, out, in)`` block of a single
buffer) and advance in lockstep through ``bmm``/``baddbmm`` over a run dimension; autograd gives
every run its own gradient (the loss is the sum of the runs' mean losses) and AdamW is applied
elementwise as ``torch.optim.AdamW``'s single-tensor path does. A run that stops early leaves
the stacked tensors. When the training set fits in one batch every run sees the same bags
each epoch (in its own order) and the projection runs as one shared product. Each run is the
computation of :func:`train_abmil_reference` — ``nn.Module``, autograd, ``torch.optim.AdamW``,
one run at a time — up to float rounding (tests: 1e-6).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pathrobust.metrics.classification import balanced_accuracy_batched, predictions_from_logits

PAD_VALUE = float("-inf")


@dataclass(frozen=True)
class ABMILConfig:
    """Protocol parameters (values: ``suites/slides.toml``; defaults = eva's)."""

    projected_size: int = 128
    attention_hidden: int = 128
    mlp_hidden: tuple[int, ...] = (128, 64)
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_epochs: int = 5
    warmup_factor: float = 1.0 / 3.0
    batch_size: int = 32
    max_epochs: int = 100
    patience: int = 20
    n_runs: int = 20
    seed: int = 42
    # bound on the gathered training batch of all runs together; beyond it the runs are
    # stepped in groups (same numbers, more kernel calls)
    max_batch_bytes: int = 512 * 2**20

    def lr_at_epoch(self, epoch: int) -> float:
        """ConstantLR: ``lr * factor`` for epochs ``0 .. warmup_epochs - 1``, then ``lr``."""
        return self.lr * (self.warmup_factor if epoch < self.warmup_epochs else 1.0)

    def layer_shapes(self, input_size: int, output_size: int) -> list[tuple[int, int]]:
        """``(out, in)`` of every ``nn.Linear`` in eva's module order: projector, attention a, b, c,
        then the classifier MLP."""
        p, h = self.projected_size, self.attention_hidden
        sizes = [p, *self.mlp_hidden, output_size]
        return [(p, input_size), (h, p), (h, p), (1, h)] + [(sizes[i + 1], sizes[i]) for i in range(len(sizes) - 1)]


class ABMIL(nn.Module):
    """eva's ``ABMIL`` network (dropouts 0, so none are kept): ``(B, N, D)`` -> ``(B, out)``."""

    def __init__(self, input_size: int, output_size: int, config: ABMILConfig = ABMILConfig()) -> None:
        super().__init__()
        p, h = config.projected_size, config.attention_hidden
        self.projector = nn.Linear(input_size, p)
        self.attention_a = nn.Linear(p, h)
        self.attention_b = nn.Linear(p, h)
        self.attention_c = nn.Linear(h, 1)
        sizes = [p, *config.mlp_hidden]
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], output_size))
        self.classifier = nn.Sequential(*layers)

    def linears(self) -> list[nn.Linear]:
        return [m for m in self.modules() if isinstance(m, nn.Linear)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = (x == PAD_VALUE).all(dim=-1, keepdim=True)  # (B, N, 1): padding rows
        x = x.masked_fill(mask, 0)
        h = self.projector(x)
        logits = self.attention_c(torch.tanh(self.attention_a(h)) * torch.sigmoid(self.attention_b(h)))
        weights = torch.softmax(logits.masked_fill(mask, float("-inf")), dim=1)  # (B, N, 1)
        pooled = torch.matmul(weights.transpose(1, 2), h).squeeze(1)  # (B, p)
        return self.classifier(pooled)


def draw_init(generator: torch.Generator, shapes: Sequence[tuple[int, int]], dtype=torch.float32) -> list[torch.Tensor]:
    """``nn.Linear.reset_parameters`` for each shape in turn, from ``generator``: weight by
    ``kaiming_uniform_(a=sqrt(5))``, bias ``U(-1/sqrt(in), 1/sqrt(in))``. Returns
    ``[w0, b0, w1, b1, ...]``."""
    out = []
    for fan_out, fan_in in shapes:
        w = torch.empty(fan_out, fan_in)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        b = torch.empty(fan_out).uniform_(-bound, bound, generator=generator)
        out += [w.to(dtype), b.to(dtype)]
    return out


def run_generators(seed: int, n_runs: int) -> list[torch.Generator]:
    """One generator per run, seeded from one stream started at ``seed``."""
    master = torch.Generator().manual_seed(int(seed))
    seeds = torch.randint(0, 2**62, (n_runs,), generator=master, dtype=torch.int64).tolist()
    return [torch.Generator().manual_seed(s) for s in seeds]


def _as_padded(bags, dtype) -> torch.Tensor:
    """Bags (a padded ``(B, P, D)`` array, or a list of ``(N_i, D)`` arrays) -> ``(B, P, D)`` tensor."""
    if isinstance(bags, (np.ndarray, torch.Tensor)) and np.ndim(bags) == 3:
        return torch.as_tensor(np.asarray(bags) if isinstance(bags, np.ndarray) else bags).to(dtype).contiguous()
    from pathrobust.data.bags import pad_bags

    return torch.from_numpy(pad_bags(list(bags))).to(dtype)


def _split_padding(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, P, D)`` with ``-inf`` padding rows -> (zero-filled copy, bool padding mask ``(B, P)``)."""
    mask = (x == PAD_VALUE).all(dim=-1)
    return x.masked_fill(mask[..., None], 0).contiguous(), mask


def _check(train_x, train_y, val_x, val_y, num_classes: int):
    if train_x.ndim != 3 or val_x.ndim != 3 or train_x.shape[2] != val_x.shape[2]:
        raise ValueError(f"bags must be (B, P, D) with one D; got {tuple(train_x.shape)} and {tuple(val_x.shape)}")
    if len(train_x) != len(train_y) or len(val_x) != len(val_y):
        raise ValueError("bags and labels differ in length")
    if len(train_x) == 0 or len(val_x) == 0:
        raise ValueError("empty train or validation split")
    if num_classes < 2:
        raise ValueError("num_classes must be >= 2")
    for y in (train_y, val_y):
        if int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes})")


class _Layout:
    """Where each layer lives in a run's flat parameter vector. The attention ``a`` and ``b``
    layers sit next to each other (one ``(2h, p)`` product computes both), each weight is
    followed by nothing but the next tensor; views are ``(R, out, in)`` and ``(R, out)``."""

    def __init__(self, shapes: list[tuple[int, int]]) -> None:
        self.shapes = shapes
        self.n_mlp = len(shapes) - 4
        (p, d), (h, _), _, _ = shapes[:4]
        # flat order: Wp, bp, [Wa; Wb], [ba; bb], Wc, bc, then the MLP's (W, b) pairs
        blocks = [("wp", (p, d)), ("bp", (p,)), ("wab", (2 * h, p)), ("bab", (2 * h,)), ("wc", (1, h)), ("bc", (1,))]
        for i, (o, n) in enumerate(shapes[4:]):
            blocks += [(f"w{i}", (o, n)), (f"b{i}", (o,))]
        self.blocks, offset = {}, 0
        for name, shape in blocks:
            self.blocks[name] = (offset, shape)
            offset += math.prod(shape)
        self.size = offset
        self.h = h

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        runs = flat.shape[0]
        return {name: flat[:, o:o + math.prod(s)].view(runs, *s) for name, (o, s) in self.blocks.items()}

    def pack(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """eva-order ``[Wp, bp, Wa, ba, Wb, bb, Wc, bc, W0, b0, ...]`` -> one flat vector."""
        wp, bp, wa, ba, wb, bb, wc, bc, *mlp = tensors
        parts = [wp, bp, torch.cat([wa, wb]), torch.cat([ba, bb]), wc, bc, *mlp]
        return torch.cat([t.reshape(-1) for t in parts])

    def unpack(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """One run's flat vector -> eva-order tensors (the inverse of :meth:`pack`)."""
        v = self.views(flat[None])
        h = self.h
        out = [v["wp"][0], v["bp"][0], v["wab"][0, :h], v["bab"][0, :h], v["wab"][0, h:], v["bab"][0, h:],
               v["wc"][0], v["bc"][0]]
        for i in range(self.n_mlp):
            out += [v[f"w{i}"][0], v[f"b{i}"][0]]
        return [t.clone() for t in out]


def _forward(v: dict[str, torch.Tensor], n_mlp: int, x: torch.Tensor, mask: torch.Tensor, shared: bool) -> torch.Tensor:
    """Every run's outputs.

    ``shared``: ``x`` ``(B, P, D)`` and ``mask`` ``(B, P)`` are the same bags for all runs;
    otherwise ``x`` ``(A, B, P, D)`` and ``mask`` ``(A, B, P)`` hold each run's own bags.
    Returns ``(A, B, out)``."""
    wp, bp = v["wp"], v["bp"]
    runs, proj, dim = wp.shape
    if shared:
        bags, inst = x.shape[:2]
        # one (B*P, D) @ (D, A*p) product for all runs, instead of A copies of x
        h = (x.reshape(bags * inst, dim) @ wp.reshape(runs * proj, dim).T).view(bags * inst, runs, proj)
        h = h.transpose(0, 1).contiguous().add_(bp[:, None, :])  # (A, B*P, p)
        mask = mask.expand(runs, bags, inst)
    else:
        bags, inst = x.shape[1:3]
        h = torch.baddbmm(bp[:, None, :], x.view(runs, bags * inst, dim), wp.transpose(1, 2))
    ab = torch.baddbmm(v["bab"][:, None, :], h, v["wab"].transpose(1, 2))  # (A, B*P, 2h)
    hid = ab.shape[-1] // 2
    gated = torch.tanh(ab[..., :hid]) * torch.sigmoid(ab[..., hid:])
    logits = torch.baddbmm(v["bc"][:, None, :], gated, v["wc"].transpose(1, 2)).view(runs, bags, inst)
    weights = torch.softmax(logits.masked_fill(mask, float("-inf")), dim=-1)  # (A, B, P)
    pooled = torch.bmm(weights.reshape(runs * bags, 1, inst), h.reshape(runs * bags, inst, proj)).view(runs, bags, proj)
    z = pooled
    for i in range(n_mlp):
        z = torch.baddbmm(v[f"b{i}"][:, None, :], z, v[f"w{i}"].transpose(1, 2))
        if i < n_mlp - 1:
            z = torch.relu(z)
    return z


def _loss(out: torch.Tensor, y: torch.Tensor, binary: bool) -> torch.Tensor:
    """Sum over runs of each run's mean loss; ``out`` ``(A, B, C)``, ``y`` ``(A, B)``."""
    if binary:
        per = F.binary_cross_entropy_with_logits(out[..., 0], y.to(out.dtype), reduction="none")
    else:
        per = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="none").view(y.shape)
    return per.mean(dim=1).sum()


def _adamw_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: int, lr: float,
            beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW step in place, the arithmetic of ``torch.optim.AdamW`` (single-tensor path)."""
    p.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    step_size = lr / (1 - beta1 ** t)
    denom = (v.sqrt() / (1 - beta2 ** t) ** 0.5).add_(eps)
    p.addcdiv_(m, denom, value=-step_size)


@dataclass
class ABMILRuns:
    """``R`` trained ABMIL heads (each run's best checkpoint).

    ``params`` ``(R, P)`` flat weights; ``val_balanced_accuracy`` ``(R,)``; ``best_epoch``
    (1-based epoch of the checkpoint) and ``epochs`` (how long each run trained) ``(R,)``;
    ``history``: per epoch the validation score of every run (NaN once stopped)."""

    params: torch.Tensor
    input_size: int
    num_classes: int
    config: ABMILConfig
    val_balanced_accuracy: np.ndarray
    best_epoch: np.ndarray
    epochs: np.ndarray
    history: list[np.ndarray] = field(default_factory=list)

    @property
    def binary(self) -> bool:
        return self.num_classes == 2

    def _layout(self) -> _Layout:
        return _Layout(self.config.layer_shapes(self.input_size, 1 if self.binary else self.num_classes))

    def logits(self, bags, chunk_bytes: int = 256 * 2**20) -> torch.Tensor:
        """Every run's outputs on ``bags`` (padded ``(B, P, D)`` or a list of ``(N_i, D)``):
        ``(R, B, out)`` (``out`` = 1 for binary tasks)."""
        x, mask = _split_padding(_as_padded(bags, self.params.dtype))
        layout = self._layout()
        return _shared_logits(layout.views(self.params), layout, x, mask, chunk_bytes)

    def probabilities(self, bags) -> np.ndarray:
        """``(R, B)`` positive-class probabilities (binary) or ``(R, B, C)`` softmax."""
        z = self.logits(bags).double()
        return (torch.sigmoid(z[..., 0]) if self.binary else torch.softmax(z, dim=-1)).numpy()

    def module(self, run: int) -> ABMIL:
        """Run ``run``'s checkpoint as eva's ``nn.Module``."""
        net = ABMIL(self.input_size, 1 if self.binary else self.num_classes, self.config).to(self.params.dtype)
        tensors = self._layout().unpack(self.params[run])
        with torch.no_grad():
            for k, lin in enumerate(net.linears()):
                lin.weight.copy_(tensors[2 * k])
                lin.bias.copy_(tensors[2 * k + 1])
        return net


def _shared_logits(views: dict[str, torch.Tensor], layout: _Layout, x: torch.Tensor, mask: torch.Tensor,
                   chunk_bytes: int = 256 * 2**20) -> torch.Tensor:
    """Every run's outputs ``(R, B, out)`` on the same bags, in chunks of bags bounding memory."""
    runs = views["wp"].shape[0]
    inst = x.shape[1]
    per_bag = runs * inst * (layout.h * 3 + 4) * x.element_size()  # h, the gated pair and logits
    chunk = max(1, chunk_bytes // max(per_bag, 1))
    with torch.no_grad():
        return torch.cat([_forward(views, layout.n_mlp, x[i:i + chunk], mask[i:i + chunk], shared=True)
                          for i in range(0, len(x), chunk)], dim=1)


class _RunBlocks:
    """Training state of ``runs`` runs in one 1-D buffer, layer-major: layer ``k`` of every run
    is one contiguous ``(runs, out, in)`` block (the batched products read it without copies;
    AdamW updates the whole buffer at once). Converts to and from per-run rows ``(runs, P)``."""

    def __init__(self, layout: _Layout, runs: int) -> None:
        self.layout, self.runs = layout, runs

    def views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        r = self.runs
        return {name: buf[r * o:r * (o + math.prod(s))].view(r, *s) for name, (o, s) in self.layout.blocks.items()}

    def from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        buf = torch.empty(rows.numel(), dtype=rows.dtype)
        for name, view in self.views(buf).items():
            o, s = self.layout.blocks[name]
            view.copy_(rows[:, o:o + math.prod(s)].view(self.runs, *s))
        return buf

    def to_rows(self, buf: torch.Tensor) -> torch.Tensor:
        rows = torch.empty(self.runs, self.layout.size, dtype=buf.dtype)
        for name, view in self.views(buf).items():
            o, s = self.layout.blocks[name]
            rows[:, o:o + math.prod(s)] = view.reshape(self.runs, -1)
        return rows


def train_abmil_runs(train_bags, train_y, val_bags, val_y, num_classes: int, config: ABMILConfig = ABMILConfig(),
                     *, dtype: torch.dtype = torch.float32,
                     progress: Callable[[int], None] | None = None) -> ABMILRuns:
    """Train ``config.n_runs`` ABMIL heads at once (see the module docstring).

    Args:
        train_bags, val_bags: padded ``(B, P, D)`` arrays (``-inf`` rows = padding) or lists of
            ``(N_i, D)`` arrays.
        train_y, val_y: ``(B,)`` int labels in ``[0, C)``.
        num_classes: ``C``; ``2`` trains eva's one-logit binary head.
        config: protocol parameters.
        dtype: float32 (eva's) or float64 (exactness checks).
        progress: called with 1 after every epoch.

    Returns:
        :class:`ABMILRuns` holding each run's best checkpoint.
    """
    x, vx = _as_padded(train_bags, dtype), _as_padded(val_bags, dtype)
    y = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
    vy = torch.as_tensor(np.asarray(val_y), dtype=torch.long)
    _check(x, y, vx, vy, num_classes)
    x, mask = _split_padding(x)
    vx, vmask = _split_padding(vx)
    binary = num_classes == 2
    n, inst, dim = x.shape
    layout = _Layout(config.layer_shapes(dim, 1 if binary else num_classes))
    runs = config.n_runs
    generators = run_generators(config.seed, runs)
    rows = torch.stack([layout.pack(draw_init(g, layout.shapes, dtype)) for g in generators])
    blocks = _RunBlocks(layout, runs)
    params = blocks.from_rows(rows)
    m, v, grad = torch.zeros_like(params), torch.zeros_like(params), torch.zeros_like(params)
    best = rows.clone()  # each run's checkpoint, as per-run rows
    best_score = np.full(runs, -np.inf)
    best_epoch = np.zeros(runs, dtype=np.int64)
    stopped = np.zeros(runs, dtype=np.int64)
    wait = np.zeros(runs, dtype=np.int64)
    active = np.arange(runs)
    history: list[np.ndarray] = []
    bsz = min(config.batch_size, n)
    full_batch = bsz == n  # every run's batch is the whole training set: share the projection
    group = max(1, config.max_batch_bytes // max(1, bsz * inst * dim * x.element_size()))
    gather = torch.empty(min(group, runs) * bsz * inst * dim, dtype=dtype)
    beta1, beta2 = config.betas
    step = 0
    for epoch in range(config.max_epochs):
        lr = config.lr_at_epoch(epoch)
        perms = torch.stack([torch.randperm(n, generator=generators[r]) for r in active])
        views, grad_views = blocks.views(params), blocks.views(grad)
        for k in range(0, n, bsz):
            step += 1
            idx = perms[:, k:k + bsz]  # (A, b): every run's own batch
            span = len(active) if full_batch else group  # runs per forward/backward
            for g0 in range(0, len(active), span):
                g1 = min(g0 + span, len(active))
                # leaves sharing the buffer's storage: their gradients come back per layer
                leaves = {name: t[g0:g1].detach().requires_grad_(True) for name, t in views.items()}
                if full_batch:
                    out = _forward(leaves, layout.n_mlp, x, mask, shared=True)
                    yb = y[None].expand(g1 - g0, n)
                else:
                    rows_b = idx[g0:g1]
                    a, b = rows_b.shape
                    xb = torch.index_select(x, 0, rows_b.reshape(-1), out=gather[:a * b * inst * dim].view(a * b, inst, dim))
                    out = _forward(leaves, layout.n_mlp, xb.view(a, b, inst, dim), mask[rows_b], shared=False)
                    yb = y[rows_b]
                _loss(out, yb, binary).backward()
                for name, leaf in leaves.items():
                    grad_views[name][g0:g1].copy_(leaf.grad)
            with torch.no_grad():
                _adamw_(params, grad, m, v, step, lr, beta1, beta2, config.eps, config.weight_decay)
        # validation of every live run, then early stopping / checkpoint bookkeeping per run
        logits = _shared_logits(views, layout, vx, vmask)
        scores = balanced_accuracy_batched(vy, predictions_from_logits(logits), num_classes).numpy()
        full = np.full(runs, np.nan)
        full[active] = scores
        history.append(full)
        keep, improved = [], []
        for row, r in enumerate(active):
            if scores[row] > best_score[r]:  # strictly better (min_delta = 0)
                best_score[r], best_epoch[r], wait[r] = scores[row], epoch + 1, 0
                improved.append(row)
            else:
                wait[r] += 1
            if wait[r] >= config.patience or epoch + 1 >= config.max_epochs:
                stopped[r] = epoch + 1
            else:
                keep.append(row)
        if improved:
            current = blocks.to_rows(params)
            best[active[improved]] = current[improved]
        if progress is not None:
            progress(1)
        if len(keep) < len(active):
            kept = torch.as_tensor(keep, dtype=torch.long)
            shrunk = _RunBlocks(layout, len(keep))
            params, m, v = (shrunk.from_rows(blocks.to_rows(t).index_select(0, kept)) for t in (params, m, v))
            grad = torch.zeros_like(params)
            blocks, active = shrunk, active[keep]
            gather = gather[:min(group, len(keep)) * bsz * inst * dim]
        if not len(active):
            break
    return ABMILRuns(best, dim, num_classes, config, best_score, best_epoch, stopped, history)


def train_abmil_reference(train_bags, train_y, val_bags, val_y, num_classes: int,
                          config: ABMILConfig = ABMILConfig(), run: int = 0,
                          dtype: torch.dtype = torch.float32) -> tuple[ABMIL, float, int, int]:
    """The straightforward loop for run ``run``: eva's :class:`ABMIL` module, autograd,
    ``torch.optim.AdamW`` and ``ConstantLR``, batches of padded bags, validation and early
    stopping after every epoch. It defines what :func:`train_abmil_runs` computes per run and
    is the baseline of ``benchmarks/mil_runs.py``.

    Returns ``(best module, best validation balanced accuracy, best epoch, epochs trained)``."""
    x, vx = _as_padded(train_bags, dtype), _as_padded(val_bags, dtype)
    y = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
    vy = torch.as_tensor(np.asarray(val_y), dtype=torch.long)
    _check(x, y, vx, vy, num_classes)
    binary = num_classes == 2
    out = 1 if binary else num_classes
    gen = run_generators(config.seed, config.n_runs)[run]
    net = ABMIL(x.shape[2], out, config).to(dtype)
    with torch.no_grad():
        tensors = draw_init(gen, config.layer_shapes(x.shape[2], out), dtype)
        for k, lin in enumerate(net.linears()):
            lin.weight.copy_(tensors[2 * k])
            lin.bias.copy_(tensors[2 * k + 1])
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, betas=config.betas, eps=config.eps,
                            weight_decay=config.weight_decay, foreach=False)
    sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=config.warmup_factor, total_iters=config.warmup_epochs)
    best_state, best_score, best_epoch, wait, epoch = None, -math.inf, 0, 0, 0
    for epoch in range(1, config.max_epochs + 1):
        perm = torch.randperm(len(x), generator=gen)
        for k in range(0, len(x), config.batch_size):
            idx = perm[k:k + config.batch_size]
            logits = net(x[idx])
            loss = (F.binary_cross_entropy_with_logits(logits[:, 0], y[idx].to(dtype)) if binary
                    else F.cross_entropy(logits, y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        with torch.no_grad():
            val_logits = torch.cat([net(vx[k:k + config.batch_size]) for k in range(0, len(vx), config.batch_size)])
        score = float(balanced_accuracy_batched(vy, predictions_from_logits(val_logits)[None], num_classes)[0])
        if score > best_score:
            best_score, best_epoch, wait = score, epoch, 0
            best_state = {k: t.clone() for k, t in net.state_dict().items()}
        else:
            wait += 1
            if wait >= config.patience:
                break
    net.load_state_dict(best_state)
    return net, best_score, best_epoch, epoch
