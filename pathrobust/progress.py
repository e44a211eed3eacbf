"""Rich progress bars for long work (tiles/s, pairs/s, steps/s), on stderr.

Disabled with ``enabled=False`` or ``PATHROBUST_NO_PROGRESS=1`` (tests, logs)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_console = Console(stderr=True)


def progress_enabled(enabled: bool = True) -> bool:
    return enabled and os.environ.get("PATHROBUST_NO_PROGRESS", "") in ("", "0")


@contextlib.contextmanager
def tile_progress(description: str, total: int, completed: int = 0, unit: str = "tiles",
                  enabled: bool = True, postfix: Callable[[], str] | None = None,
                  transient: bool = False) -> Iterator[Callable[[int], None]]:
    """Context manager yielding ``advance(n)``; shows ``done/total``, ``<unit>/s`` and ETA.

    ``postfix`` (optional) returns a short string shown after the rate (e.g. loss terms);
    ``transient`` bars disappear when done (one of many, e.g. per slide)."""
    if not progress_enabled(enabled):
        yield lambda n: None
        return
    columns = [
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[extra]}"),
    ]
    with Progress(*columns, console=_console, transient=transient) as bar:
        task = bar.add_task(description, total=total, completed=completed, rate="", extra="")
        started = completed

        def advance(n: int) -> None:
            bar.advance(task, n)
            t = bar.tasks[task]
            elapsed = t.elapsed or 0.0
            rate = (t.completed - started) / elapsed if elapsed > 0 else 0.0
            bar.update(task, rate=f"{rate:,.1f} {unit}/s", extra=postfix() if postfix else "")

        yield advance


@contextlib.contextmanager
def polled_progress(description: str, total: int, poll: Callable[[], int], unit: str = "tiles",
                    enabled: bool = True, interval: float = 0.5, transient: bool = False) -> Iterator[Callable[[], None]]:
    """A bar whose value comes from ``poll()`` (e.g. tiles in the finished chunk files of every
    rank), read by a thread every ``interval`` seconds: rank 0 shows the work of all ranks and
    the total rate. Yields ``refresh()`` to update it at once (e.g. at the end)."""
    import threading

    if not progress_enabled(enabled):
        yield lambda: None
        return
    columns = [
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
    ]
    with Progress(*columns, console=_console, transient=transient) as bar:
        start = poll()
        task = bar.add_task(description, total=total, completed=start, rate="")
        stop = threading.Event()

        def refresh() -> None:
            done = poll()
            t = bar.tasks[task]
            elapsed = t.elapsed or 0.0
            rate = (done - start) / elapsed if elapsed > 0 else 0.0
            bar.update(task, completed=done, rate=f"{rate:,.1f} {unit}/s")

        def loop() -> None:
            while not stop.wait(interval):
                try:
                    refresh()
                except OSError:  # a file vanished between listing and reading: next time
                    pass

        thread = threading.Thread(target=loop, name="pathrobust-progress", daemon=True)
        thread.start()
        try:
            yield refresh
        finally:
            stop.set()
            thread.join(timeout=5)
            refresh()
