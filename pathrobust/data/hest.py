"""Reader of the HEST-Benchmark layout (Hugging Face dataset ``MahmoodLab/hest-bench``).

Per task folder (``<bench_root>/<TASK>/``)::

    patches/<sample_id>.h5      img uint8 (N, 224, 224, 3), barcode (N, 1), coords (N, 2)
    adata/<sample_id>.h5ad      raw counts, spots x genes, obs index = barcode
    splits/train_<i>.csv        sample_id, patches_path, expr_path (relative to the task folder)
    splits/test_<i>.csv
    var_50genes.json            {"genes": [...]}

and HEST's embedding cache, ``<embed_root>/<TASK>/<encoder>/<sample_id>.h5`` with
``embeddings`` (N, D), ``barcodes`` (N, 1) and ``coords`` (N, 2) — what
``hest.bench.benchmark.embed_tiles`` writes and ``predict_single_split`` reads.

Everything here checks what the reference takes on trust: split paths stay inside the task
folder, the files exist, the barcodes of the patches are spots of the expression matrix, the
genes are columns of it, and the counts are finite and non-negative. Each failure is one
:class:`UserError` line naming the file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pathrobust.errors import UserError

SPLIT_COLUMNS = ("sample_id", "patches_path", "expr_path")
_SPLIT_RE = re.compile(r"^(train|test)_(\d+)\.csv$")


@dataclass(frozen=True)
class HestSample:
    sample_id: str
    patches_path: Path
    expr_path: Path


@dataclass(frozen=True)
class HestFold:
    index: int
    train: tuple[HestSample, ...]
    test: tuple[HestSample, ...]


@dataclass(frozen=True)
class HestTask:
    name: str
    root: Path
    genes: tuple[str, ...]
    folds: tuple[HestFold, ...]

    @property
    def samples(self) -> list[HestSample]:
        """Every sample of every fold, once, in first-seen order."""
        seen: dict[str, HestSample] = {}
        for fold in self.folds:
            for s in fold.train + fold.test:
                seen.setdefault(s.sample_id, s)
        return list(seen.values())


def list_tasks(bench_root: str | os.PathLike) -> list[str]:
    """Task folders of a benchmark root: sub-folders that hold a ``splits/`` folder."""
    root = Path(bench_root)
    if not root.is_dir():
        raise UserError(f"--data {root}: not a directory (expected a hest-bench root with one folder per task)")
    tasks = sorted(p.name for p in root.iterdir() if (p / "splits").is_dir())
    if not tasks:
        raise UserError(f"--data {root}: no task folders (sub-folders with splits/) found")
    return tasks


def _inside(root: Path, relative: str, csv: Path, column: str) -> Path:
    # checked on the path as written (not resolved): the Hugging Face cache stores every file
    # as a symlink into its blobs/ folder, which is outside the task folder by design
    path = Path(os.path.normpath(os.path.abspath(root / relative)))
    if not path.is_relative_to(Path(os.path.normpath(os.path.abspath(root)))):
        raise UserError(f"{csv}: {column} '{relative}' points outside the task folder {root}")
    return path


def read_split(csv: Path, root: Path, require_patches: bool = True) -> tuple[HestSample, ...]:
    """One split CSV -> its samples (paths resolved and checked to stay inside ``root``; the
    patches must exist unless ``require_patches`` is off, as when embeddings are given)."""
    import pandas as pd

    try:
        df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"{csv}: not a readable CSV ({exc})") from None
    missing = [c for c in SPLIT_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{csv}: missing column(s) {', '.join(missing)} (expected {', '.join(SPLIT_COLUMNS)})")
    if df.empty:
        raise UserError(f"{csv}: no samples")
    samples = []
    for row in df.itertuples(index=False):
        sid = str(row.sample_id)
        if not sid or "/" in sid or "\\" in sid or sid in (".", ".."):
            raise UserError(f"{csv}: sample_id '{sid}' is not a plain name")
        patches = _inside(root, row.patches_path, csv, "patches_path")
        expr = _inside(root, row.expr_path, csv, "expr_path")
        if require_patches and not patches.is_file():
            raise UserError(f"{csv}: patches file {row.patches_path} of sample {sid} does not exist")
        if not expr.is_file():
            raise UserError(f"{csv}: expression file (h5ad) {row.expr_path} of sample {sid} does not exist")
        samples.append(HestSample(sid, patches, expr))
    return tuple(samples)


def load_task(task_dir: str | os.PathLike, gene_list: str = "var_50genes.json",
              require_patches: bool = True) -> HestTask:
    """Read one task folder: its gene list and every ``train_<i>.csv``/``test_<i>.csv`` pair."""
    root = Path(task_dir)
    if not root.is_dir():
        raise UserError(f"{root}: no such task folder")
    genes_file = root / gene_list
    try:
        genes = json.loads(genes_file.read_text())["genes"]
    except FileNotFoundError:
        raise UserError(f"{genes_file}: gene list not found") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f'{genes_file}: expected JSON {{"genes": [...]}}') from None
    if not genes or not all(isinstance(g, str) for g in genes) or len(set(genes)) != len(genes):
        raise UserError(f"{genes_file}: 'genes' must be a non-empty list of distinct names")
    split_dir = root / "splits"
    if not split_dir.is_dir():
        raise UserError(f"{split_dir}: no splits folder")
    found: dict[int, dict[str, Path]] = {}
    for p in split_dir.iterdir():
        m = _SPLIT_RE.match(p.name)
        if m:
            found.setdefault(int(m.group(2)), {})[m.group(1)] = p
    if not found:
        raise UserError(f"{split_dir}: no train_<i>.csv / test_<i>.csv files")
    folds = []
    for i in sorted(found):
        pair = found[i]
        for kind in ("train", "test"):
            if kind not in pair:
                raise UserError(f"{split_dir}: {kind}_{i}.csv is missing (fold {i} needs both train and test)")
        folds.append(HestFold(i, read_split(pair["train"], root, require_patches),
                              read_split(pair["test"], root, require_patches)))
    return HestTask(root.name, root, tuple(genes), tuple(folds))


def _decode(values: Any) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(values).reshape(-1)]


def read_patch_index(path: Path) -> tuple[list[str], np.ndarray]:
    """Barcodes and coords of a patches h5 (without reading the images)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "barcode" not in f and "barcodes" not in f:
                raise UserError(f"{path}: no 'barcode' dataset")
            barcodes = _decode(f["barcode" if "barcode" in f else "barcodes"][:])
            coords = np.asarray(f["coords"][:], dtype=np.int64).reshape(-1, 2) if "coords" in f else \
                np.zeros((len(barcodes), 2), np.int64)
            n_img = f["img"].shape[0] if "img" in f else None
    except OSError as exc:
        raise UserError(f"{path}: not a readable h5 file ({exc})") from None
    if n_img is not None and n_img != len(barcodes):
        raise UserError(f"{path}: {n_img} images but {len(barcodes)} barcodes")
    _check_unique(barcodes, path)
    return barcodes, coords


def _check_unique(barcodes: list[str], path: Path) -> None:
    if len(set(barcodes)) != len(barcodes):
        dup = next(b for i, b in enumerate(barcodes) if b in barcodes[:i])
        raise UserError(f"{path}: barcode '{dup}' appears more than once")


def read_expression(expr_path: Path, barcodes: list[str], genes: tuple[str, ...] | list[str], *,
                    log1p: bool = True, barcodes_from: Path | None = None) -> np.ndarray:
    """Expression ``(len(barcodes), len(genes))`` float64 of the given spots and genes.

    As the reference's ``load_adata(expr_path, genes, barcodes, normalize=True)``: rows in the
    order of ``barcodes``, columns in the order of ``genes``, then ``log1p`` of the raw counts
    (no library-size normalisation)."""
    import anndata
    import scipy.sparse as sp

    try:
        adata = anndata.read_h5ad(expr_path)
    except FileNotFoundError:
        raise UserError(f"{expr_path}: expression file (h5ad) does not exist") from None
    except Exception as exc:  # anndata raises many types for a broken file
        raise UserError(f"{expr_path}: not a readable h5ad file ({type(exc).__name__}: {exc})") from None
    rows = adata.obs_names.get_indexer(barcodes)
    if (rows < 0).any():
        bad = [b for b, r in zip(barcodes, rows) if r < 0]
        src = f" of {barcodes_from}" if barcodes_from else ""
        raise UserError(f"{expr_path}: {len(bad)} barcode(s){src} are not spots of this expression matrix "
                        f"(e.g. '{bad[0]}')")
    cols = adata.var_names.get_indexer(list(genes))
    if (cols < 0).any():
        bad = [g for g, c in zip(genes, cols) if c < 0]
        raise UserError(f"{expr_path}: {len(bad)} gene(s) of the gene list are not in this expression matrix "
                        f"(e.g. '{bad[0]}')")
    X = adata.X[rows][:, cols]
    X = np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64)
    if not np.isfinite(X).all():
        r, c = np.argwhere(~np.isfinite(X))[0]
        raise UserError(f"{expr_path}: expression has NaN/inf values (e.g. spot '{barcodes[r]}', gene '{genes[c]}')")
    if (X < 0).any():
        r, c = np.argwhere(X < 0)[0]
        raise UserError(f"{expr_path}: negative counts (e.g. spot '{barcodes[r]}', gene '{genes[c]}'); "
                        "expected raw counts")
    return np.log1p(X) if log1p else X


# -- HEST embedding cache -------------------------------------------------------------------
@dataclass
class HestEmbeddings:
    embeddings: np.ndarray
    barcodes: list[str]
    coords: np.ndarray
    attrs: dict[str, Any]


def embedding_path(embed_root: str | os.PathLike, task: str, encoder: str, sample_id: str) -> Path:
    """``<embed_root>/<TASK>/<encoder>/<sample_id>.h5`` (HEST's cache layout)."""
    return Path(embed_root) / task / encoder / f"{sample_id}.h5"


def read_embeddings(path: Path) -> HestEmbeddings:
    """Read one HEST embedding file (``embeddings``, ``barcodes``, ``coords``)."""
    import h5py

    from pathrobust.extract import _attr_value

    if not path.is_file():
        raise UserError(f"{path}: embedding file does not exist")
    try:
        with h5py.File(path, "r") as f:
            for key in ("embeddings", "barcodes"):
                if key not in f:
                    raise UserError(f"{path}: no '{key}' dataset (expected HEST's embeddings/barcodes/coords)")
            emb = np.asarray(f["embeddings"][:], dtype=np.float32)
            barcodes = _decode(f["barcodes"][:])
            coords = np.asarray(f["coords"][:], dtype=np.int64).reshape(-1, 2) if "coords" in f else \
                np.zeros((len(barcodes), 2), np.int64)
            attrs = {k: _attr_value(v) for k, v in f.attrs.items()}
    except OSError as exc:
        raise UserError(f"{path}: not a readable h5 file ({exc})") from None
    if emb.ndim != 2 or len(emb) != len(barcodes):
        raise UserError(f"{path}: embeddings {emb.shape} do not match {len(barcodes)} barcodes")
    if not np.isfinite(emb).all():
        raise UserError(f"{path}: embeddings contain NaN/inf")
    _check_unique(barcodes, path)
    return HestEmbeddings(emb, barcodes, coords, attrs)


def write_embeddings(path: Path, embeddings: np.ndarray, barcodes: list[str], coords: np.ndarray,
                     attrs: dict[str, Any] | None = None) -> None:
    """Write one HEST embedding file atomically: ``embeddings`` float32 (N, D), ``barcodes``
    bytes (N, 1) and ``coords`` (N, 2), as ``embed_tiles``/``save_hdf5`` lay them out."""
    import h5py

    from pathrobust import atomic

    with atomic.atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("embeddings", data=np.asarray(embeddings, dtype=np.float32), track_times=False)
            f.create_dataset("barcodes", data=np.array([b.encode() for b in barcodes], dtype="S").reshape(-1, 1),
                             track_times=False)
            f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64).reshape(-1, 2), track_times=False)
            for key in sorted(attrs or {}):
                value = attrs[key]
                f.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
