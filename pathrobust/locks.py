"""Lock files: one process at a time per run, per output file, per chunk of work.

A lock is a file created exclusively (``O_CREAT | O_EXCL``) holding its owner's host, pid,
process start time and a heartbeat time. Another process that finds it checks the owner:

* on this host: alive (same pid *and* start time, so a reused pid is not mistaken for the
  owner) -> held (:class:`LockHeld`); gone -> stale;
* on another host, whose processes we cannot see: stale once its heartbeat is older than
  ``stale_after`` seconds. Long work keeps its locks fresh with :class:`Heartbeat`.

A stale lock is taken over under a guard file (itself exclusive), re-checking that the lock
still belongs to the owner judged stale, so two processes never both take it over and a
lock freshly taken by someone else is never replaced.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from pathrobust.errors import UserError

STALE_AFTER_S = 24 * 3600.0   # run locks: no heartbeat
ITEM_STALE_AFTER_S = 600.0    # chunk/file locks of long work, refreshed by a Heartbeat
HEARTBEAT_S = 30.0
GUARD_STALE_S = 60.0          # a take-over guard left by a process that died in the middle


class LockHeld(UserError):
    """The lock belongs to a live process."""

    def __init__(self, path: Path, owner: dict) -> None:
        super().__init__(f"another process is running this (pid {owner.get('pid')} on {owner.get('host')}): "
                         f"{path.parent}; wait for it or stop it")
        self.owner = owner


def _start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name in (...) may hold spaces
    except (IndexError, ValueError):
        return None


_ME: dict = {}


def _me() -> dict:
    pid = os.getpid()
    if _ME.get("pid") != pid:  # after a fork, the child is another owner
        _ME.clear()
        _ME.update(host=socket.gethostname(), pid=pid, start=_start_time(pid))
    return {**_ME, "time": time.time()}


def _same_owner(a: dict | None, b: dict | None) -> bool:
    keys = ("host", "pid", "start")
    return a is not None and b is not None and all(a.get(k) == b.get(k) for k in keys)


def _alive(pid: int, start: int | None = None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    if start is not None:
        now = _start_time(pid)
        if now is not None and now != start:
            return False  # the pid was reused by another process
    return True


def _read(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def owner(path: str | os.PathLike) -> dict | None:
    """Who holds the lock at ``path`` (None: no lock file or unreadable)."""
    return _read(Path(path))


def is_stale(owner: dict | None, stale_after: float = STALE_AFTER_S) -> bool:
    if owner is None:
        return True  # torn or unreadable: its writer died mid-write
    if owner.get("host") == socket.gethostname():
        return not _alive(int(owner.get("pid", -1)), owner.get("start"))
    return time.time() - float(owner.get("time", 0)) > stale_after


def _write_exclusive(path: Path, me: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(me))
    return True


def try_acquire(path: str | os.PathLike, stale_after: float = STALE_AFTER_S) -> bool:
    """Take the lock at ``path``; False when a live process holds it (or is taking it over)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = _me()
    if _write_exclusive(path, me):
        return True
    found = _read(path)
    if _same_owner(found, me):
        return True  # ours already (a second claim from the same process)
    if not is_stale(found, stale_after):
        return False
    return _take_over(path, found, me)


def _take_over(path: Path, stale: dict | None, me: dict) -> bool:
    guard = path.with_name(path.name + ".takeover")
    if not _write_exclusive(guard, me):
        if is_stale(_read(guard), GUARD_STALE_S):
            guard.unlink(missing_ok=True)  # its writer died mid take-over; the next try proceeds
        return False
    try:
        current = _read(path)
        if current != stale:  # released, or taken by someone else meanwhile
            return _write_exclusive(path, me) if current is None and not path.exists() else False
        fresh = path.with_name(f".{path.name}.{me['pid']}.new")
        fresh.write_text(json.dumps(me))
        os.replace(fresh, path)
        return True
    finally:
        guard.unlink(missing_ok=True)


def release(path: str | os.PathLike) -> None:
    path = Path(path)
    if _same_owner(_read(path), _me()):
        path.unlink(missing_ok=True)


def refresh(path: str | os.PathLike) -> bool:
    """Renew the heartbeat of a lock this process holds; False when it is no longer ours."""
    path = Path(path)
    me = _me()
    if not _same_owner(_read(path), me):
        return False
    fresh = path.with_name(f".{path.name}.{me['pid']}.new")
    try:
        fresh.write_text(json.dumps(me))
        os.replace(fresh, path)
    except OSError:
        return False
    return True


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


class Heartbeat:
    """Keeps the locks this process holds fresh (a thread renewing them every ``interval``
    seconds), so other hosts never judge long work stale. ``add``/``discard`` as locks are
    taken and released; use as a context manager."""

    def __init__(self, interval: float = HEARTBEAT_S) -> None:
        self.interval = interval
        self._paths: set[Path] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, path: str | os.PathLike) -> None:
        with self._lock:
            self._paths.add(Path(path))

    def discard(self, path: str | os.PathLike) -> None:
        with self._lock:
            self._paths.discard(Path(path))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                paths = list(self._paths)
            for p in paths:
                refresh(p)

    def __enter__(self) -> Heartbeat:
        self._thread = threading.Thread(target=self._run, name="pathrobust-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def release_all(paths: Iterable[str | os.PathLike]) -> None:
    for p in paths:
        release(p)
