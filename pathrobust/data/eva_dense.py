"""Readers of eva's dense (semantic segmentation) datasets: tiles with class-index masks.

Each reader returns a :class:`DenseTask`: its classes (:class:`DenseLabels`) and splits of
:class:`DenseTiles` (a :class:`TileSource` whose tiles come with ``mask(i)``). Geometry and
splits follow kaiko-ai eva 0.4.5 (``eva.vision.data.datasets.segmentation``, the online
``consep.yaml`` / ``monusac.yaml`` configs), with torchvision's v2 kernels:

* CoNSeP — ``<root>/{Train,Test}/Images/*.png`` with ``Labels/<stem>.mat`` beside
  ``Images/`` (``type_map``: 0 background, 1 other, 2 inflammatory, 3 healthy and 4 malignant
  epithelial, 5 fibroblast, 6 muscle, 7 endothelial). eva's 5 classes: 3, 4 -> epithelial (3);
  5, 6, 7 -> spindle-shaped (4). Images (1000 x 1000 at 0.25 um/px) are cut into a
  non-overlapping grid of 250 px tiles (eva's ``GridSampler``: x-major, then shuffled with
  ``numpy.random.default_rng(42)``, the same order in every image), each resized to 224
  (bilinear with antialias; nearest for the mask) and centre-cropped (``ResizeAndCrop``).
  ``train`` = ``Train`` (27 images, 432 tiles); ``val`` = ``Test`` (14 images, 224 tiles),
  eva's checkpoint choice *and* reported split.
* MoNuSAC — ``<root>/MoNuSAC_images_and_annotations/**/*.tif`` (``train``, 209 images) and
  ``<root>/MoNuSAC Testing Data and Annotations/**/*.tif`` (``test``, 85 images), each with
  its ImageScope ``.xml``. Masks are rasterised as eva does: annotations in file order, the
  first ``Attribute``'s ``Name`` is the class (Epithelial 1, Lymphocyte 2, Neutrophil 3,
  Macrophage 4, Ambiguous 5; **any other name -> 5**), each ``Region``'s ``Vertices`` filled
  with scikit-image's ``draw.polygon`` rule (pixel centres inside or on the boundary; later
  regions overwrite earlier ones). The decoder has 5 outputs; 5 is the metric's ignored
  class. ``test``: ``Resize(224)`` (shorter side) + centre crop 224; ``train``: eva draws a
  ``RandomResizedCrop(224)`` (scale 0.08-1, ratio 3/4-4/3) per sample and step; with cached
  token grids that becomes ``train_views`` crops per image drawn once (seeded), grouped by
  image (``groups``); ``train_views=0`` uses the test geometry instead.
* Generic — ``<root>/dataset.json`` (``{"classes": [...], "ignore_index": null}``) and per
  split ``<root>/<split>/images/<name>.<png|jpg|tif>`` + ``<root>/<split>/masks/<name>.png``
  (single-channel class ids, same size as the image; the ``ignore_index`` label, e.g. 255,
  becomes the metric's extra last class ``ignore``). Tiles are brought to ``size`` with
  eva's ``ResizeAndCrop`` (a tile already ``size`` x ``size`` is unchanged). ``val`` is the
  checkpoint split and ``test`` (when present) the reported one.

Bad input is a one-line :class:`UserError` naming the file: a mask of another size than its
image, class ids out of range, a missing label file, an empty split.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import torch

from pathrobust.data.tiles import IMAGE_SUFFIXES, TileSource, read_image
from pathrobust.errors import UserError

CONSEP_CLASSES = ("background", "other", "inflammatory", "epithelial", "spindle-shaped")
CONSEP_SOURCE_CLASSES = 8  # type_map ids 0..7
CONSEP_SPLITS = {"train": "Train", "val": "Test"}
CONSEP_TILE, CONSEP_SEED = 250, 42
MONUSAC_CLASSES = ("background", "epithelial", "lymphocyte", "neutrophil", "macrophage", "ambiguous")
MONUSAC_XML_NAMES = ("Background", "Epithelial", "Lymphocyte", "Neutrophil", "Macrophage", "Ambiguous")
MONUSAC_AMBIGUOUS = 5
MONUSAC_DIRS = {"train": "MoNuSAC_images_and_annotations", "test": "MoNuSAC Testing Data and Annotations"}
GENERIC_MANIFEST = "dataset.json"
EVA_SIZE = 224


@dataclass(frozen=True)
class DenseLabels:
    """Classes of a dense task: ``class_names`` of the metric (the ignored class included, at
    ``ignore_index``), ``num_classes`` decoder outputs."""

    class_names: tuple[str, ...]
    num_classes: int
    ignore_index: int | None = None

    @property
    def metric_num_classes(self) -> int:
        return len(self.class_names)


# -- geometry (torchvision v2 kernels, as eva's transforms) ---------------------------------
def _resize_pair(image: torch.Tensor, mask: torch.Tensor, size: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    image = TF.resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
    mask = TF.resize(mask[None], size, interpolation=InterpolationMode.NEAREST)[0]
    return image, mask


def resize_and_crop(image: np.ndarray, mask: np.ndarray, size: int = EVA_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """eva's ``ResizeAndCrop(size)`` on an image ``(H, W, 3)`` uint8 and its mask ``(H, W)``:
    shorter side -> ``size`` (bilinear + antialias; nearest for the mask), centre crop."""
    from torchvision.transforms.v2 import functional as TF

    if image.shape[:2] == (size, size):
        return image, mask
    img = torch.from_numpy(np.require(image, requirements=['C', 'W'])).permute(2, 0, 1)
    msk = torch.from_numpy(np.require(mask, requirements=['C', 'W']))
    img, msk = _resize_pair(img, msk, [size])
    img, msk = TF.center_crop(img, [size, size]), TF.center_crop(msk[None], [size, size])[0]
    return img.permute(1, 2, 0).contiguous().numpy(), msk.numpy()


def random_resized_crop_params(height: int, width: int, generator: torch.Generator,
                               scale: tuple[float, float] = (0.08, 1.0),
                               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision v2 ``RandomResizedCrop``'s parameter draw (same algorithm and calls, from
    ``generator``): ``(top, left, height, width)``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            j = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image: np.ndarray, mask: np.ndarray, size: int, params: tuple[int, int, int, int]
                        ) -> tuple[np.ndarray, np.ndarray]:
    """``resized_crop`` of image (bilinear + antialias) and mask (nearest) to ``size`` x ``size``."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    top, left, h, w = params
    img = torch.from_numpy(np.require(image, requirements=['C', 'W'])).permute(2, 0, 1)
    msk = torch.from_numpy(np.require(mask, requirements=['C', 'W']))[None]
    img = TF.resized_crop(img, top, left, h, w, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    msk = TF.resized_crop(msk, top, left, h, w, [size, size], interpolation=InterpolationMode.NEAREST)
    return img.permute(1, 2, 0).contiguous().numpy(), msk[0].numpy()


# -- tiles with masks -------------------------------------------------------------------------
@dataclass(frozen=True)
class _Item:
    """One tile: source image ``image``, and either a crop box ``(x, y, w, h)`` of it followed
    by ResizeAndCrop, or random-resized-crop ``params`` ``(top, left, h, w)``."""

    image: int
    box: tuple[int, int, int, int] | None = None
    params: tuple[int, int, int, int] | None = None


class DenseTiles(TileSource):
    """Tiles ``(size, size, 3)`` uint8 with class-index masks ``(size, size)`` uint8.

    ``read(i)`` / ``mask(i)``; ``groups`` ``(N,)`` = source image of each tile; ``views``:
    the tiles of one image are alternative views of it (random crops). Subclasses
    implement ``_load(image_index) -> (image (H, W, 3) uint8, mask (H, W) int)``; the last
    source image read is kept (tiles of one image are consecutive)."""

    def __init__(self, name: str, paths: Sequence[Path], items: Sequence[_Item], size: int, base: Path) -> None:
        if not items:
            raise UserError(f"{base}: split '{name}' is empty (no images found)")
        self.name = name
        self.paths = list(paths)
        self.items = list(items)
        self.size = size
        self.groups = np.array([it.image for it in self.items], dtype=np.int64)
        # tiles are random views of their image (MoNuSAC training crops), not disjoint parts
        self.views = any(it.params is not None for it in self.items)
        rel = [p.relative_to(base).as_posix() if p.is_relative_to(base) else p.name for p in self.paths]
        self.tile_ids = [f"{rel[it.image]}@{self._item_id(it)}" for it in self.items]
        self.coords = np.array([(it.box[0], it.box[1]) if it.box else (it.params[1], it.params[0]) if it.params
                                else (0, 0) for it in self.items], dtype=np.int64).reshape(-1, 2)
        self.base = base
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self._fingerprint: str | None = None

    @staticmethod
    def _item_id(it: _Item) -> str:
        if it.box:
            return "{}_{}".format(*it.box[:2])
        if it.params:
            return "rrc_{}_{}_{}_{}".format(*it.params)
        return "full"

    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = None
        return state

    def _load(self, image_index: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _source(self, image_index: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cache is None or self._cache[0] != image_index:
            image, mask = self._load(image_index)
            if image.shape[:2] != mask.shape:
                raise UserError(f"{self.paths[image_index]}: mask is {mask.shape[1]}x{mask.shape[0]} px but the image "
                                f"is {image.shape[1]}x{image.shape[0]} px")
            self._cache = (image_index, image, mask)
        return self._cache[1], self._cache[2]

    def pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Tile ``(size, size, 3)`` uint8 and its mask ``(size, size)`` uint8."""
        it = self.items[index]
        image, mask = self._source(it.image)
        if it.params is not None:
            tile, tmask = random_resized_crop(image, mask, self.size, it.params)
        else:
            if it.box is not None:
                x, y, w, h = it.box
                image, mask = image[y:y + h, x:x + w], mask[y:y + h, x:x + w]
            tile, tmask = resize_and_crop(image, mask, self.size)
        return np.ascontiguousarray(tile), np.ascontiguousarray(tmask).astype(np.uint8)

    def read(self, index: int) -> np.ndarray:
        return self.pair(index)[0]

    def mask(self, index: int) -> np.ndarray:
        return self.pair(index)[1]

    def arrays(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All tiles ``(N, 3, S, S)`` uint8 and masks ``(N, S, S)`` int64 (for the decoder)."""
        images = np.empty((len(self), 3, self.size, self.size), dtype=np.uint8)
        masks = np.empty((len(self), self.size, self.size), dtype=np.int64)
        for i in range(len(self)):
            tile, m = self.pair(i)
            images[i] = tile.transpose(2, 0, 1)
            masks[i] = m
        return torch.from_numpy(images), torch.from_numpy(masks)

    def fingerprint(self) -> str:
        """Identity of the tiles: name, count, size, a hash of every tile id (crop boxes and
        views included) and the content fingerprint of the image files
        (:func:`pathrobust.data.identity.fingerprint_files`), so a changed image changes it."""
        if self._fingerprint is None:
            import hashlib

            from pathrobust.data.identity import fingerprint_files

            ids = hashlib.sha256("\n".join(self.tile_ids).encode()).hexdigest()[:12]
            content = fingerprint_files(self.base, self.paths)
            self._fingerprint = f"{self.name}:{len(self)}:{self.size}:{ids}:{content}"
        return self._fingerprint


@dataclass
class DenseTask:
    """A dense task: its classes and splits; ``train_split`` trains, ``val_split`` chooses the
    checkpoint, ``eval_split`` is reported (eva uses one split for both of the latter)."""

    name: str
    labels: DenseLabels
    splits: dict[str, DenseTiles]
    root: Path
    train_split: str = "train"
    val_split: str = "val"
    eval_split: str = "val"
    extra: dict = field(default_factory=dict)

    def fingerprint(self) -> str:
        return ";".join(f"{k}={s.fingerprint()}" for k, s in sorted(self.splits.items()))


def _check_ids(mask: np.ndarray, allowed: int, path: Path, ignore_index: int | None = None) -> None:
    values = np.unique(mask)
    bad = values[((values < 0) | (values >= allowed)) & (values != (ignore_index if ignore_index is not None else -1))]
    if len(bad):
        raise UserError(f"{path}: class id {int(bad[0])} out of range (expected 0..{allowed - 1}"
                        f"{f' or {ignore_index}' if ignore_index is not None and ignore_index >= allowed else ''})")


# -- layouts --------------------------------------------------------------------------------
DENSE_LAYOUTS = ("consep", "monusac", "generic", "synthetic")
SYNTHETIC_MANIFEST = "synth-dense.json"  # written by pathrobust.data.synth_dense


def dense_layout(path: str | os.PathLike) -> str | None:
    """The dense layout a folder holds: ``consep`` (``Train/Images`` or ``Test/Images``),
    ``monusac`` (its two release folders), ``synthetic`` (the generic layout as
    :mod:`pathrobust.data.synth_dense` writes it), ``generic`` (``dataset.json``), else None."""
    path = Path(path)
    if not path.is_dir():
        return None
    if any((path / folder).is_dir() for folder in MONUSAC_DIRS.values()):
        return "monusac"
    if any((path / folder / "Images").is_dir() for folder in CONSEP_SPLITS.values()):
        return "consep"
    if (path / GENERIC_MANIFEST).is_file():
        return "synthetic" if (path / SYNTHETIC_MANIFEST).is_file() else "generic"
    return None


# -- CoNSeP -----------------------------------------------------------------------------------
def consep_grid(width: int, height: int, tile: int = CONSEP_TILE, seed: int = CONSEP_SEED) -> list[tuple[int, int]]:
    """eva's ``GridSampler`` (no overlap, ``shuffle=True``): x-major grid of top-left corners,
    permuted by ``numpy.random.default_rng(seed).shuffle``."""
    xy = [(x, y) for x in range(0, width - tile + 1, tile) for y in range(0, height - tile + 1, tile)]
    order = list(range(len(xy)))
    np.random.default_rng(seed).shuffle(order)
    return [xy[i] for i in order]


def consep_map_classes(type_map: np.ndarray) -> np.ndarray:
    """CoNSeP's 8 type ids -> eva's 5 classes (3, 4 -> 3; 5, 6, 7 -> 4)."""
    out = np.where(type_map == 4, 3, type_map)
    return np.where(out > 4, 4, out).astype(np.uint8)


class ConsepTiles(DenseTiles):
    def _load(self, image_index: int) -> tuple[np.ndarray, np.ndarray]:
        import scipy.io

        path = self.paths[image_index]
        label = path.parent.parent / "Labels" / f"{path.stem}.mat"
        if not label.is_file():
            raise UserError(f"{label}: missing CoNSeP label file for {path.name}")
        try:
            mat = scipy.io.loadmat(label)
        except (ValueError, OSError, NotImplementedError) as exc:
            raise UserError(f"{label}: not a readable .mat file ({exc})") from None
        if "type_map" not in mat:
            raise UserError(f"{label}: no 'type_map' (CoNSeP labels hold inst_map, type_map, inst_type)")
        type_map = np.asarray(mat["type_map"])
        if type_map.ndim != 2:
            raise UserError(f"{label}: type_map has shape {type_map.shape}; expected (H, W)")
        _check_ids(type_map, CONSEP_SOURCE_CLASSES, label)
        image = read_image(path)
        if image.shape[:2] != type_map.shape:
            raise UserError(f"{label}: mask is {type_map.shape[1]}x{type_map.shape[0]} px but the image "
                            f"is {image.shape[1]}x{image.shape[0]} px")
        return image, consep_map_classes(type_map.astype(np.int64))


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.size
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"{path}: cannot read image ({exc})") from None


def read_consep(root: str | os.PathLike, size: int = EVA_SIZE) -> DenseTask:
    """CoNSeP as eva 0.4.5 uses it (module docstring): splits ``train`` and ``val``."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no CoNSeP directory")
    splits = {}
    all_images = sorted(root.glob("**/Images/*.png"))
    for split, folder in CONSEP_SPLITS.items():
        paths = [p for p in all_images if p.parent.parent.name == folder]
        items = []
        for i, p in enumerate(paths):
            w, h = _image_size(p)
            if w < CONSEP_TILE or h < CONSEP_TILE:
                raise UserError(f"{p}: {w}x{h} px, smaller than one {CONSEP_TILE} px tile")
            items += [_Item(i, box=(x, y, CONSEP_TILE, CONSEP_TILE)) for x, y in consep_grid(w, h)]
        if not items:
            raise UserError(f"{root}: CoNSeP split '{split}' is empty (no {folder}/Images/*.png)")
        splits[split] = ConsepTiles(f"consep-{split}", paths, items, size, root)
    labels = DenseLabels(CONSEP_CLASSES, num_classes=len(CONSEP_CLASSES))
    return DenseTask("consep", labels, splits, root, train_split="train", val_split="val", eval_split="val")


# -- MoNuSAC ----------------------------------------------------------------------------------
def polygon_pixels(r: np.ndarray, c: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """scikit-image ``draw.polygon(r, c, shape)``: integer ``(rr, cc)`` whose point lies
    inside the polygon or on its boundary (O'Rourke's crossing test, eps 1e-12 for vertices),
    within ``[0, shape)``; same bounding box and order (row-major) as scikit-image 0.24."""
    r = np.atleast_1d(np.asarray(r, dtype=np.float64))
    c = np.atleast_1d(np.asarray(c, dtype=np.float64))
    if r.size == 0:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    minr, maxr = int(max(0.0, r.min())), min(shape[0] - 1, int(math.ceil(r.max())))
    minc, maxc = int(max(0.0, c.min())), min(shape[1] - 1, int(math.ceil(c.max())))
    if maxr < minr or maxc < minc:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    yy, xx = np.meshgrid(np.arange(minr, maxr + 1, dtype=np.float64), np.arange(minc, maxc + 1, dtype=np.float64),
                         indexing="ij")
    vertex = np.zeros(yy.shape, bool)
    r_cross = np.zeros(yy.shape, np.int64)
    l_cross = np.zeros(yy.shape, np.int64)
    x1, y1 = c[-1] - xx, r[-1] - yy
    eps = 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in range(len(r)):
            x0, y0 = c[i] - xx, r[i] - yy
            vertex |= (np.abs(x0) < eps) & (np.abs(y0) < eps)
            cross = (x0 * y1 - x1 * y0) / (y1 - y0)
            r_cross += ((y0 > 0) != (y1 > 0)) & (cross > 0)
            l_cross += ((y0 < 0) != (y1 < 0)) & (cross < 0)
            x1, y1 = x0, y0
    inside = vertex | (r_cross % 2 == 1) | (l_cross % 2 == 1)
    rr, cc = np.nonzero(inside)
    return (rr + minr).astype(np.intp), (cc + minc).astype(np.intp)


def rasterize_monusac_xml(path: str | os.PathLike, width: int, height: int) -> np.ndarray:
    """eva's ``MoNuSAC._get_semantic_mask``: uint8 ``(height, width)`` class ids."""
    path = Path(path)
    try:
        root = ElementTree.parse(path).getroot()
    except (ElementTree.ParseError, OSError) as exc:
        raise UserError(f"{path}: not a readable MoNuSAC XML annotation ({exc})") from None
    mask = np.zeros((height, width), np.uint8)
    for annotation in root:
        try:
            label = [item.attrib["Name"] for item in annotation[0]][0]
        except (IndexError, KeyError):
            raise UserError(f"{path}: annotation without an Attributes/Attribute Name (the class)") from None
        class_id = MONUSAC_XML_NAMES.index(label) if label in MONUSAC_XML_NAMES else MONUSAC_AMBIGUOUS
        for region in (item for child in annotation for item in child if item.tag == "Region"):
            try:
                vertices = np.array([(v.attrib["X"], v.attrib["Y"]) for v in region[1]], dtype=np.float64)
            except (IndexError, KeyError, ValueError):
                raise UserError(f"{path}: a Region without Vertices/Vertex X, Y") from None
            if len(vertices) == 0:
                continue
            # eva calls draw.polygon(X, Y, (width, height)) and writes mask[cols, rows]
            xs, ys = polygon_pixels(vertices[:, 0], vertices[:, 1], (width, height))
            mask[ys, xs] = class_id
    return mask


class MonusacTiles(DenseTiles):
    def _load(self, image_index: int) -> tuple[np.ndarray, np.ndarray]:
        path = self.paths[image_index]
        xml = path.with_suffix(".xml")
        if not xml.is_file():
            raise UserError(f"{xml}: missing MoNuSAC annotation for {path.name}")
        image = read_image(path)
        return image, rasterize_monusac_xml(xml, image.shape[1], image.shape[0])


def read_monusac(root: str | os.PathLike, size: int = EVA_SIZE, train_views: int = 8, seed: int = 42) -> DenseTask:
    """MoNuSAC as eva 0.4.5 uses it (module docstring): splits ``train`` (``train_views``
    random resized crops per image, drawn once from ``seed``; 0 = resize + centre crop) and
    ``test`` (checkpoint choice and reported split)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no MoNuSAC directory")
    if train_views < 0:
        raise UserError(f"train_views {train_views}: expected >= 0")
    splits = {}
    generator = torch.Generator().manual_seed(seed)
    for split, folder in MONUSAC_DIRS.items():
        paths = sorted((root / folder).glob("**/*.tif"))
        items: list[_Item] = []
        for i, p in enumerate(paths):
            if split == "train" and train_views > 0:
                w, h = _image_size(p)
                items += [_Item(i, params=random_resized_crop_params(h, w, generator)) for _ in range(train_views)]
            else:
                items.append(_Item(i))
        if not items:
            raise UserError(f"{root / folder}: MoNuSAC split '{split}' is empty (no *.tif)")
        splits[split] = MonusacTiles(f"monusac-{split}", paths, items, size, root)
    labels = DenseLabels(MONUSAC_CLASSES, num_classes=len(MONUSAC_CLASSES) - 1, ignore_index=MONUSAC_AMBIGUOUS)
    return DenseTask("monusac", labels, splits, root, train_split="train", val_split="test", eval_split="test",
                     extra={"train_views": train_views, "seed": seed})


# -- generic layout ---------------------------------------------------------------------------
class GenericDenseTiles(DenseTiles):
    def __init__(self, name: str, paths, masks, items, size: int, base: Path, num_classes: int,
                 ignore_index: int | None) -> None:
        super().__init__(name, paths, items, size, base)
        self.mask_paths = list(masks)
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def _load(self, image_index: int) -> tuple[np.ndarray, np.ndarray]:
        from PIL import Image, UnidentifiedImageError

        path, mpath = self.paths[image_index], self.mask_paths[image_index]
        image = read_image(path)
        try:
            with Image.open(mpath) as img:
                if img.mode not in ("L", "P", "I", "I;16", "1"):
                    raise UserError(f"{mpath}: mask mode {img.mode}; expected a single-channel class-index image")
                mask = np.asarray(img)
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"{mpath}: cannot read mask ({exc})") from None
        if mask.shape != image.shape[:2]:
            raise UserError(f"{mpath}: mask is {mask.shape[1]}x{mask.shape[0]} px but its image is "
                            f"{image.shape[1]}x{image.shape[0]} px")
        _check_ids(mask, self.num_classes, mpath, self.ignore_index)
        mask = mask.astype(np.int64)
        if self.ignore_index is not None:  # the ignored label becomes the metric's extra last class
            mask[mask == self.ignore_index] = self.num_classes
        return image, mask


def read_generic_dense(root: str | os.PathLike, size: int = EVA_SIZE, splits: Sequence[str] | None = None) -> DenseTask:
    """The generic layout (module docstring). ``splits``: which split folders to read
    (default: every folder with an ``images/`` subfolder); ``train`` and ``val`` are required."""
    root = Path(root)
    manifest = root / GENERIC_MANIFEST
    if not manifest.is_file():
        raise UserError(f"{manifest}: missing (dense data need {{\"classes\": [...], \"ignore_index\": null}})")
    try:
        spec = json.loads(manifest.read_text())
        classes = tuple(str(c) for c in spec["classes"])
        ignore_index = spec.get("ignore_index")
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{manifest}: not a dense dataset manifest ({type(exc).__name__}: {exc})") from None
    if len(classes) < 2:
        raise UserError(f"{manifest}: needs at least 2 classes (background first), got {len(classes)}")
    if ignore_index is not None and (not isinstance(ignore_index, int) or 0 <= ignore_index < len(classes) or ignore_index < 0):
        raise UserError(f"{manifest}: ignore_index {ignore_index!r} must be an integer >= {len(classes)} (e.g. 255)")
    names = list(splits) if splits is not None else sorted(p.name for p in root.iterdir() if (p / "images").is_dir())
    for required in ("train", "val"):
        if required not in names:
            raise UserError(f"{root}: no '{required}/images' split folder")
    tiles = {}
    for split in names:
        img_dir, mask_dir = root / split / "images", root / split / "masks"
        paths = sorted(p for p in img_dir.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if img_dir.is_dir() else []
        if not paths:
            raise UserError(f"{img_dir}: split '{split}' is empty (no images)")
        masks = []
        for p in paths:
            m = mask_dir / f"{p.stem}.png"
            if not m.is_file():
                raise UserError(f"{m}: missing mask for {p.name}")
            masks.append(m)
        items = [_Item(i) for i in range(len(paths))]
        tiles[split] = GenericDenseTiles(f"{root.name}-{split}", paths, masks, items, size, root, len(classes),
                                         ignore_index)
    if ignore_index is None:
        labels = DenseLabels(classes, num_classes=len(classes))
    else:  # masks carry the ignored label as class len(classes) (see GenericDenseTiles)
        labels = DenseLabels((*classes, "ignore"), num_classes=len(classes), ignore_index=len(classes))
    task = DenseTask(root.name, labels, tiles, root, train_split="train", val_split="val",
                     eval_split="test" if "test" in tiles else "val")
    task.extra["ignore_label"] = ignore_index
    return task
