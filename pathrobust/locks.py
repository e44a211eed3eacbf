"""Lock files: one process at a time per run directory or per output file.

A lock is a file created exclusively (``O_CREAT | O_EXCL``) holding the owner's host and
pid. Another process that finds it checks the owner: alive on this host -> the lock is held
(:class:`LockHeld`); dead (or older than ``stale_after`` seconds when the owner is on
another host, whose pids we cannot check) -> the lock is stale and taken over. Taking over
is itself exclusive (rename of a fresh lock file over the stale one, then re-read), so two
processes never both believe they own it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from pathrobust.errors import UserError

STALE_AFTER_S = 24 * 3600.0


class LockHeld(UserError):
    """The lock belongs to a live process."""

    def __init__(self, path: Path, owner: dict) -> None:
        super().__init__(f"another process is running this (pid {owner.get('pid')} on {owner.get('host')}): "
                         f"{path.parent}; wait for it or stop it")
        self.owner = owner


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_stale(owner: dict | None, stale_after: float = STALE_AFTER_S) -> bool:
    if owner is None:
        return True  # torn or unreadable: its writer died mid-write
    if owner.get("host") == socket.gethostname():
        return not _alive(int(owner.get("pid", -1)))
    return time.time() - float(owner.get("time", 0)) > stale_after


def try_acquire(path: str | os.PathLike, stale_after: float = STALE_AFTER_S) -> bool:
    """Take the lock at ``path``; False when a live process holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = _me()
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        if not is_stale(_read(path), stale_after):
            return False
        # take over: write our own lock beside it and rename it over the stale one
        fresh = path.with_name(f"{path.name}.{me['pid']}.new")
        fresh.write_text(json.dumps(me))
        os.replace(fresh, path)
        time.sleep(0.01)  # a competing take-over lands within this window; the last rename wins
        return _read(path) == me
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(me))
    return True


def release(path: str | os.PathLike) -> None:
    path = Path(path)
    owner = _read(path)
    if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def held(path: str | os.PathLike, stale_after: float = STALE_AFTER_S) -> Iterator[Path]:
    """Hold the lock at ``path`` for the block, or raise :class:`LockHeld`."""
    path = Path(path)
    if not try_acquire(path, stale_after):
        raise LockHeld(path, _read(path) or {})
    try:
        yield path
    finally:
        release(path)
