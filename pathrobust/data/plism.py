"""Readers of the real PLISM data and of plismbench's feature layout.

Tiles, in either published form (see reference/protocols.md, PLISM):

* ``owkin/plism-dataset-tiles``: parquet shards (any subset of them) with columns ``slide_id``,
  ``tile_id``, ``png`` (Hugging Face Image struct ``{bytes, path}`` or plain binary) and more;
  rows are grouped by slide id — never by shard, a slide may span shards.
* ``owkin/plism-dataset``: one ``<slide_id>.h5`` per slide (``GIV_AT2_to_GMH_S60.tif.h5``),
  tile id -> uint8 ``(224, 224, 3)``.

Every slide becomes a :class:`~pathrobust.data.tiles.TileSource` (name = slide id, tile ids,
coords = (x, y) parsed from the tile id). Tiles are matched across slides by (x, y), never by
row order: :func:`check_same_tiles` requires one tile set for all slides.

Features, plismbench layout: ``<root>/<slide_id>/features.npy`` float32 ``(n, 3 + d)``, columns
0..2 = (deepzoom level, x, y), rows sorted by (x, y) (plismbench ``engine/extract/utils.py``
``sort_coords``/``save_features``).
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pathrobust.data.tiles import TileSource
from pathrobust import atomic
from pathrobust.errors import UserError

STAININGS: tuple[str, ...] = ("GIV", "GIVH", "GM", "GMH", "GV", "GVH", "HR", "HRH", "KR", "KRH", "LM", "LMH", "MY")
SCANNERS: tuple[str, ...] = ("AT2", "GT450", "P", "S210", "S360", "S60", "SQ")
REGISTRATION_TARGET = "GMH_S60"
FEATURES_FILE = "features.npy"
# '<STAINING>_<SCANNER>_...' with nothing that could leave a folder when the id names a file
_SLIDE_ID = re.compile(r"^([A-Za-z0-9]+)_([A-Za-z0-9]+)_[A-Za-z0-9_.+-]*$")


def make_slide_id(staining: str, scanner: str) -> str:
    """``GIV``, ``AT2`` -> ``GIV_AT2_to_GMH_S60.tif`` (the published slide ids)."""
    return f"{staining}_{scanner}_to_{REGISTRATION_TARGET}.tif"


def parse_slide_id(slide_id: str) -> tuple[str, str]:
    """Slide id -> (staining, scanner): its first two ``_`` fields (plismbench
    ``prepare_features_dataframe``)."""
    m = _SLIDE_ID.match(slide_id)
    if not m or ".." in slide_id:
        raise UserError(f"slide id {slide_id!r}: expected '<STAINING>_<SCANNER>_...' such as {make_slide_id('GIV', 'AT2')}")
    return m.group(1), m.group(2)


def parse_tile_id(tile_id: str) -> tuple[int, int, int]:
    """Tile id -> (deepzoom level, x, y): its ``_``-separated fields 1..3 (plismbench
    ``process_imgs``: ``tile_id.split("_")[1:]``)."""
    fields = str(tile_id).split("_")
    try:
        level, x, y = (int(v) for v in fields[1:4])
    except ValueError:
        raise UserError(f"tile id {tile_id!r}: fields 1..3 must be integers (level, x, y)") from None
    if len(fields) != 4:
        raise UserError(f"tile id {tile_id!r}: expected 4 '_'-separated fields (<id>_<level>_<x>_<y>)")
    return level, x, y


def make_tile_id(index: int, level: int, x: int, y: int) -> str:
    return f"{index}_{level}_{x}_{y}"


def _coords_of(tile_ids: Sequence[str]) -> np.ndarray:
    return np.array([parse_tile_id(t) for t in tile_ids], dtype=np.int64).reshape(-1, 3)


# -- parquet shards (owkin/plism-dataset-tiles) --------------------------------------------------
class ParquetSlideTiles(TileSource):
    """One slide of the parquet shards, in file order. ``locations[i]`` = (shard index, row
    group, row in group). Decoded row groups are cached one at a time per process."""

    def __init__(self, slide_id: str, shards: Sequence[Path], tile_ids: list[str],
                 locations: np.ndarray) -> None:
        self.name = slide_id
        self.shards = [Path(s) for s in shards]
        self.tile_ids = tile_ids
        self.locations = locations
        levels_xy = _coords_of(tile_ids)
        self.levels = levels_xy[:, 0]
        self.coords = levels_xy[:, 1:]
        self._cache: tuple[tuple[int, int], list[bytes]] | None = None

    def __len__(self) -> int:
        return len(self.tile_ids)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = None
        return state

    def _row_group(self, shard: int, group: int) -> list[bytes]:
        if self._cache is None or self._cache[0] != (shard, group):
            import pyarrow.parquet as pq

            column = pq.ParquetFile(self.shards[shard]).read_row_group(group, columns=["png"]).column("png")
            self._cache = ((shard, group), _png_bytes(column))
        return self._cache[1]

    def read(self, index: int) -> np.ndarray:
        from PIL import Image

        shard, group, row = (int(v) for v in self.locations[index])
        data = self._row_group(shard, group)[row]
        with Image.open(io.BytesIO(data)) as img:
            return np.array(img.convert("RGB"))  # a writable copy (torch warns on read-only arrays)


def _png_bytes(column) -> list[bytes]:
    """A ``png`` column -> list of encoded images (HF Image struct ``{bytes, path}`` or binary)."""
    import pyarrow as pa

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_struct(column.type):
        column = column.field("bytes")
    return column.to_pylist()


def parquet_shards(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).rglob("*.parquet") if p.is_file())


def read_parquet_slides(shards: Sequence[Path]) -> dict[str, ParquetSlideTiles]:
    """Index parquet shards by slide id (reads only ``slide_id`` and ``tile_id``)."""
    import pyarrow.parquet as pq

    ids: dict[str, list[str]] = {}
    locs: dict[str, list[tuple[int, int, int]]] = {}
    for s, shard in enumerate(shards):
        try:
            pf = pq.ParquetFile(shard)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise UserError(f"{shard}: not a readable parquet file ({exc})") from None
        missing = {"slide_id", "tile_id", "png"} - set(pf.schema_arrow.names)
        if missing:
            raise UserError(f"{shard}: missing column(s) {', '.join(sorted(missing))} (expected owkin/plism-dataset-tiles shards)")
        for g in range(pf.num_row_groups):
            table = pf.read_row_group(g, columns=["slide_id", "tile_id"])
            for r, (sid, tid) in enumerate(zip(table.column("slide_id").to_pylist(), table.column("tile_id").to_pylist())):
                ids.setdefault(sid, []).append(tid)
                locs.setdefault(sid, []).append((s, g, r))
    return {sid: ParquetSlideTiles(sid, shards, ids[sid], np.array(locs[sid], dtype=np.int64)) for sid in sorted(ids)}


# -- h5 per slide (owkin/plism-dataset) ---------------------------------------------------------
class H5SlideTiles(TileSource):
    """``<slide_id>.h5``: one dataset per tile id, uint8 ``(224, 224, 3)``."""

    def __init__(self, path: str | os.PathLike) -> None:
        import h5py

        self.path = Path(path)
        self.name = self.path.name[: -len(".h5")] if self.path.name.endswith(".h5") else self.path.stem
        try:
            with h5py.File(self.path, "r") as f:
                self.tile_ids = [k for k in f.keys() if isinstance(f[k], h5py.Dataset)]
        except OSError as exc:
            raise UserError(f"{self.path}: not a readable h5 file ({exc})") from None
        if not self.tile_ids:
            raise UserError(f"{self.path}: no tile datasets")
        levels_xy = _coords_of(self.tile_ids)
        self.levels = levels_xy[:, 0]
        self.coords = levels_xy[:, 1:]
        self._file = None

    def __len__(self) -> int:
        return len(self.tile_ids)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None
        return state

    def read(self, index: int) -> np.ndarray:
        if self._file is None:
            import h5py

            self._file = h5py.File(self.path, "r")
        return np.asarray(self._file[self.tile_ids[index]][:], dtype=np.uint8)


# -- the dataset -------------------------------------------------------------------------------
def is_plism_data(path: Path) -> bool:
    """A folder of PLISM parquet shards or of PLISM ``*_to_GMH_S60*.h5`` files."""
    path = Path(path)
    if path.is_file():
        return path.suffix == ".parquet" or (path.suffix == ".h5" and "_to_" in path.name)
    if not path.is_dir():
        return False
    return bool(parquet_shards(path)) or any("_to_" in p.name for p in path.glob("*.h5"))


def open_plism(path: str | os.PathLike) -> dict[str, TileSource]:
    """``--data``: a folder (or file) of parquet shards, or a folder of per-slide h5 files ->
    ``{slide_id: TileSource}`` sorted by slide id. Checks slide ids and the shared tile set."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--data {path}: does not exist")
    if path.is_file():
        shards = [path] if path.suffix == ".parquet" else []
        h5s = [path] if path.suffix == ".h5" else []
    else:
        shards = parquet_shards(path)
        h5s = sorted(path.glob("*.h5"))
    if shards:
        slides: dict[str, TileSource] = _complete_slides(dict(read_parquet_slides(shards)), path)
    elif h5s:
        slides = {s.name: s for s in (H5SlideTiles(p) for p in h5s)}
    else:
        raise UserError(f"--data {path}: no PLISM parquet shards (*.parquet) or per-slide h5 files (*.h5)")
    for sid in slides:
        parse_slide_id(sid)
    check_same_tiles({sid: s.coords for sid, s in slides.items()}, where=f"--data {path}")
    return dict(sorted(slides.items()))


def _complete_slides(slides: dict[str, TileSource], path: Path) -> dict[str, TileSource]:
    """A subset of parquet shards (``pathrobust data fetch plism-tiles --subset``) cuts the
    slides at its ends: keep the slides with every tile, say which were left out."""
    if not slides:
        return slides
    full = max(len(s) for s in slides.values())
    cut = sorted(sid for sid, s in slides.items() if len(s) < full)
    if cut and len(cut) < len(slides):
        warnings.warn(f"--data {path}: left out {len(cut)} slide(s) with only part of their tiles in these shards "
                      f"({', '.join(f'{sid} {len(slides[sid])}/{full}' for sid in cut[:3])}"
                      f"{', ...' if len(cut) > 3 else ''}); fetch the neighbouring shards to include them",
                      stacklevel=3)
        return {sid: s for sid, s in slides.items() if sid not in cut}
    return slides


def warn_partial_grid(slide_ids: Iterable[str]) -> None:
    present = {parse_slide_id(s) for s in slide_ids}
    full = {(st, sc) for st in STAININGS for sc in SCANNERS}
    if present != full:
        warnings.warn(f"PLISM data holds {len(present)} of the {len(full)} staining x scanner slides; "
                      "results are not comparable with the full-grid leaderboard", stacklevel=2)


def check_same_tiles(coords: Mapping[str, np.ndarray], where: str = "PLISM data") -> None:
    """Every slide must hold the same set of (x, y) locations; else one line naming the first
    slide that differs and its first missing/extra tiles."""
    items = list(coords.items())
    if not items:
        return
    ref_id, ref = items[0]
    ref_set = {tuple(map(int, c)) for c in np.asarray(ref)[:, -2:]}
    if len(ref_set) != len(ref):
        raise UserError(f"{where}: slide {ref_id} has duplicate tile locations")
    for sid, c in items[1:]:
        own = {tuple(map(int, v)) for v in np.asarray(c)[:, -2:]}
        if own != ref_set or len(own) != len(c):
            missing = sorted(ref_set - own)[:5]
            extra = sorted(own - ref_set)[:5]
            detail = []
            if missing:
                detail.append(f"missing (x, y) {missing}")
            if extra:
                detail.append(f"not in {ref_id}: {extra}")
            if not detail:
                detail.append("duplicate tile locations")
            raise UserError(f"{where}: slide {sid} does not have the tile set of {ref_id}: {'; '.join(detail)}")


# -- tile subsets --------------------------------------------------------------------------
def tile_subset(n_total: int, subset_file: str | os.PathLike | None = None, n_tiles: int | None = None) -> np.ndarray:
    """Indices into the coordinate-sorted tiles.

    * ``subset_file``: plismbench's ``tiles_subset_*.npy`` (int64 indices), used as given.
    * ``n_tiles``: ``n_tiles`` evenly spaced indices ``round(linspace(0, n_total - 1, n_tiles))``
      — deterministic and spread over the whole (x, y)-sorted array.
    * neither: all tiles."""
    if subset_file is not None and n_tiles is not None:
        raise UserError("--tile-subset and --n-tiles: give one, not both")
    if subset_file is not None:
        path = Path(subset_file)
        try:
            idx = np.load(path)
        except (OSError, ValueError) as exc:
            raise UserError(f"--tile-subset {path}: cannot read ({exc})") from None
        idx = np.asarray(idx).reshape(-1)
        if not np.issubdtype(idx.dtype, np.integer):
            raise UserError(f"--tile-subset {path}: expected integer indices, got {idx.dtype}")
        if len(np.unique(idx)) != len(idx):
            raise UserError(f"--tile-subset {path}: indices are not unique")
        if len(idx) and (idx.min() < 0 or idx.max() >= n_total):
            raise UserError(f"--tile-subset {path}: indices must lie in [0, {n_total}); the slides have {n_total} tiles")
        return idx.astype(np.int64)
    if n_tiles is not None:
        if not 2 <= n_tiles <= n_total:
            raise UserError(f"--n-tiles {n_tiles}: must be between 2 and the {n_total} tiles per slide")
        return np.unique(np.round(np.linspace(0, n_total - 1, n_tiles)).astype(np.int64))
    return np.arange(n_total, dtype=np.int64)


# -- features: plismbench layout and sorted views ------------------------------------------------
def sort_by_xy(levels_xy: np.ndarray) -> np.ndarray:
    """Row order sorting ``(n, 3)`` (level, x, y) by x then y (plismbench ``sort_coords``)."""
    return np.lexsort((levels_xy[:, 2], levels_xy[:, 1]))


def write_plismbench_features(root: str | os.PathLike, slide_id: str, levels_xy: np.ndarray,
                              features: np.ndarray) -> Path:
    """Write ``<root>/<slide_id>/features.npy`` float32 ``(n, 3 + d)`` sorted by (x, y), atomically."""
    levels_xy = np.asarray(levels_xy).reshape(-1, 3)
    order = sort_by_xy(levels_xy)
    table = np.concatenate([levels_xy[order].astype(np.float32), np.asarray(features, np.float32)[order]], axis=1)
    parse_slide_id(slide_id)
    path = atomic.inside(root, slide_id, FEATURES_FILE)
    return atomic.save_npy(path, table)


def export_h5_to_plismbench(h5_path: str | os.PathLike, root: str | os.PathLike, slide_id: str | None = None,
                            coords: np.ndarray | None = None) -> Path:
    """A feature h5 of :func:`pathrobust.extract.extract_features` -> plismbench layout. Levels
    and (x, y) come from PLISM tile ids when the file has them, else level 0 and ``coords``."""
    from pathrobust.extract import load_features

    ff = load_features(h5_path)
    if ff.tile_ids is not None and all(t.count("_") == 3 for t in ff.tile_ids):
        levels_xy = _coords_of(ff.tile_ids)
    else:
        xy = ff.coords if coords is None else np.asarray(coords)
        levels_xy = np.concatenate([np.zeros((len(xy), 1), np.int64), xy.reshape(-1, 2)], axis=1)
    return write_plismbench_features(root, slide_id or Path(h5_path).stem, levels_xy, ff.features)


@dataclass
class SlideFeatures:
    """One slide's features sorted by (x, y): ``xy`` ``(n, 2)`` int64, ``features`` ``(n, d)``
    float32 (possibly a memory map)."""

    slide_id: str
    xy: np.ndarray
    features: np.ndarray


class FeatureSet:
    """Per-slide features, loaded one slide at a time (memory never holds all slides).

    ``FeatureSet.plismbench(root)`` reads ``<root>/<slide_id>/features.npy``;
    ``FeatureSet.h5(paths)`` reads :mod:`pathrobust.extract` files (tile ids -> (x, y))."""

    def __init__(self, paths: Mapping[str, Path], kind: str) -> None:
        self.paths = dict(sorted(paths.items()))
        self.kind = kind

    @property
    def slide_ids(self) -> list[str]:
        return list(self.paths)

    @classmethod
    def plismbench(cls, root: str | os.PathLike) -> FeatureSet:
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"--features {root}: not a directory")
        paths = {p.parent.name: p for p in root.glob(f"*/{FEATURES_FILE}")}
        if not paths:
            raise UserError(f"--features {root}: no <slide_id>/{FEATURES_FILE} (plismbench layout)")
        for sid in paths:
            parse_slide_id(sid)
        return cls(paths, "plismbench")

    @classmethod
    def h5(cls, paths: Mapping[str, Path]) -> FeatureSet:
        return cls(paths, "h5")

    def load(self, slide_id: str) -> SlideFeatures:
        path = self.paths[slide_id]
        if self.kind == "plismbench":
            try:
                table = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise UserError(f"{path}: cannot read ({exc})") from None
            if table.ndim != 2 or table.shape[1] < 4:
                raise UserError(f"{path}: shape {table.shape}; expected (n, 3 + d) with d >= 1")
            levels_xy = np.asarray(table[:, :3]).astype(np.int64)
            order = sort_by_xy(levels_xy)
            feats = table[:, 3:] if np.array_equal(order, np.arange(len(order))) else np.asarray(table[order, 3:])
            return SlideFeatures(slide_id, levels_xy[order, 1:], feats)
        from pathrobust.extract import load_features

        ff = load_features(path)
        if ff.tile_ids is None:
            raise UserError(f"{path}: no tile_ids; cannot place tiles (PLISM tile ids give (x, y))")
        levels_xy = _coords_of(ff.tile_ids)
        order = sort_by_xy(levels_xy)
        return SlideFeatures(slide_id, levels_xy[order, 1:], ff.features[order])

    def dim_and_tiles(self) -> tuple[np.ndarray, int]:
        """The shared sorted (x, y) array (checked across all slides) and the feature dim."""
        xy0 = None
        dim = 0
        coords = {}
        for sid in self.slide_ids:
            sf = self.load(sid)
            coords[sid] = sf.xy
            dim = sf.features.shape[1]
            xy0 = sf.xy if xy0 is None else xy0
        check_same_tiles(coords, where="features")
        return xy0, dim
