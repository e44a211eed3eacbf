"""Per-phase timing of a training step, as a hook the trainer calls at phase boundaries.

Training uses :data:`NO_TIMER`, whose calls do nothing: measuring a GPU step means
synchronising the device at every boundary, which a real run must not pay for. A benchmark
installs a :class:`StepTimer` (``distiller.timer = StepTimer()``) and reads
``timer.times`` after each step (``benchmarks/distill_step.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

PHASES = ("teacher", "student", "losses", "optimizer")


@dataclass
class StepTimes:
    """Seconds spent per phase in the last step."""

    teacher: float = 0.0
    student: float = 0.0  # student forward + backward (heads included in autograd)
    losses: float = 0.0  # targets (heads, centring), losses, masks gathering
    optimizer: float = 0.0


class NoTimer:
    """The default hook: every call is a no-op."""

    def start(self, device: torch.device) -> None:
        pass

    def mark(self, phase: str) -> None:
        pass


NO_TIMER = NoTimer()


class StepTimer(NoTimer):
    """Adds the time since the previous boundary to ``phase`` (device synchronised first).

    ``clock``: ``time.perf_counter`` (wall) or ``time.process_time`` (CPU time, robust on a
    shared machine)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.times = StepTimes()
        self._device = torch.device("cpu")
        self._last = 0.0

    def _now(self) -> float:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        return self.clock()

    def start(self, device: torch.device) -> None:
        self._device = device
        self.times = StepTimes()
        self._last = self._now()

    def mark(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown phase '{phase}' (known: {', '.join(PHASES)})")
        now = self._now()
        setattr(self.times, phase, getattr(self.times, phase) + now - self._last)
        self._last = now
