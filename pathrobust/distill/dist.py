"""torch.distributed helpers of distillation (no-ops in a single process).

Every reduction the losses need goes through here, so a 1-process run and an N-process
run with the same global batch compute the same numbers. The generic helpers (all-reduce,
gathering rows of different counts, barrier, joining the torchrun process group) live in
:mod:`pathrobust.dist` and are re-exported here; this module adds DDP wrapping, a
differentiable all-gather and the logged mean over ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from pathrobust.dist import (all_reduce_max, all_reduce_sum, barrier, destroy, gather_rows, init_distributed,
                             is_distributed, rank, world_size)

__all__ = ["all_gather_with_grad", "all_reduce_max", "all_reduce_sum", "barrier", "destroy", "gather_rows",
           "init_distributed", "is_distributed", "mean_over_ranks", "rank", "world_size", "wrap_ddp"]


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.n = x.shape[0]
        out = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every rank computes the same loss of the gathered tensor; summing the gradients
        # of all ranks and DDP's averaging then give exactly the single-process gradient.
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        r = rank()
        return grad[r * ctx.n:(r + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from all ranks in rank order -> (W*B, ...), differentiable.

    Uses all_gather + all_reduce only (gloo has no reduce_scatter)."""
    if not is_distributed() or world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` in DistributedDataParallel when there are several ranks, else itself."""
    if world_size() <= 1:
        return module
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None)


def mean_over_ranks(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """Loss terms for the log: each rank's value is its shard's share, so the mean over
    ranks is the loss of the global batch (what a 1-process run reports)."""
    values = torch.stack([v.detach().float().reshape(()) for v in terms.values()])
    values = all_reduce_sum(values) / world_size()
    return dict(zip(terms, values.tolist()))
