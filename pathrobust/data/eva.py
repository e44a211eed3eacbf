"""Readers of the EVA patch-classification datasets in their published layouts.

Each reader returns an :class:`EvaDataset`: class names and labelled splits (``train``,
``val`` and, where the dataset has one, ``test``). Layouts and split rules follow kaiko-ai
eva's dataset classes (``eva.vision.data.datasets.classification``):

* BACH — ``ICIAR2018_BACH_Challenge/Photos/<Benign|InSitu|Invasive|Normal>/*.tif``; the 400
  images sorted like torchvision's ``make_dataset`` (classes in label order, files sorted),
  train/val by eva's fixed index ranges (268 / 132 images, patient-disjoint).
* CRC — ``NCT-CRC-HE-100K/<ADI|BACK|DEB|LYM|MUC|MUS|NORM|STR|TUM>/*.tif`` (train) and
  ``CRC-VAL-HE-7K/<class>/*.tif`` (val).
* MHIST — ``images/*.png`` + ``annotations.csv`` (``Image Name``, ``Majority Vote Label``
  SSA/HP, ``Partition`` train/test); SSA = 0, HP = 1; eva validates (and reports) on the
  test partition, so it is this reader's ``val`` split.
* PatchCamelyon — ``camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5`` with datasets
  ``x`` ``(N, 96, 96, 3)`` uint8 and ``y`` ``(N, 1, 1, 1)`` in {0, 1}.
* BreakHis — ``BreaKHis_v1/histology_slides/**/40X/*.png``; classes TA, MC, F, DC from the
  file name (``SOB_B_TA-14-4659-40-001.png``: class after the last ``_`` of the first ``-``
  field, patient = third field); other subtypes are skipped as eva does; val = eva's 14
  patients.
* Class folders (anything else) — ``train/<class>/*``, ``val/<class>/*`` and optionally
  ``test/<class>/*`` (png/jpg/tif); classes = the train folders, sorted.

:class:`EvaResizeCrop` gives every model eva's geometry: shorter side resized to 224
(torchvision ``Resize``, bilinear with antialias), then a 224 centre crop.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pathrobust.data.tiles import IMAGE_SUFFIXES, TileSource, read_image
from pathrobust.errors import UserError

BACH_CLASSES = ["Benign", "InSitu", "Invasive", "Normal"]
# eva's BACH split (patient-disjoint), half-open index ranges into the 400 sorted images
BACH_TRAIN_RANGES = [(0, 41), (59, 60), (90, 139), (169, 240), (258, 260), (273, 345), (368, 400)]
BACH_VAL_RANGES = [(41, 59), (60, 90), (139, 169), (240, 258), (260, 273), (345, 368)]
BACH_SIZE = 400
CRC_CLASSES = ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]
CRC_TRAIN_DIR, CRC_VAL_DIR = "NCT-CRC-HE-100K", "CRC-VAL-HE-7K"
MHIST_CLASSES = ["SSA", "HP"]
MHIST_COLUMNS = ("Image Name", "Majority Vote Label", "Partition")
PCAM_CLASSES = ["no_tumor", "tumor"]
PCAM_SPLITS = {"train": "train", "val": "valid", "test": "test"}
BREAKHIS_CLASSES = ["TA", "MC", "F", "DC"]
BREAKHIS_VAL_PATIENTS = frozenset({"18842D", "19979", "15275", "15792", "16875", "3909", "5287", "16716", "2773",
                                   "5695", "16184CD", "23060CD", "21998CD", "21998EF"})
BREAKHIS_MAGNIFICATION = "40X"


@dataclass
class LabeledSplit:
    """A split: its tiles and ``labels`` int64 ``(N,)`` in ``[0, C)``."""

    source: TileSource
    labels: np.ndarray


@dataclass
class EvaDataset:
    """One EVA task: class names and its labelled splits."""

    task: str
    classes: list[str]
    splits: dict[str, LabeledSplit]
    root: Path

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def eval_split(self) -> str:
        """Where the best checkpoint is scored: the test split where one exists, else val."""
        return "test" if "test" in self.splits else "val"

    def fingerprint(self) -> str:
        return ";".join(f"{name}={split.source.fingerprint()}" for name, split in sorted(self.splits.items()))


class LabeledFiles(TileSource):
    """Image files with labels (the file list is the reader's, in the dataset's order)."""

    def __init__(self, paths: list[Path], labels: list[int], name: str, base: Path) -> None:
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.name = name
        self.tile_ids = [p.relative_to(base).as_posix() for p in self.paths]
        self.coords = np.stack([np.arange(len(self.paths)), np.zeros(len(self.paths))], 1).astype(np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> np.ndarray:
        return read_image(self.paths[index])


class PCamTiles(TileSource):
    """The ``x`` dataset of a PatchCamelyon h5 file, opened lazily per process."""

    def __init__(self, path: Path, name: str) -> None:
        import h5py

        self.path = path
        self.name = name
        try:
            with h5py.File(path, "r") as f:
                if "x" not in f:
                    raise UserError(f"{path}: no dataset 'x' (PatchCamelyon images)")
                shape = f["x"].shape
        except OSError as exc:
            raise UserError(f"{path}: not a readable h5 file ({exc})") from None
        if len(shape) != 4 or shape[-1] != 3:
            raise UserError(f"{path}: dataset 'x' has shape {shape}; expected (N, H, W, 3)")
        self._len = shape[0]
        self.tile_ids = [f"{path.stem}_{i}" for i in range(self._len)]
        self.coords = np.stack([np.arange(self._len), np.zeros(self._len)], 1).astype(np.int64)
        self._file = None

    def __len__(self) -> int:
        return self._len

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None
        return state

    def fingerprint(self) -> str:
        return f"{self.name}:{self._len}:{self.path.name}"

    def read(self, index: int) -> np.ndarray:
        if self._file is None:
            import h5py

            self._file = h5py.File(self.path, "r")
        return np.asarray(self._file["x"][index], dtype=np.uint8)


class EvaResizeCrop(TileSource):
    """eva's ``ResizeAndCrop`` geometry on any source: ``torchvision.transforms.v2.Resize(size)``
    (shorter side to ``size``, longer side ``int(size * long / short)``, bilinear, antialias)
    then ``CenterCrop(size)``. Normalisation stays with the encoder."""

    def __init__(self, source: TileSource, size: int = 224) -> None:
        self.source = source
        self.size = size
        self.name = source.name
        self.coords = source.coords
        self.tile_ids = source.tile_ids

    def __len__(self) -> int:
        return len(self.source)

    def fingerprint(self) -> str:
        return f"{self.source.fingerprint()}|eva-resize{self.size}-crop{self.size}"

    def read(self, index: int) -> np.ndarray:
        return eva_resize_crop(self.source.read(index), self.size)


def eva_resize_crop(tile: np.ndarray, size: int = 224) -> np.ndarray:
    """uint8 ``(H, W, 3)`` -> uint8 ``(size, size, 3)`` as eva's ``ResizeAndCrop`` (before
    normalisation)."""
    import torch
    from torchvision.transforms.v2 import functional as TF

    t = torch.from_numpy(np.array(tile[..., :3], copy=True)).permute(2, 0, 1)
    if min(t.shape[1:]) != size:
        t = TF.resize(t, [size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    t = TF.center_crop(t, [size, size])
    return t.permute(1, 2, 0).contiguous().numpy()


# -- readers -------------------------------------------------------------------------------
def _class_folder_files(directory: Path, classes: list[str], suffixes: tuple[str, ...], strict: bool) -> tuple[list[Path], list[int]]:
    """torchvision ``make_dataset`` order: classes in label order, files sorted (recursive).
    Missing or empty class folders raise; with ``strict``, so do folders of unknown classes."""
    if not directory.is_dir():
        raise UserError(f"{directory}: missing folder")
    present = sorted(p.name for p in directory.iterdir() if p.is_dir())
    missing = [c for c in classes if c not in present]
    if missing:
        raise UserError(f"{directory}: missing class folder(s) {', '.join(missing)} (expected {', '.join(classes)})")
    unknown = [c for c in present if c not in classes]
    if strict and unknown:
        raise UserError(f"{directory}: unknown label folder(s) {', '.join(unknown)} (expected {', '.join(classes)})")
    paths, labels = [], []
    for label, cls in enumerate(classes):
        files = sorted(p for p in (directory / cls).rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        if not files:
            raise UserError(f"{directory / cls}: no images ({', '.join(suffixes)})")
        paths += files
        labels += [label] * len(files)
    return paths, labels


def _ranges(ranges: list[tuple[int, int]]) -> list[int]:
    return [i for start, stop in ranges for i in range(start, stop)]


def read_bach(root: str | os.PathLike) -> EvaDataset:
    root = Path(root)
    photos = root / "ICIAR2018_BACH_Challenge" / "Photos"
    paths, labels = _class_folder_files(photos, BACH_CLASSES, (".tif",), strict=False)
    if len(paths) != BACH_SIZE:
        raise UserError(f"{photos}: {len(paths)} .tif images; eva's BACH split needs all {BACH_SIZE}")
    splits = {}
    for split, ranges in (("train", BACH_TRAIN_RANGES), ("val", BACH_VAL_RANGES)):
        idx = _ranges(ranges)
        splits[split] = LabeledSplit(LabeledFiles([paths[i] for i in idx], [labels[i] for i in idx], f"bach-{split}", photos),
                                     np.asarray([labels[i] for i in idx], dtype=np.int64))
    return EvaDataset("bach", BACH_CLASSES, splits, root)


def read_crc(root: str | os.PathLike) -> EvaDataset:
    root = Path(root)
    splits = {}
    for split, folder in (("train", CRC_TRAIN_DIR), ("val", CRC_VAL_DIR)):
        paths, labels = _class_folder_files(root / folder, CRC_CLASSES, (".tif",), strict=True)
        splits[split] = LabeledSplit(LabeledFiles(paths, labels, f"crc-{split}", root / folder), np.asarray(labels, np.int64))
    return EvaDataset("crc", CRC_CLASSES, splits, root)


def read_mhist(root: str | os.PathLike) -> EvaDataset:
    root = Path(root)
    csv_path = root / "annotations.csv"
    if not csv_path.is_file():
        raise UserError(f"{csv_path}: missing (MHIST annotations)")
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in MHIST_COLUMNS if c not in header]
        if missing:
            raise UserError(f"{csv_path}: missing column(s) {', '.join(repr(c) for c in missing)}")
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    by_split: dict[str, tuple[list[Path], list[int]]] = {"train": ([], []), "test": ([], [])}
    for line, row in enumerate(rows, start=2):
        label, part = row["Majority Vote Label"], row["Partition"]
        if label not in MHIST_CLASSES:
            raise UserError(f"{csv_path} line {line}: unknown label {label!r} (expected SSA or HP)")
        if part not in by_split:
            raise UserError(f"{csv_path} line {line}: unknown partition {part!r} (expected train or test)")
        path = root / "images" / row["Image Name"]
        if not path.is_file():
            raise UserError(f"{path}: listed in annotations.csv line {line} but missing")
        by_split[part][0].append(path)
        by_split[part][1].append(MHIST_CLASSES.index(label))
    splits = {}
    # eva trains on "train" and validates/reports on "test" (mhist.yaml: val split = test)
    for split, part in (("train", "train"), ("val", "test")):
        paths, labels = by_split[part]
        if not paths:
            raise UserError(f"{csv_path}: no images in partition {part!r}")
        splits[split] = LabeledSplit(LabeledFiles(paths, labels, f"mhist-{part}", root / "images"), np.asarray(labels, np.int64))
    return EvaDataset("mhist", MHIST_CLASSES, splits, root)


def read_pcam(root: str | os.PathLike) -> EvaDataset:
    import h5py

    root = Path(root)
    splits = {}
    for split, suffix in PCAM_SPLITS.items():
        x_path = root / f"camelyonpatch_level_2_split_{suffix}_x.h5"
        y_path = root / f"camelyonpatch_level_2_split_{suffix}_y.h5"
        for p in (x_path, y_path):
            if not p.is_file():
                raise UserError(f"{p}: missing (PatchCamelyon {split} split)")
        try:
            with h5py.File(y_path, "r") as f:
                if "y" not in f:
                    raise UserError(f"{y_path}: no dataset 'y' (PatchCamelyon labels)")
                labels = np.asarray(f["y"][:]).reshape(-1).astype(np.int64)
        except OSError as exc:
            raise UserError(f"{y_path}: not a readable h5 file ({exc})") from None
        bad = np.setdiff1d(np.unique(labels), [0, 1])
        if len(bad):
            raise UserError(f"{y_path}: unknown label(s) {bad.tolist()} (expected 0 or 1)")
        tiles = PCamTiles(x_path, f"pcam-{split}")
        if len(tiles) != len(labels):
            raise UserError(f"{x_path}: {len(tiles)} images but {y_path.name} has {len(labels)} labels")
        splits[split] = LabeledSplit(tiles, labels)
    return EvaDataset("patch_camelyon", PCAM_CLASSES, splits, root)


def read_breakhis(root: str | os.PathLike) -> EvaDataset:
    root = Path(root)
    slides = root / "BreaKHis_v1" / "histology_slides"
    if not slides.is_dir():
        raise UserError(f"{slides}: missing folder")
    files = sorted(p for p in slides.rglob("*.png") if p.parent.name == BREAKHIS_MAGNIFICATION)
    parts: dict[str, tuple[list[Path], list[int]]] = {"train": ([], []), "val": ([], [])}
    for path in files:
        fields = path.name.split("-")
        if len(fields) < 3:
            raise UserError(f"{path}: not a BreakHis file name (SOB_<B|M>_<type>-<year>-<patient>-<mag>-<seq>.png)")
        cls = fields[0].split("_")[-1]
        if cls not in BREAKHIS_CLASSES:
            continue  # eva uses the four subtypes TA, MC, F, DC only
        split = "val" if fields[2] in BREAKHIS_VAL_PATIENTS else "train"
        parts[split][0].append(path)
        parts[split][1].append(BREAKHIS_CLASSES.index(cls))
    splits = {}
    for split, (paths, labels) in parts.items():
        if not paths:
            raise UserError(f"{slides}: no {BREAKHIS_MAGNIFICATION} images of {', '.join(BREAKHIS_CLASSES)} in the {split} split")
        splits[split] = LabeledSplit(LabeledFiles(paths, labels, f"breakhis-{split}", slides), np.asarray(labels, np.int64))
    return EvaDataset("breakhis", BREAKHIS_CLASSES, splits, root)


def read_class_folders(root: str | os.PathLike, task: str | None = None) -> EvaDataset:
    """``train/<class>/``, ``val/<class>/`` and optionally ``test/<class>/``."""
    root = Path(root)
    train = root / "train"
    if not train.is_dir():
        raise UserError(f"{root}: not a class-folder dataset (no train/ folder)")
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"{train}: no class folders")
    if not (root / "val").is_dir():
        raise UserError(f"{root / 'val'}: missing folder")
    splits = {}
    for split in ("train", "val", "test"):
        directory = root / split
        if split == "test" and not directory.is_dir():
            continue
        present = sorted(p.name for p in directory.iterdir() if p.is_dir())
        unknown = [c for c in present if c not in classes]
        if unknown:
            raise UserError(f"{directory}: unknown label folder(s) {', '.join(unknown)} (train has {', '.join(classes)})")
        paths, labels = [], []
        for label, cls in enumerate(classes):
            if cls not in present:
                if split == "train":
                    continue
                raise UserError(f"{directory}: missing class folder {cls}")
            files = sorted(p for p in (directory / cls).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise UserError(f"{directory / cls}: no images ({', '.join(IMAGE_SUFFIXES)})")
            paths += files
            labels += [label] * len(files)
        name = task or root.name
        splits[split] = LabeledSplit(LabeledFiles(paths, labels, f"{name}-{split}", directory), np.asarray(labels, np.int64))
    return EvaDataset(task or root.name, classes, splits, root)


# -- discovery -----------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskLayout:
    reader: Callable[[Path], EvaDataset]
    marker: Callable[[Path], bool]


TASKS: dict[str, TaskLayout] = {
    "bach": TaskLayout(read_bach, lambda p: (p / "ICIAR2018_BACH_Challenge").is_dir()),
    "crc": TaskLayout(read_crc, lambda p: (p / CRC_TRAIN_DIR).is_dir() or (p / CRC_VAL_DIR).is_dir()),
    "mhist": TaskLayout(read_mhist, lambda p: (p / "annotations.csv").is_file()),
    "patch_camelyon": TaskLayout(read_pcam, lambda p: any(p.glob("camelyonpatch_level_2_split_*.h5"))),
    "breakhis": TaskLayout(read_breakhis, lambda p: (p / "BreaKHis_v1").is_dir()),
}
TASK_ALIASES = {"pcam": "patch_camelyon", "patchcamelyon": "patch_camelyon", "nct-crc": "crc"}


def identify(path: Path) -> str | None:
    """What the folder holds: a patch task's name (``bach``, ``crc``...), ``class_folder``,
    ``dense:<layout>`` (:func:`pathrobust.data.eva_dense.dense_layout`: ``consep``,
    ``monusac``, ``generic``, ``synthetic``), or None. Dense layouts are checked first (the
    generic one has ``train/`` folders too)."""
    from pathrobust.data.eva_dense import dense_layout

    layout = dense_layout(path)
    if layout is not None:
        return f"dense:{layout}"
    for name, layout in TASKS.items():
        if layout.marker(path):
            return name
    return "class_folder" if (path / "train").is_dir() else None


def _dataset_name(kind: str, path: Path) -> str:
    if kind in TASKS:
        return kind
    if kind in ("dense:consep", "dense:monusac"):
        return kind.split(":", 1)[1]
    return path.name  # class folders and generic / synthetic dense data: the folder's name


def discover_datasets(data_root: str | os.PathLike) -> dict[str, tuple[str, Path]]:
    """Every EVA dataset under ``data_root``: name -> (kind, root), ``kind`` as
    :func:`identify` says (eva's ``${DATA_ROOT}/<task>`` layout; ``data_root`` may itself be
    one dataset). An empty result is a one-line error."""
    root = Path(data_root)
    if not root.is_dir():
        raise UserError(f"--data {root}: not a directory")
    found: dict[str, tuple[str, Path]] = {}
    own = identify(root)
    if own is not None:
        found[_dataset_name(own, root)] = (own, root)
    else:
        for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            kind = identify(sub)
            if kind is not None:
                found.setdefault(_dataset_name(kind, sub), (kind, sub))
    if not found:
        raise UserError(f"--data {root}: no EVA dataset found (expected bach/, crc/, mhist/, patch_camelyon/, "
                        "breakhis/, consep/, monusac/ in their published layouts, train/ + val/ class folders, "
                        "or image + mask folders with a dataset.json)")
    return found


def discover_tasks(data_root: str | os.PathLike, tasks: list[str] | None = None) -> dict[str, Path]:
    """Map patch task name -> dataset root under ``data_root`` (eva's ``${DATA_ROOT}/<task>``
    layout: ``bach/``, ``crc/``, ``mhist/``, ``patch_camelyon/``, ``breakhis/``; any other
    folder with ``train/`` class folders is a task of its own; dense datasets are left out).
    ``data_root`` may itself be one dataset. ``tasks`` selects (names or aliases); unknown or
    absent ones raise."""
    root = Path(data_root)
    found = {name: path for name, (kind, path) in discover_datasets(root).items() if not kind.startswith("dense:")}
    if tasks:
        wanted = [TASK_ALIASES.get(t.strip().lower(), t.strip().lower()) for t in tasks if t.strip()]
        absent = [t for t in wanted if t not in found]
        if absent:
            have = ", ".join(found) or "none"
            raise UserError(f"--tasks {','.join(absent)}: not found under {root} (found: {have})")
        found = {t: found[t] for t in wanted}
    if not found:
        raise UserError(f"--data {root}: no EVA patch-classification dataset found (expected bach/, crc/, mhist/, "
                        "patch_camelyon/, breakhis/ in their published layouts, or train/ + val/ class folders)")
    return found


def read_task(name: str, root: Path) -> EvaDataset:
    """Read task ``name`` (a known task, or a class-folder dataset) from ``root``."""
    if name in TASKS:
        return TASKS[name].reader(root)
    return read_class_folders(root, task=name)
