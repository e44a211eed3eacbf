"""Atomic file writes: every output appears whole or not at all.

One helper for every writer in pathrobust: a temporary file in the same folder (hidden,
named after the target and the process), renamed over the target once complete, removed if
the write fails. Files get the user's umask like any other file. A full disk becomes one
readable line instead of a traceback (and leaves no temporary file behind).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pathrobust.errors import UserError


def inside(root: str | os.PathLike, *parts: str) -> Path:
    """``root/parts...``, refusing any part that would leave ``root`` (``..``, an absolute
    path, a separator inside a name taken from a dataset)."""
    root = Path(root)
    for part in parts:
        name = str(part)
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise UserError(f"{name!r}: not usable as a file name under {root} (an id from the data may not hold "
                            "path separators or be '.'/'..')")
    return root.joinpath(*parts)


def no_space(path: str | os.PathLike) -> UserError:
    return UserError(f"no space left on the device of {path}: free space and rerun to resume")


def disk_error(exc: OSError, path: str | os.PathLike) -> UserError | None:
    """The one-line error for a full disk or a read-only output, else None."""
    if exc.errno == errno.ENOSPC:
        return no_space(path)
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return UserError(f"{path}: cannot write ({os.strerror(exc.errno)}); choose another --out")
    return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``.

    ``suffix`` is appended to the temporary name for writers that insist on an extension
    (``np.save`` adds ``.npy``, matplotlib picks the format from it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        err = disk_error(exc, path)
        if err is not None:
            raise err from None
        raise
    except BaseException:
        _remove(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = False) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
    return Path(path)


def write_text(path: str | os.PathLike, text: str, fsync: bool = False) -> Path:
    return write_bytes(path, text.encode("utf-8"), fsync)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """JSON, indented, keys sorted (the same data gives the same bytes)."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_csv(frame, path: str | os.PathLike, index: bool = False) -> Path:
    """A pandas DataFrame as CSV."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=index)
    return Path(path)


def save_npy(path: str | os.PathLike, array, fsync: bool = False) -> Path:
    import numpy as np

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
    return Path(path)


def save_figure(fig, path: str | os.PathLike, **kwargs: Any) -> Path:
    """A matplotlib figure (format from ``path``'s suffix)."""
    path = Path(path)
    with atomic_path(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, **kwargs)
    return path


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
