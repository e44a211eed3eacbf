"""torch.distributed helpers that are no-ops in a single process.

Every reduction the losses need goes through here, so a 1-process run and an N-process
run with the same global batch compute the same numbers."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over ranks in place (returns ``x``)."""
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Maximum of ``x`` over ranks in place (returns ``x``)."""
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


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
