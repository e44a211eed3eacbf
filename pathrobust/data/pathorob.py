"""Readers of the PathoROB datasets and of a generic multi-centre manifest.

PathoROB on the Hugging Face hub (one dataset repo each, reference/protocols.md "PathoROB"):
``bifold-pathomics/PathoROB-camelyon``, ``-tcga``, ``-tolkach_esca``, laid out as
``data/train-000NN-of-000MM.parquet`` (Camelyon and ESCA one shard, TCGA three) with the
columns ``image`` (Hugging Face Image struct ``{bytes, path}``), ``subset`` (``ID``/``OOD``),
``slide_id``, ``patch_id``, ``biological_class``, ``medical_center``. A dataset is found
under a root as ``<root>/PathoROB-<name>/``, ``<root>/<name>/``, the hub cache's
``datasets--bifold-pathomics--PathoROB-<name>/snapshots/<rev>/``, or the root itself.

Which rows each metric uses is PathoROB's code, not the hub: its ``data/metadata/*.csv``
(columns ``subset, slide_id, patch_id, biological_class, medical_center``) select and order
them, and ``subset`` there names ID/OOD or, in ``tcga_2x2.csv``, the 2 × 2 subset of each
occurrence. :data:`DEFAULT_VIEWS` lists the file per metric (``get_meta``, ``load_data``,
clustering ``compute``); RI and clustering rows drop ``subset == "OOD"``. ``camelyon.csv`` and
``tolkach_esca.csv`` hold the hub table itself (:data:`HUB_TABLE`; assumed in the hub's row
order) and are read from the parquet when the CSV is absent; the others
(``camelyon_reduced.csv``, ``tcga_2x2.csv``, ``tcga_4x4.csv``, ``tolkach_esca_reduced.csv``)
select from the hub corpus in ways no filter reproduces, so they must be given
(``metadata_dir``, or a ``metadata/`` folder beside ``data/``). Views are joined to the parquet by
``(slide_id, patch_id)`` and keep the CSV's row order (APD's slide chunks depend on it).

Every dataset becomes one :class:`~pathrobust.data.tiles.TileSource` (all parquet rows in file
order; tile id ``<slide_id>-<patch_id>``, PathoROB's feature key) plus a metadata table, and
a long *view table* (:data:`VIEW_COLUMNS`): one row per (view, occurrence), ``row`` indexing
the tile source — what :func:`pathrobust.probes.pathorob.evaluate_pathorob` takes.

A generic manifest CSV (``image_path, biological_class, medical_center, slide_id`` and an
optional ``subset``; common aliases accepted) reads the same way for users' own data.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pathrobust.data.tiles import TileSource, read_image
from pathrobust.errors import UserError

DATASETS: tuple[str, ...] = ("camelyon", "tcga", "tolkach_esca")
HUB_REPOS = {name: f"bifold-pathomics/PathoROB-{name}" for name in DATASETS}
METADATA_COLUMNS: tuple[str, ...] = ("subset", "slide_id", "patch_id", "biological_class", "medical_center")
VIEW_COLUMNS: tuple[str, ...] = ("view", "subset", "row", "slide_id", "patch_id", "biological_class", "medical_center")
REFERENCE_METADATA = "github.com/bifold-pathomics/PathoROB (commit 46594e9), data/metadata/"
# metric -> PathoROB metadata file (robustness_index.get_meta, apd.utils.load_data, clustering_score.compute)
DEFAULT_VIEWS: dict[str, dict[str, str]] = {
    "camelyon": {"ri": "camelyon.csv", "apd": "camelyon.csv", "clustering": "camelyon_reduced.csv"},
    "tcga": {"ri": "tcga_2x2.csv", "apd": "tcga_4x4.csv", "clustering": "tcga_4x4.csv"},
    "tolkach_esca": {"ri": "tolkach_esca_reduced.csv", "apd": "tolkach_esca.csv",
                     "clustering": "tolkach_esca_reduced.csv"},
}
# the metadata file whose rows are the hub table (22,402 Camelyon and 16,300 ESCA patches, as the
# CSVs); TCGA has none: its hub corpus also feeds tcga_2x2.csv, so tcga_4x4.csv must be given
HUB_TABLE = {"camelyon": "camelyon.csv", "tolkach_esca": "tolkach_esca.csv"}
DROP_OOD = ("ri", "clustering")
INFO_FILE = "pathorob.json"  # optional marker written by synthetic generators: {"dataset": name, ...}


# -- tiles ---------------------------------------------------------------------------------------
class PathorobTiles(TileSource):
    """All rows of a dataset's parquet shards, in file order. ``locations[i]`` = (shard, row
    group, row in group); decoded row groups are cached one at a time per process."""

    def __init__(self, name: str, shards: Sequence[Path], tile_ids: list[str], locations: np.ndarray) -> None:
        self.name = name
        self.shards = [Path(s) for s in shards]
        self.tile_ids = tile_ids
        self.locations = locations
        self.coords = np.stack([np.arange(len(tile_ids)), np.zeros(len(tile_ids))], 1).astype(np.int64)
        self._cache: tuple[tuple[int, int], list[bytes]] | None = None

    def __len__(self) -> int:
        return len(self.tile_ids)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = None
        return state

    def read(self, index: int) -> np.ndarray:
        import pyarrow.parquet as pq
        from PIL import Image

        shard, group, row = (int(v) for v in self.locations[index])
        if self._cache is None or self._cache[0] != (shard, group):
            column = pq.ParquetFile(self.shards[shard]).read_row_group(group, columns=["image"]).column("image")
            self._cache = ((shard, group), _image_bytes(column))
        data = self._cache[1][row]
        if data is None:
            raise UserError(f"{self.shards[shard]}: row {row} of row group {group} has no image bytes")
        with Image.open(io.BytesIO(data)) as img:
            return np.array(img.convert("RGB"))


def _image_bytes(column) -> list[bytes]:
    """An ``image`` column (HF Image struct ``{bytes, path}`` or plain binary) -> encoded images."""
    import pyarrow as pa

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_struct(column.type):
        column = column.field("bytes")
    return column.to_pylist()


class ManifestTiles(TileSource):
    """Image files listed in a manifest (paths resolved against the manifest's folder)."""

    def __init__(self, name: str, paths: Sequence[Path], tile_ids: list[str]) -> None:
        self.name = name
        self.paths = [Path(p) for p in paths]
        self.tile_ids = tile_ids
        self.coords = np.stack([np.arange(len(paths)), np.zeros(len(paths))], 1).astype(np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> np.ndarray:
        return read_image(self.paths[index])


# -- a dataset -----------------------------------------------------------------------------------
@dataclass
class PathorobData:
    """One dataset: its tiles, one metadata row per tile (``row`` = tile index) and the long
    view table (:data:`VIEW_COLUMNS`) naming the rows of each metric."""

    name: str
    tiles: TileSource
    table: pd.DataFrame
    views: pd.DataFrame
    sources: dict[str, str] = field(default_factory=dict)  # view -> where its rows came from

    def view(self, name: str) -> pd.DataFrame:
        return self.views[self.views["view"] == name].reset_index(drop=True)


def parquet_shards(folder: Path) -> list[Path]:
    data = folder / "data"
    base = data if data.is_dir() else folder
    return sorted(p for p in base.glob("*.parquet") if p.is_file())


def find_datasets(root: str | os.PathLike, datasets: Sequence[str] | None = None) -> dict[str, Path]:
    """Dataset name -> folder holding its ``data/*.parquet`` under ``root`` (module doc).

    ``root`` may itself be one dataset's folder: its name comes from an ``pathorob.json``
    marker, the folder name (``PathoROB-<name>``, ``<name>``, the hub cache's), or
    ``datasets`` when that names exactly one."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--data {root}: not a directory")
    wanted = list(datasets) if datasets else None
    found: dict[str, Path] = {}
    if parquet_shards(root):
        name = _name_of(root, wanted)
        found[name] = root
    else:
        for child in sorted(p for p in root.iterdir() if p.is_dir()):
            if parquet_shards(child):
                name = _name_of(child, None, strict=False)
                if name:
                    found.setdefault(name, child)
            for snap in sorted(child.glob("snapshots/*")):  # hub cache layout
                if parquet_shards(snap):
                    name = _name_of(child, None, strict=False)
                    if name:
                        found.setdefault(name, snap)
    if wanted:
        missing = [w for w in wanted if w not in found]
        if missing:
            raise UserError(f"--data {root}: no PathoROB dataset {', '.join(missing)} found (expected "
                            f"PathoROB-<name>/data/*.parquet; found: {', '.join(sorted(found)) or 'none'})")
        return {w: found[w] for w in wanted}
    if not found:
        raise UserError(f"--data {root}: no PathoROB parquet shards (expected <root>/PathoROB-<name>/data/*.parquet "
                        f"for <name> in {', '.join(DATASETS)})")
    return found


def _marker(folder: Path) -> dict:
    path = folder / INFO_FILE
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
        str(info["dataset"])
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path}: not a PathoROB dataset marker (expected JSON with a 'dataset' key)") from None
    return info


def _name_of(folder: Path, wanted: Sequence[str] | None, strict: bool = True) -> str | None:
    marker = _marker(folder)
    if marker:
        return str(marker["dataset"])
    for part in (folder.name, folder.parent.parent.name if folder.parent.name == "snapshots" else ""):
        low = part.lower()
        for name in DATASETS:
            if low in (name, f"pathorob-{name}", f"datasets--bifold-pathomics--pathorob-{name}"):
                return name
    if wanted and len(wanted) == 1:
        return wanted[0]
    if strict:
        raise UserError(f"{folder}: cannot tell which PathoROB dataset this is; name the folder PathoROB-<name> "
                        f"or choose one dataset (one of {', '.join(DATASETS)})")
    return None


def read_hub_table(name: str, shards: Sequence[Path]) -> tuple[pd.DataFrame, np.ndarray]:
    """Metadata of every parquet row (file order) and its (shard, row group, row) location."""
    import pyarrow.parquet as pq

    if not shards:
        raise UserError(f"{name}: no parquet shards")
    parts, locs = [], []
    for s, shard in enumerate(shards):
        try:
            pf = pq.ParquetFile(shard)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise UserError(f"{shard}: not a readable parquet file ({exc})") from None
        missing = [c for c in ("image", *METADATA_COLUMNS) if c not in pf.schema_arrow.names]
        if missing:
            raise UserError(f"{shard}: missing column(s) {', '.join(missing)} (a PathoROB shard has image, "
                            f"{', '.join(METADATA_COLUMNS)})")
        for g in range(pf.num_row_groups):
            part = pf.read_row_group(g, columns=list(METADATA_COLUMNS)).to_pandas()
            locs.append(np.stack([np.full(len(part), s), np.full(len(part), g), np.arange(len(part))], 1))
            parts.append(part)
    table = pd.concat(parts, ignore_index=True).astype(str)
    _check_values(table, str(shards[0].parent), METADATA_COLUMNS)
    dup = table.duplicated(["slide_id", "patch_id"])
    if dup.any():
        first = table[dup].iloc[0]
        raise UserError(f"{shards[0].parent}: (slide_id, patch_id) = ({first.slide_id}, {first.patch_id}) occurs twice")
    table.insert(0, "row", np.arange(len(table)))
    return table, np.concatenate(locs).astype(np.int64)


def _check_values(table: pd.DataFrame, source: str, columns: Sequence[str]) -> None:
    for col in columns:
        blank = table[col].isna() | (table[col].astype(str).str.strip().isin(["", "nan", "None"]))
        if blank.any():
            raise UserError(f"{source}: column {col!r} is empty in row {int(np.nonzero(blank.to_numpy())[0][0])}")


def read_view_csv(path: Path, table: pd.DataFrame) -> pd.DataFrame:
    """A PathoROB metadata CSV joined to the hub table (``row``), in the CSV's order."""
    try:
        meta = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise UserError(f"{path}: not a readable CSV ({exc})") from None
    missing = [c for c in METADATA_COLUMNS if c not in meta.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} (PathoROB metadata has {', '.join(METADATA_COLUMNS)})")
    _check_values(meta, str(path), METADATA_COLUMNS)
    key = table.set_index(["slide_id", "patch_id"])["row"]
    idx = pd.MultiIndex.from_frame(meta[["slide_id", "patch_id"]].apply(lambda c: c.str.strip()))
    rows = key.reindex(idx).to_numpy()
    if pd.isna(rows).any():
        i = int(np.nonzero(pd.isna(rows))[0][0])
        raise UserError(f"{path}: row {i} (slide_id {meta.slide_id.iloc[i]}, patch_id {meta.patch_id.iloc[i]}) "
                        f"is not in the dataset's parquet shards")
    out = meta[list(METADATA_COLUMNS)].copy()
    out.insert(0, "row", rows.astype(np.int64))
    return out


def _view_rows(name: str, view: str, file: str, table: pd.DataFrame, dirs: Sequence[Path],
               hub_table: str | None) -> tuple[pd.DataFrame, str]:
    for d in dirs:
        if (d / file).is_file():
            return read_view_csv(d / file, table), str(d / file)
    if hub_table == file:
        odd = sorted(set(table["subset"]) - {"ID", "OOD"})
        if odd:
            raise UserError(f"{name}: the parquet's subset column holds {odd[0]!r}, not only ID/OOD, so it is not "
                            f"{file}; put PathoROB's {file} ({REFERENCE_METADATA}) in a metadata folder")
        return table[["row", *METADATA_COLUMNS]].copy(), "parquet"
    where = " or ".join(str(d) for d in dirs) or "a metadata folder"
    raise UserError(f"{name}: the {view} rows are PathoROB's {file}, a stored sample that is not on the hub; "
                    f"put it in {where} (from {REFERENCE_METADATA})")


def load_dataset(name: str, folder: Path, *, views: Mapping[str, str] | None = None,
                 metadata_dir: str | os.PathLike | None = None) -> PathorobData:
    """One PathoROB dataset: tiles, per-tile table and the view table of ``views``
    (metric -> metadata file; default: the folder's ``pathorob.json`` marker, else
    :data:`DEFAULT_VIEWS`). Metadata files are looked up in ``metadata_dir``, then
    ``<folder>/metadata``, then ``<folder>/../metadata``; the file named ``hub_table`` (marker,
    else :data:`HUB_TABLE`) may be the parquet itself."""
    marker = _marker(folder)
    views = dict(views or marker.get("views") or DEFAULT_VIEWS.get(name, {}))
    hub_table = marker.get("hub_table", HUB_TABLE.get(name))
    if not views:
        raise UserError(f"{name}: no views given and no default (PathoROB datasets: {', '.join(DATASETS)})")
    shards = parquet_shards(folder)
    table, locs = read_hub_table(name, shards)
    dirs = [Path(metadata_dir)] if metadata_dir else []
    if metadata_dir and not Path(metadata_dir).is_dir():
        raise UserError(f"--pathorob-metadata {metadata_dir}: not a directory")
    dirs += [p for p in (folder / "metadata", folder.parent / "metadata") if p.is_dir()]
    parts, sources = [], {}
    for view, file in views.items():
        rows, sources[view] = _view_rows(name, view, file, table, dirs, hub_table)
        if view in DROP_OOD:
            rows = rows[rows["subset"] != "OOD"]
        rows.insert(0, "view", view)
        parts.append(rows)
    tiles = PathorobTiles(name, shards, (table["slide_id"] + "-" + table["patch_id"]).tolist(), locs)
    return PathorobData(name, tiles, table, pd.concat(parts, ignore_index=True)[list(VIEW_COLUMNS)], sources)


def read_pathorob(root: str | os.PathLike, datasets: Sequence[str] | None = None, *,
                  views: Mapping[str, Mapping[str, str]] | None = None,
                  metadata_dir: str | os.PathLike | None = None) -> dict[str, PathorobData]:
    """Every PathoROB dataset under ``root`` (or those named), see :func:`load_dataset`."""
    found = find_datasets(root, datasets)
    return {name: load_dataset(name, folder, views=(views or {}).get(name), metadata_dir=metadata_dir)
            for name, folder in found.items()}


# -- generic manifest ----------------------------------------------------------------------------
MANIFEST_ALIASES: dict[str, tuple[str, ...]] = {
    "image_path": ("image_path", "path", "image", "file"),
    "biological_class": ("biological_class", "class", "label"),
    "medical_center": ("medical_center", "medical_centre", "centre", "center", "site"),
    "slide_id": ("slide_id", "case_id", "group_id", "slide", "case"),
}


def read_manifest(path: str | os.PathLike, name: str | None = None) -> PathorobData:
    """A user's multi-centre manifest CSV: one row per tile with an image path (relative to
    the CSV's folder or absolute), its biological class, medical centre and slide (or case)
    id; an optional ``subset`` column holds ``ID``/``OOD`` (OOD rows leave RI and
    clustering) or the 2 × 2 subsets of a paired design. Views: ``ri`` and ``clustering``
    (all rows but OOD), ``apd`` when subset is ID/OOD."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--manifest {path}: no such file")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise UserError(f"{path}: not a readable CSV ({exc})") from None
    cols = {}
    for canonical, aliases in MANIFEST_ALIASES.items():
        hit = next((a for a in aliases if a in raw.columns), None)
        if hit is None:
            raise UserError(f"{path}: missing column {canonical!r} (or one of {', '.join(aliases[1:])}); "
                            f"a manifest needs image_path, biological_class, medical_center, slide_id")
        cols[canonical] = raw[hit].astype(str).str.strip()
    table = pd.DataFrame(cols)
    table["subset"] = raw["subset"].astype(str).str.strip() if "subset" in raw.columns else "ID"
    if len(table) == 0:
        raise UserError(f"{path}: no rows")
    _check_values(table, str(path), list(MANIFEST_ALIASES) + ["subset"])
    paths = [Path(p) if Path(p).is_absolute() else path.parent / p for p in table["image_path"]]
    absent = next((i for i, p in enumerate(paths) if not p.is_file()), None)
    if absent is not None:
        raise UserError(f"{path}: row {absent}: image {table['image_path'].iloc[absent]} not found")
    # one tile per image; a paired design may list an image once per subset
    first = ~table["image_path"].duplicated()
    tile_of = pd.Series(np.arange(int(first.sum())), index=table.loc[first, "image_path"])
    table.insert(0, "row", tile_of.loc[table["image_path"]].to_numpy())
    table["patch_id"] = table["image_path"]
    tiles_table = table[first].reset_index(drop=True)
    paired = not set(table["subset"]) <= {"ID", "OOD"}
    if paired:
        tiles_table["subset"] = "ID"
    in_domain = table if paired else table[table["subset"] != "OOD"]
    views = [in_domain.assign(view="ri"),
             (tiles_table if paired else in_domain).assign(view="clustering")]
    if not paired and (table["subset"] == "OOD").any():
        views.append(table.assign(view="apd"))
    name = name or path.stem
    tiles = ManifestTiles(name, [paths[i] for i in np.nonzero(first.to_numpy())[0]], tiles_table["image_path"].tolist())
    view_table = pd.concat(views, ignore_index=True)[list(VIEW_COLUMNS)]
    return PathorobData(name, tiles, tiles_table, view_table, {v: str(path) for v in view_table["view"].unique()})
