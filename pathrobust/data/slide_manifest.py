"""Slide manifests: the slides (or feature bags) of a slide-level task, their labels, splits and
patients, and — for cross-acquisition robustness — specimens and acquisitions.

CSV columns (one row per slide; paths relative to the CSV's folder):

=================  ============================================================================
``slide_id``       unique; names the feature file (``<slide_id>.h5``)
``path``           the slide file (anything OpenSlide opens) — or, instead or as well,
``features``       a feature bag (pathrobust/TRIDENT/CLAM ``.h5``, CLAM ``.pt``)
``label``          class name, from the task's vocabulary when one is given
``split``          ``train`` / ``val`` / ``test`` — or ``fold``: an integer fold number
``patient_id``     a patient's slides must all lie in one split (no leakage)
``specimen_id``    robustness: one physical slide, digitised under several acquisitions
``acquisition``    robustness: the scanner / staining / site of this digitisation
``scanner``,       optional: the axes of the scanner x staining concordance heatmap
``staining``
=================  ============================================================================

Bad input raises one-line :class:`~pathrobust.errors.UserError` naming the file, row and
column. Readers for eva's own layouts build the same manifest: :func:`camelyon16_manifest`
(``training/{normal,tumor}/*.tif``, ``testing/images/*.tif``, ``testing/reference.csv``; eva's
validation slides) and :func:`panda_manifest` (``train_images/*.tiff`` and
``train_with_noisy_labels.csv``; eva's noisy-label filter and stratified split, seed 42).
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pathrobust.errors import UserError

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"training": "train", "validation": "val", "valid": "val", "testing": "test"}
REQUIRED = ("slide_id", "label", "patient_id")
ROBUSTNESS = ("specimen_id", "acquisition")
COLUMNS = ("slide_id", "path", "features", "label", "split", "fold", "patient_id", "specimen_id", "acquisition",
           "scanner", "staining")


@dataclass(frozen=True)
class SlideRecord:
    """One row of a manifest. ``path``/``features`` are absolute (or ``None``); ``label_index``
    is the label's position in the manifest's ``classes``."""

    slide_id: str
    label: str
    label_index: int
    patient_id: str
    path: Path | None = None
    features: Path | None = None
    split: str | None = None
    fold: int | None = None
    specimen_id: str | None = None
    acquisition: str | None = None
    scanner: str | None = None
    staining: str | None = None


@dataclass(frozen=True)
class SlideManifest:
    """The rows of a manifest (CSV order) and the label vocabulary (``classes[i]`` = label ``i``)."""

    source: Path
    records: tuple[SlideRecord, ...]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def has_folds(self) -> bool:
        return any(r.fold is not None for r in self.records)

    @property
    def folds(self) -> list[int]:
        return sorted({r.fold for r in self.records if r.fold is not None})

    @property
    def acquisitions(self) -> list[str]:
        """Acquisitions in order of first appearance."""
        return list(dict.fromkeys(r.acquisition for r in self.records if r.acquisition is not None))

    def select(self, *, split: str | None = None, acquisition: str | None = None,
               folds: Sequence[int] | None = None) -> list[SlideRecord]:
        """Rows of one split (and/or acquisition, and/or folds), in manifest order."""
        rows = list(self.records)
        if split is not None:
            rows = [r for r in rows if r.split == split]
        if acquisition is not None:
            rows = [r for r in rows if r.acquisition == acquisition]
        if folds is not None:
            wanted = set(folds)
            rows = [r for r in rows if r.fold in wanted]
        return rows

    def fold_splits(self, test_fold: int) -> dict[str, list[int]]:
        """pathrobust's convention for ``fold`` manifests: fold ``k`` is the test split, the next
        fold (cyclically) the validation split, the others train. Returns ``{split: folds}``."""
        folds = self.folds
        if test_fold not in folds:
            raise UserError(f"{self.source}: no fold {test_fold} (folds: {', '.join(map(str, folds))})")
        if len(folds) < 3:
            raise UserError(f"{self.source}: column 'fold' has {len(folds)} folds; train/val/test need >= 3")
        val_fold = folds[(folds.index(test_fold) + 1) % len(folds)]
        return {"train": [f for f in folds if f not in (test_fold, val_fold)], "val": [val_fold], "test": [test_fold]}


def labels_of(records: Sequence[SlideRecord]) -> np.ndarray:
    """int64 ``(N,)`` label indices of ``records``."""
    return np.array([r.label_index for r in records], dtype=np.int64)


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: cannot read the manifest ({type(exc).__name__}: {exc})") from None
    return header, rows


def read_slide_manifest(path: str | os.PathLike, classes: Sequence[str] | None = None, *, robustness: bool = False,
                        check_files: bool = True, open_slides: bool = False) -> SlideManifest:
    """Read and validate a slide manifest (see the module doc).

    Args:
        path: the CSV.
        classes: the label vocabulary in index order; ``None``: the sorted labels found.
        robustness: require ``specimen_id`` and ``acquisition``, every specimen under >= 2
            acquisitions with one label and one split.
        check_files: every ``path``/``features`` file must exist.
        open_slides: also open every slide with OpenSlide (catches files it cannot read).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such manifest file")
    header, rows = _read_rows(path)
    need = list(REQUIRED) + (list(ROBUSTNESS) if robustness else [])
    for column in need:
        if column not in header:
            raise UserError(f"{path}: missing column '{column}' (has: {', '.join(header) or 'none'})")
    if "path" not in header and "features" not in header:
        raise UserError(f"{path}: missing column 'path' (or 'features') (has: {', '.join(header)})")
    if "split" not in header and "fold" not in header:
        raise UserError(f"{path}: missing column 'split' (or 'fold') (has: {', '.join(header)})")
    if not rows:
        raise UserError(f"{path}: no rows")
    present = [c for c in COLUMNS if c in header]
    either = [[c for c in pair if c in header] for pair in (("path", "features"), ("split", "fold"))]
    for i, row in enumerate(rows, start=2):  # line numbers as an editor shows them (header = line 1)
        for column in need:
            if not row.get(column):
                raise UserError(f"{path}: line {i}: empty '{column}'")
        for columns in either:
            if not any(row.get(c) for c in columns):
                raise UserError(f"{path}: line {i}: empty '{' and '.join(columns)}'")
    vocabulary = tuple(classes) if classes is not None else tuple(sorted({r["label"] for r in rows}))
    index = {c: k for k, c in enumerate(vocabulary)}
    base = path.parent
    records, seen = [], {}
    for i, row in enumerate(rows, start=2):
        sid = row["slide_id"]
        if sid in seen:
            raise UserError(f"{path}: line {i}: slide_id '{sid}' repeats line {seen[sid]}")
        if any(ch in sid for ch in "/\\") or sid in (".", ".."):
            raise UserError(f"{path}: line {i}: slide_id '{sid}' must not contain a path separator")
        seen[sid] = i
        if row["label"] not in index:
            raise UserError(f"{path}: line {i}: unknown label '{row['label']}' in column 'label' "
                            f"(known: {', '.join(vocabulary)})")
        split = fold = None
        if "split" in present and row.get("split"):
            split = _SPLIT_ALIASES.get(row["split"].lower(), row["split"].lower())
            if split not in SPLITS:
                raise UserError(f"{path}: line {i}: unknown split '{row['split']}' in column 'split' "
                                f"(expected {', '.join(SPLITS)})")
        if "fold" in present and row.get("fold"):
            try:
                fold = int(row["fold"])
            except ValueError:
                raise UserError(f"{path}: line {i}: fold '{row['fold']}' in column 'fold' is not an integer") from None
        files = {}
        for column in ("path", "features"):
            value = row.get(column) if column in present else None
            if value:
                file = Path(value) if Path(value).is_absolute() else base / value
                if check_files and not file.is_file():
                    kind = "slide" if column == "path" else "feature"
                    raise UserError(f"{path}: line {i}: column '{column}': {file}: no such {kind} file")
                files[column] = file
        records.append(SlideRecord(
            slide_id=sid, label=row["label"], label_index=index[row["label"]], patient_id=row["patient_id"],
            path=files.get("path"), features=files.get("features"), split=split, fold=fold,
            specimen_id=row.get("specimen_id") or None, acquisition=row.get("acquisition") or None,
            scanner=row.get("scanner") or None, staining=row.get("staining") or None))
    manifest = SlideManifest(path, tuple(records), vocabulary)
    _check_no_leakage(manifest)
    if robustness:
        check_robustness(manifest)
    if open_slides:
        check_slides_open(manifest)
    return manifest


def _check_no_leakage(manifest: SlideManifest) -> None:
    """A patient's slides in two splits (or folds) would leak; so would a specimen's."""
    for key in ("patient_id", "specimen_id"):
        where: dict[str, set] = defaultdict(set)
        for r in manifest.records:
            owner = getattr(r, key)
            if owner is not None:
                where[owner].add(r.split if r.fold is None else r.fold)
        for owner, parts in where.items():
            if len(parts) > 1:
                raise UserError(f"{manifest.source}: column '{key}': {owner} has slides in splits "
                                f"{', '.join(sorted(map(str, parts)))}; one {key.split('_')[0]}'s slides must share a split")


def check_robustness(manifest: SlideManifest, reference: str | None = None) -> None:
    """Cross-acquisition requirements: ``specimen_id`` and ``acquisition`` on every row, every
    specimen under >= 2 acquisitions (at most once each) with a single label, and the
    ``reference`` acquisition (when named) present."""
    src = manifest.source
    by_specimen: dict[str, list[SlideRecord]] = defaultdict(list)
    for r in manifest.records:
        if r.specimen_id is None or r.acquisition is None:
            raise UserError(f"{src}: slide {r.slide_id}: empty 'specimen_id' or 'acquisition' (needed for robustness)")
        by_specimen[r.specimen_id].append(r)
    acquisitions = manifest.acquisitions
    if reference is not None and reference not in acquisitions:
        raise UserError(f"{src}: column 'acquisition': no slide under the reference acquisition '{reference}' "
                        f"(found: {', '.join(acquisitions)})")
    for specimen, rows in by_specimen.items():
        acqs = [r.acquisition for r in rows]
        if len(set(acqs)) < 2:
            raise UserError(f"{src}: column 'specimen_id': specimen {specimen} appears under one acquisition only "
                            f"({acqs[0]}); concordance needs each specimen under >= 2")
        if len(set(acqs)) < len(acqs):
            dup = next(a for a in acqs if acqs.count(a) > 1)
            raise UserError(f"{src}: column 'acquisition': specimen {specimen} has two slides under {dup}")
        if len({r.label for r in rows}) > 1:
            raise UserError(f"{src}: column 'label': specimen {specimen} has labels "
                            f"{', '.join(sorted({r.label for r in rows}))} across acquisitions")


def check_slides_open(manifest: SlideManifest) -> None:
    """Open (and close) every slide with OpenSlide: a file it cannot read is a one-line error."""
    from pathrobust.data.slides import open_slide

    for r in manifest.records:
        if r.path is not None:
            open_slide(r.path).close()


def write_slide_manifest(path: str | os.PathLike, records: Sequence[SlideRecord]) -> Path:
    """Write ``records`` as a manifest CSV (paths relative to its folder when below it);
    atomically (temporary name, then rename)."""
    path = Path(path)
    columns = [c for c in COLUMNS if any(getattr(r, c) is not None for r in records) or c in REQUIRED]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for r in records:
            writer.writerow([_cell(getattr(r, c), path.parent) for c in columns])
    os.replace(tmp, path)
    return path


def _cell(value, base: Path) -> str:
    if value is None:
        return ""
    if isinstance(value, Path):
        try:
            return value.relative_to(base).as_posix()
        except ValueError:
            return str(value)
    return str(value)


# -- eva's layouts ------------------------------------------------------------------------
CAMELYON16_CLASSES = ("normal", "tumor")
# eva Camelyon16._val_slides: PatchCamelyon's validation slides
CAMELYON16_VAL = tuple(
    [f"normal_{i:03d}" for i in (10, 13, 16, 17, 19, 20, 25, 30, 31, 32, 52, 56, 57, 67, 76, 79, 85, 95, 98, 99,
                                 101, 102, 105, 106, 109, 129, 132, 137, 142, 143, 148, 152)]
    + [f"tumor_{i:03d}" for i in (1, 5, 11, 12, 13, 19, 31, 37, 43, 46, 57, 65, 69, 71, 73, 79, 80, 81, 82, 85,
                                  97, 109)])


def camelyon16_manifest(root: str | os.PathLike) -> SlideManifest:
    """eva's Camelyon16: ``training/<normal|tumor>/*.tif`` (class from the name's prefix; eva's
    validation slides to ``val``, the rest ``train``) and ``testing/images/*.tif`` (``test``,
    labels from ``testing/reference.csv``: no header, id then Normal/Tumor). Patients are not
    published: ``patient_id`` = slide id."""
    root = Path(root)
    for folder in ("training/normal", "training/tumor", "testing/images"):
        if not (root / folder).is_dir():
            raise UserError(f"{root}: not a Camelyon16 root (no '{folder}' folder)")
    reference = root / "testing" / "reference.csv"
    if not reference.is_file():
        raise UserError(f"{root}: not a Camelyon16 root (no 'testing/reference.csv')")
    test_labels = {}
    with open(reference, newline="") as fh:
        for line, row in enumerate(csv.reader(fh), start=1):
            if len(row) < 2:
                raise UserError(f"{reference}: line {line}: expected '<slide>,<Normal|Tumor>,...'")
            test_labels[row[0].strip()] = row[1].strip().lower()
    records = []
    for file in sorted(root.glob("training/*/*.tif")):
        sid = file.name.replace(".tif", "")
        label = sid.split("_")[0]
        if label not in CAMELYON16_CLASSES:
            raise UserError(f"{file}: slide name does not start with normal_ or tumor_")
        records.append(_record(sid, label, CAMELYON16_CLASSES, file, "val" if sid in CAMELYON16_VAL else "train"))
    for file in sorted((root / "testing" / "images").glob("*.tif")):
        sid = file.name.replace(".tif", "")
        if sid not in test_labels:
            raise UserError(f"{reference}: no label for test slide {sid}")
        if test_labels[sid] not in CAMELYON16_CLASSES:
            raise UserError(f"{reference}: unknown label '{test_labels[sid]}' for {sid} (known: normal, tumor)")
        records.append(_record(sid, test_labels[sid], CAMELYON16_CLASSES, file, "test"))
    if not records:
        raise UserError(f"{root}: no Camelyon16 slides (*.tif)")
    records.sort(key=lambda r: (SPLITS.index(r.split), r.path.relative_to(root).as_posix()))
    return SlideManifest(root, tuple(records), CAMELYON16_CLASSES)


PANDA_CLASSES = ("0", "1", "2", "3", "4", "5")
PANDA_LABELS_CSV = "train_with_noisy_labels.csv"
PANDA_RATIOS = {"full": (0.7, 0.15, 0.15), "small": (0.1, 0.05, 0.05)}  # eva PANDA / PANDASmall


def panda_manifest(root: str | os.PathLike, labels_csv: str | os.PathLike | None = None, small: bool = True,
                   seed: int = 42) -> SlideManifest:
    """eva's PANDA / PANDASmall: ``train_images/*.tiff`` (sorted) labelled by ISUP grade from
    ``train_with_noisy_labels.csv`` (``image_id``, ``isup_grade``, ``noise_ratio_10``; default
    ``<root>/train_with_noisy_labels.csv``), which must list exactly the images found; the
    rows eva keeps (``noise_ratio_10 != 0``, as its filter reads); eva's stratified split
    (:func:`stratified_split`; PANDASmall 0.1 / 0.05 / 0.05 of the slides, PANDA 0.7 / 0.15 /
    0.15) with ``seed``. Slides outside the three splits are left out. ``patient_id`` = image id."""
    root = Path(root)
    images = root / "train_images"
    if not images.is_dir():
        raise UserError(f"{root}: not a PANDA root (no 'train_images' folder)")
    table = Path(labels_csv) if labels_csv else root / PANDA_LABELS_CSV
    if not table.is_file():
        raise UserError(f"{table}: no such file (PANDA labels with noise_ratio_10, eva's {PANDA_LABELS_CSV})")
    header, rows = _read_rows(table)
    for column in ("image_id", "isup_grade", "noise_ratio_10"):
        if column not in header:
            raise UserError(f"{table}: missing column '{column}' (has: {', '.join(header)})")
    annotations = {}
    for line, row in enumerate(rows, start=2):
        try:
            annotations[row["image_id"]] = (int(row["isup_grade"]), float(row["noise_ratio_10"]))
        except ValueError:
            raise UserError(f"{table}: line {line}: isup_grade / noise_ratio_10 not numeric") from None
        if not 0 <= annotations[row["image_id"]][0] <= 5:
            raise UserError(f"{table}: line {line}: unknown label '{row['isup_grade']}' in column 'isup_grade' (0-5)")
    files = sorted(images.glob("*.tiff"))
    if len(files) != len(annotations):
        raise UserError(f"{images}: {len(files)} .tiff slides, but {table} lists {len(annotations)} (eva requires all)")
    missing = [f.name for f in files if f.name.replace(".tiff", "") not in annotations]
    if missing:
        raise UserError(f"{table}: no row for slide {missing[0]}")
    kept = [f for f in files if annotations[f.name.replace(".tiff", "")][1] != 0]
    targets = [annotations[f.name.replace(".tiff", "")][0] for f in kept]
    train, val, test = stratified_split(len(kept), targets, *PANDA_RATIOS["small" if small else "full"], seed=seed)
    records = []
    for split, indices in (("train", train), ("val", val), ("test", test or [])):
        for i in indices:
            sid = kept[i].name.replace(".tiff", "")
            records.append(_record(sid, str(targets[i]), PANDA_CLASSES, kept[i], split))
    return SlideManifest(root, tuple(records), PANDA_CLASSES)


def stratified_split(n: int, targets: Sequence, train_ratio: float, val_ratio: float, test_ratio: float = 0.0,
                     seed: int = 42) -> tuple[list[int], list[int], list[int] | None]:
    """eva ``core.data.splitting.stratified_split`` (no groups): per class in sorted order, the
    class's indices shuffled by one ``default_rng(seed)`` in turn, then the first
    ``floor(ratio * n_class)`` (at least 1) to train, the next to val, then test (the
    remainders when the ratios sum to 1)."""
    if train_ratio + val_ratio + test_ratio > 1.0:
        raise ValueError("the split ratios sum to more than 1")
    if len(targets) != n:
        raise ValueError("one target per sample")
    use_all = train_ratio + val_ratio + test_ratio == 1
    rng = np.random.default_rng(seed)
    classes, y = np.unique(np.asarray(targets), return_inverse=True)
    train, val, test = [], [], []
    for c in range(len(classes)):
        idx = np.where(y == c)[0]
        rng.shuffle(idx)
        n_train = int(np.floor(train_ratio * len(idx))) or 1
        n_val = (len(idx) - n_train if test_ratio == 0.0 and use_all
                 else int(np.floor(val_ratio * len(idx))) or 1)
        train.extend(idx[:n_train].tolist())
        val.extend(idx[n_train:n_train + n_val].tolist())
        if test_ratio > 0.0:
            n_test = (len(idx) - n_train - n_val if use_all else int(np.floor(test_ratio * len(idx))) or 1)
            test.extend(idx[n_train + n_val:n_train + n_val + n_test].tolist())
    return train, val, test or None


def _record(sid: str, label: str, classes: Sequence[str], path: Path, split: str) -> SlideRecord:
    return SlideRecord(slide_id=sid, label=label, label_index=list(classes).index(label), patient_id=sid,
                       path=path, split=split)


def with_features(manifest: SlideManifest, features: dict[str, Path]) -> SlideManifest:
    """The manifest with each slide's feature file set (after :func:`~pathrobust.data.bags.build_bags`)."""
    return replace(manifest, records=tuple(replace(r, features=features.get(r.slide_id, r.features))
                                           for r in manifest.records))
