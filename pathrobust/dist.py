"""Who does which share of the work: torchrun ranks, job-array shards, or one process.

pathrobust scales out on two launchers and no pool of its own:

* ``torchrun --nproc_per_node N [--nnodes M ...] -m pathrobust ...``: the ranks of one
  launch form a process group (nccl on GPU, gloo on CPU) and can wait for each other.
* ``--shard i/n`` (``--shard slurm`` reads ``SLURM_ARRAY_TASK_ID`` / ``SLURM_ARRAY_TASK_COUNT``):
  independent processes of a job array that never talk; each writes its share and a marker,
  and the last one (or ``pathrobust merge``) completes the work.

:class:`Team` says which of these this process is (``rank``/``size`` of the share it takes),
and the collective helpers below are no-ops in a single process, so code written for N
ranks runs unchanged in one. The generic torch.distributed helpers (all-reduce, gather of
rows of different counts, barrier, joining the torchrun group) live here; distillation's
own (DDP wrapping, a differentiable all-gather, the logged loss mean) in
:mod:`pathrobust.distill.dist`.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from pathrobust.errors import UserError

#: how long a rank waits in a collective (rank 0 may evaluate for hours while the others wait)
CONTROL_TIMEOUT = datetime.timedelta(days=7)


# -- torch.distributed helpers (no-ops in one process) -------------------------------------------
def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def launched_by_torchrun() -> bool:
    """True in a process started by torchrun with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


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


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_distributed():
        dist.barrier()


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


def local_device(device: str = "auto") -> str:
    """The device of this rank: ``cuda:LOCAL_RANK`` under torchrun on a GPU machine when
    ``device`` is ``auto`` or ``cuda``, else ``device`` as given."""
    if launched_by_torchrun() and str(device) in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return str(device)


def init_distributed(device: str = "auto", timeout: datetime.timedelta | None = None) -> bool:
    """Join the torchrun process group when launched by torchrun (``WORLD_SIZE`` > 1):
    nccl on GPU, gloo on CPU. Returns whether this call created the group."""
    if not launched_by_torchrun() or is_distributed():
        return False
    use_cuda = torch.cuda.is_available() and str(device) != "cpu"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    kwargs = {"timeout": timeout} if timeout is not None else {}
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", **kwargs)
    return True


def destroy() -> None:
    if is_distributed():
        dist.destroy_process_group()


# -- shards of a job array -------------------------------------------------------------------------
_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(value: str | None, environ: dict[str, str] | None = None) -> tuple[int, int] | None:
    """``--shard i/n`` -> ``(i, n)`` (0 <= i < n); ``slurm`` reads the job array's
    ``SLURM_ARRAY_TASK_ID`` (minus ``SLURM_ARRAY_TASK_MIN``, so ``--array=1-4`` works) and
    ``SLURM_ARRAY_TASK_COUNT``; None stays None."""
    if value is None or value == "":
        return None
    env = os.environ if environ is None else environ
    if value.strip().lower() == "slurm":
        task, count = env.get("SLURM_ARRAY_TASK_ID"), env.get("SLURM_ARRAY_TASK_COUNT")
        if task is None or count is None:
            raise UserError("--shard slurm: SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT are not set "
                            "(not a job-array task); give --shard i/n")
        try:
            i, n = int(task) - int(env.get("SLURM_ARRAY_TASK_MIN", "0")), int(count)
        except ValueError:
            raise UserError(f"--shard slurm: SLURM_ARRAY_TASK_ID={task!r}, SLURM_ARRAY_TASK_COUNT={count!r} "
                            "are not integers") from None
        where = f"--shard slurm (SLURM_ARRAY_TASK_ID={task}, SLURM_ARRAY_TASK_COUNT={count})"
    else:
        m = _SHARD.match(value)
        if not m:
            raise UserError(f"--shard {value}: expected i/n (e.g. 0/4: the first of 4 shards) or 'slurm'")
        i, n = int(m.group(1)), int(m.group(2))
        where = f"--shard {value}"
    if n < 1 or not 0 <= i < n:
        raise UserError(f"{where}: shard {i} of {n} does not exist; shards are numbered 0..n-1")
    return i, n


# -- the team ----------------------------------------------------------------------------------------
@dataclass
class Team:
    """This process's place in a launch: ``index`` of ``size`` shares.

    ``kind`` is ``single`` (one process), ``torchrun`` (ranks that can wait for each other:
    :meth:`barrier`, :meth:`broadcast`) or ``shard`` (a job-array task: no communication)."""

    kind: str = "single"
    index: int = 0
    size: int = 1
    local_rank: int = 0
    _created_group: bool = field(default=False, repr=False)
    _control: Any = field(default=None, repr=False)
    handlers: dict[str, Callable[..., Any]] = field(default_factory=dict, repr=False)
    _inside: bool = field(default=False, repr=False)
    _stopped: bool = field(default=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @property
    def lead(self) -> bool:
        """This process speaks for itself (messages, progress bars, launch records): any
        process but a torchrun rank other than 0."""
        return self.kind != "torchrun" or self.index == 0

    @property
    def ranks(self) -> bool:
        """Ranks of one torchrun launch (collectives available)."""
        return self.kind == "torchrun" and self.size > 1

    def label(self) -> str:
        """``rank 1/4``, ``shard 2/8`` or ``''`` for one process (log lines)."""
        if self.kind == "torchrun":
            return f"rank {self.index}/{self.size}"
        if self.kind == "shard":
            return f"shard {self.index}/{self.size}"
        return ""

    def barrier(self) -> None:
        if self.ranks:
            dist.barrier(group=self._control)

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank (picklable; rank 0 gets its own back)."""
        if not self.ranks:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self._control)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` (picklable) on rank 0, in rank order; None on the others."""
        if not self.ranks:
            return [obj]
        out = [None] * self.size if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self._control)
        return out

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum of ``values`` over ranks (floats, same length on every rank)."""
        if not self.ranks:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self._control)
        return t.tolist()

    # rank 0 drives, the other ranks serve: sections of work every rank runs together
    def together(self, fn: Callable[..., Any] | str, *args: Any) -> Any:
        """Rank 0: run ``fn(team, *args)`` on every rank at once (the others wait in
        :meth:`serve`) and return rank 0's result. ``fn`` is a module-level function (sent by
        reference; it may keep per-process state between calls) or the name of a handler
        each rank registered in ``handlers`` (a method of an object of its own, such as its
        feature cache). Inside, each rank takes its share and may :meth:`barrier` or
        :meth:`gather`. In one process this is just ``fn(team, *args)``."""
        if not self.ranks:
            return self._resolve(fn)(self, *args)
        if not self.is_main:
            raise RuntimeError("Team.together is called by rank 0; the other ranks serve()")
        self.broadcast(("call", fn, args))
        self._inside = True
        result = self._resolve(fn)(self, *args)
        self._inside = False
        return result

    def serve(self) -> None:
        """Ranks other than 0: run the sections rank 0 sends until it says stop."""
        if not self.ranks or self.is_main:
            return
        while True:
            message = self.broadcast(None)
            if message is None or message[0] == "stop":
                return
            _, fn, args = message
            self._resolve(fn)(self, *args)

    def stop(self) -> None:
        """Rank 0: release the serving ranks (not from inside a section that failed half-way:
        the others are then in the middle of it, and the launcher ends them when rank 0 exits)."""
        if self.ranks and self.is_main and not self._inside and not self._stopped:
            self._stopped = True
            self.broadcast(("stop",))

    def _resolve(self, fn: Callable[..., Any] | str) -> Callable[..., Any]:
        if isinstance(fn, str):
            try:
                return self.handlers[fn]
            except KeyError:
                raise RuntimeError(f"no handler {fn!r} registered on {self.label() or 'this process'}") from None
        return fn

    def close(self) -> None:
        if self._created_group:
            destroy()
            self._created_group = False


def join(shard: str | tuple[int, int] | None = None, device: str = "auto") -> Team:
    """The team of this process: torchrun ranks (joining the process group: nccl on GPU,
    gloo on CPU, plus a gloo group with a long timeout for control messages), one shard of a
    job array, or a single process. ``--shard`` under torchrun is refused (one line)."""
    parsed = parse_shard(shard) if isinstance(shard, str) or shard is None else shard
    if launched_by_torchrun():
        if parsed is not None:
            raise UserError("--shard: not with torchrun (its ranks already share the work); use one or the other")
        created = init_distributed(local_device(device), timeout=CONTROL_TIMEOUT)
        control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT) if dist.get_backend() != "gloo" else None
        return Team("torchrun", rank(), world_size(), int(os.environ.get("LOCAL_RANK", "0")), created, control)
    if parsed is not None:
        return Team("shard", parsed[0], parsed[1])
    return Team()


def share(n_items: int, index: int, size: int) -> range:
    """The contiguous block of ``range(n_items)`` that share ``index`` of ``size`` takes:
    blocks differ by at most one item and follow each other in order (rank 0 first)."""
    start = n_items * index // size
    stop = n_items * (index + 1) // size
    return range(start, stop)
