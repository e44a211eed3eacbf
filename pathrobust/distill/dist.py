"""torch.distributed helpers that are no-ops in a single process.

Every reduction the losses need goes through here, so a 1-process run and an N-process
run with the same global batch compute the same numbers. Also: joining the torchrun process
group, DDP wrapping, gathering rows of different counts, the logged mean over ranks."""

from __future__ import annotations

import os

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


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_distributed():
        dist.barrier()


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` in DistributedDataParallel when there are several ranks, else itself."""
    if world_size() <= 1:
        return module
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None)


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """All-gather rows of different counts (no gradient) -> concatenated in rank order."""
    if not is_distributed():
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(counts, n)
    m = int(max(c.item() for c in counts))
    padded = torch.zeros(m, *x.shape[1:], device=x.device, dtype=x.dtype)
    padded[: x.shape[0]] = x
    out = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(c.item())] for o, c in zip(out, counts)])


def mean_over_ranks(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """Loss terms for the log: each rank's value is its shard's share, so the mean over
    ranks is the loss of the global batch (what a 1-process run reports)."""
    values = torch.stack([v.detach().float().reshape(()) for v in terms.values()])
    values = all_reduce_sum(values) / world_size()
    return dict(zip(terms, values.tolist()))


def init_distributed(device: str = "auto") -> bool:
    """Join the torchrun process group when launched by torchrun (``WORLD_SIZE`` > 1):
    nccl on GPU, gloo on CPU. Returns whether this call created the group."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return False
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


def destroy() -> None:
    dist.destroy_process_group()
