"""What ``--data`` points at, as tile sources for extraction."""

from __future__ import annotations

from pathlib import Path

from pathrobust.data.slides import SLIDE_SUFFIXES, SlideTiles, find_slides
from pathrobust.data.tiles import FolderTiles, H5Tiles, TileSource
from pathrobust.errors import UserError


def open_tile_sources(data: Path, slides: bool = False, target_mpp: float = 0.5, tile_size: int = 224,
                      slide_mpp: float | None = None) -> list[TileSource]:
    """Turn ``--data`` into tile sources: PLISM data (parquet shards or per-slide h5, one
    source per slide), a folder of tiles, an h5 of tiles, a slide file, or a folder of slides
    (``slides=True`` forces slide mode for ``.tif`` folders)."""
    from pathrobust.data.plism import is_plism_data, open_plism

    data = Path(data)
    if not data.exists():
        raise UserError(f"--data {data}: does not exist")
    if is_plism_data(data):
        return list(open_plism(data).values())
    slide_only = {s for s in SLIDE_SUFFIXES if s not in (".tif", ".tiff")}
    if data.is_file():
        if data.suffix in (".h5", ".hdf5"):
            return [H5Tiles(data)]
        if data.suffix.lower() in SLIDE_SUFFIXES:
            return [SlideTiles(data, tile_size, target_mpp, slide_mpp_default=slide_mpp)]
        raise UserError(f"--data {data}: expected a folder of tiles, a .h5 of tiles or a slide file")
    if slides or any(p.suffix.lower() in slide_only for p in data.rglob("*")):
        return [SlideTiles(p, tile_size, target_mpp, slide_mpp_default=slide_mpp) for p in find_slides(data)]
    h5s = sorted(data.glob("*.h5"))
    if h5s:
        return [H5Tiles(p) for p in h5s]
    return [FolderTiles(data)]
