"""Tile sources: the readers that feed feature extraction.

A :class:`TileSource` is an indexable collection of uint8 RGB tiles with a stable order:

* ``name`` — identifies the source (a slide id, a folder name); names the feature file.
* ``len(source)`` and ``source.read(i)`` -> ``np.ndarray`` uint8 ``(H, W, 3)``.
* ``source.coords`` — ``(N, 2)`` int64 (x, y), level-0 pixels for slides, a grid position or
  zeros where the source has none.
* ``source.tile_ids`` — ``list[str]`` or ``None``: stable identifiers (file names, PLISM tile ids).
* ``source.attrs()`` — extra h5 attributes of the feature file (slides: read level, tile size,
  µm/px, level-0 footprint in TRIDENT/CLAM names); ``{}`` by default.

Sources must be picklable (DataLoader workers) and open file handles lazily per process.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pathrobust.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# Attributes TRIDENT (patch_size, patch_size_level0, level0/target_magnification, level0_width/height,
# overlap, name) and CLAM (patch_level, patch_size) keep on the ``coords`` dataset of their h5 files.
COORDS_ATTRS = ("name", "patch_level", "patch_size", "patch_size_level0", "level0_magnification",
                "target_magnification", "level0_width", "level0_height", "overlap")


class TileSource:
    """Base class; subclasses implement ``__len__`` and ``read``."""

    name: str = "tiles"
    coords: np.ndarray
    tile_ids: list[str] | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def attrs(self) -> dict[str, int | float | str]:
        """Attributes the feature file records about how the tiles were made (none by default).
        Keys named in :data:`COORDS_ATTRS` are also written on the ``coords`` dataset, where
        TRIDENT and CLAM readers look for them."""
        return {}

    def fingerprint(self) -> str:
        """Cheap identity of the data (for provenance): name, size and first/last ids."""
        ids = self.tile_ids or []
        ends = f"{ids[0]}..{ids[-1]}" if ids else ""
        return f"{self.name}:{len(self)}:{ends}"


def read_image(path: Path) -> np.ndarray:
    """Read an image file as uint8 RGB ``(H, W, 3)``; unreadable files raise a UserError."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None


class FolderTiles(TileSource):
    """Image files (png/jpg/tif) in a folder, sorted by relative path (recursive).

    Coordinates come from the file names when they hold x and y (see :func:`coords_from_name`),
    else ``(index, 0)``."""

    def __init__(self, root: str | os.PathLike, name: str | None = None, recursive: bool = True) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"{self.root}: not a directory of tiles")
        pattern = "**/*" if recursive else "*"
        self.paths = sorted(p for p in self.root.glob(pattern) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.paths:
            raise UserError(f"{self.root}: no image tiles ({', '.join(IMAGE_SUFFIXES)}) found")
        self.name = name or self.root.name
        self.tile_ids = [p.relative_to(self.root).as_posix() for p in self.paths]
        self.coords = np.array([_coords_from_name(p.stem, i) for i, p in enumerate(self.paths)], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> np.ndarray:
        return read_image(self.paths[index])


# x and y labelled in the name: "x512_y1024", "x-512-y-1024", QuPath's "[x=512,y=1024,w=224,h=224]"
_LABELLED_XY = re.compile(r"(?:^|[^a-z0-9])x[=_-]?(\d+)[^a-z0-9]+y[=_-]?(\d+)(?![0-9])", re.IGNORECASE)
# two trailing integers: "tile_512_1024", "512_1024", "slide-512-1024", "(512, 1024)", "<i>_<level>_<x>_<y>"
_TRAILING_XY = re.compile(r"(?:^|[^0-9])(\d+)\s*[_,-]\s*(\d+)\)?$")


def coords_from_name(stem: str) -> tuple[int, int] | None:
    """``(x, y)`` held by a tile file name (without suffix), or ``None``.

    Labelled coordinates win (``x512_y1024``, ``tile_x=512,y=1024``, QuPath's
    ``name [x=512,y=1024,w=224,h=224]``); otherwise the last two integers separated by ``_``,
    ``-`` or ``,`` (``tile_512_1024``, ``512_1024``, ``tile_(512, 1024)``, PLISM's
    ``<i>_<level>_<x>_<y>``)."""
    found = _LABELLED_XY.search(stem)
    if found is None:
        found = _TRAILING_XY.search(stem.strip())
    return (int(found.group(1)), int(found.group(2))) if found else None


def _coords_from_name(stem: str, index: int) -> tuple[int, int]:
    xy = coords_from_name(stem)
    return xy if xy is not None else (index, 0)


class ArrayTiles(TileSource):
    """Tiles already in memory, ``(N, H, W, 3)`` uint8 (tests, synthetic data)."""

    def __init__(self, tiles: np.ndarray, name: str = "array", coords: np.ndarray | None = None,
                 tile_ids: Sequence[str] | None = None) -> None:
        if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
            raise UserError(f"tiles array has shape {tiles.shape} dtype {tiles.dtype}; expected (N, H, W, 3) uint8")
        self.tiles = tiles
        self.name = name
        self.coords = np.asarray(coords, dtype=np.int64) if coords is not None else np.stack(
            [np.arange(len(tiles)), np.zeros(len(tiles))], 1).astype(np.int64)
        self.tile_ids = list(tile_ids) if tile_ids is not None else None

    def __len__(self) -> int:
        return len(self.tiles)

    def read(self, index: int) -> np.ndarray:
        return self.tiles[index]


class H5Tiles(TileSource):
    """An h5 file of tiles: dataset ``img`` (or ``imgs``/``tiles``) uint8 ``(N, H, W, 3)``,
    optional ``coords`` ``(N, 2)`` and ``barcode``/``tile_ids`` (hest-bench patches, CLAM-like)."""

    IMAGE_KEYS = ("img", "imgs", "tiles", "images")
    ID_KEYS = ("barcode", "tile_ids", "tile_id")

    def __init__(self, path: str | os.PathLike, name: str | None = None) -> None:
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such tile h5 file")
        try:
            with h5py.File(self.path, "r") as f:
                key = next((k for k in self.IMAGE_KEYS if k in f), None)
                if key is None:
                    raise UserError(f"{self.path}: no tile dataset (expected one of {', '.join(self.IMAGE_KEYS)})")
                shape = f[key].shape
                if len(shape) != 4 or shape[-1] != 3:
                    raise UserError(f"{self.path}: dataset '{key}' has shape {shape}; expected (N, H, W, 3)")
                self.key = key
                self._len = shape[0]
                self.coords = np.asarray(f["coords"][:], dtype=np.int64).reshape(-1, 2) if "coords" in f else \
                    np.stack([np.arange(self._len), np.zeros(self._len)], 1).astype(np.int64)
                id_key = next((k for k in self.ID_KEYS if k in f), None)
                self.tile_ids = [_decode(v) for v in np.asarray(f[id_key][:]).reshape(-1)] if id_key else None
        except OSError as exc:
            raise UserError(f"{self.path}: not a readable h5 file ({exc})") from None
        self.name = name or self.path.stem
        self._file = None

    def __len__(self) -> int:
        return self._len

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None  # h5 handles do not cross process boundaries
        return state

    def read(self, index: int) -> np.ndarray:
        if self._file is None:
            import h5py

            self._file = h5py.File(self.path, "r")
        return np.asarray(self._file[self.key][index], dtype=np.uint8)


def _decode(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
