"""Data identity by content: one fingerprint rule for every suite.

A dataset's fingerprint hashes, for every file it consists of, the path *relative to the
dataset root* and the size, plus the bytes of an evenly spaced sample of the files (the
first MiB of each). The same data copied to another folder keeps its fingerprint; a file
renamed, resized or rewritten in the sample changes it. Reports show its first 8 hex digits
in the Data column.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

SAMPLE_FILES = 16
SAMPLE_BYTES = 1 << 20


def fingerprint_files(root: str | os.PathLike, files: Iterable[str | os.PathLike], extra: str = "") -> str:
    """16-hex fingerprint of ``files`` (under ``root``) by name, size and sampled content;
    ``extra`` adds what is not in the files (e.g. a task list or a tile subset)."""
    root = Path(root)
    paths = sorted({Path(f) if Path(f).is_absolute() else root / f for f in files},
                   key=lambda p: _relative(p, root))
    digest = hashlib.sha256(extra.encode())
    for path in paths:
        size = path.stat().st_size if path.exists() else -1
        digest.update(f"{_relative(path, root)}\0{size}\n".encode())
    if paths:
        step = max(1, len(paths) // SAMPLE_FILES)
        for path in paths[::step][:SAMPLE_FILES]:
            if path.is_file():
                with open(path, "rb") as fh:
                    digest.update(fh.read(SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def fingerprint_tree(root: str | os.PathLike, suffixes: Iterable[str] | None = None, extra: str = "") -> str:
    """:func:`fingerprint_files` of every file under ``root`` (optionally only these suffixes);
    hidden files and folders (caches, partial work) are left out."""
    root = Path(root)
    wanted = tuple(s.lower() for s in suffixes) if suffixes else None
    if root.is_file():
        return fingerprint_files(root.parent, [root], extra)
    files = [p for p in root.rglob("*") if p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(root).parts)
             and (wanted is None or p.suffix.lower() in wanted)]
    return fingerprint_files(root, files, extra)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name
