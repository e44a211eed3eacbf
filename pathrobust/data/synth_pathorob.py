"""Synthetic PathoROB-like data: real H&E tiles, tissue classes by a measured property,
medical centres by simulated stainings and scanners.

Base pixels are real tissue tiles of the bundled CC0 Aperio slide
(:func:`pathrobust.data.he.sample_he_tiles`; see ``data/assets/ATTRIBUTION.md``).

Classes ("biology"). Each candidate tile's *anisotropy* is measured: the mean coherence
``sqrt((Jxx - Jyy)² + 4 Jxy²) / (Jxx + Jyy)`` of the structure tensor ``J`` of its optical
density (gradients after a 1 px Gaussian, tensor averaged over a 4 px Gaussian). Aligned,
fibrous tissue (stroma, muscle) scores high, round cellular tissue low; on the bundled slide
it is uncorrelated with the amount of haematoxylin (r ≈ 0), so colour alone does not tell
the classes apart. The lowest ``class_quantile`` of a candidate pool is class ``isotropic``,
the highest ``fibrous``.

Centres ("hospitals"). A centre is a PLISM staining protocol and scanner,
``<STAINING>_<SCANNER>`` (e.g. ``GIV_AT2``), rendered by the simulations of
:mod:`pathrobust.data.synth_plism` (Beer–Lambert re-staining, scanner colour response, blur,
noise, JPEG). In-domain centres carry ``subset = "ID"``, the others ``"OOD"``.

Centre–class correlation. ``correlation`` is the phi coefficient of centre and class over the
ID rows of a 2 × 2 design: "aligned" cells (class index = centre index modulo the number of
classes) get ``round(S · (1 + phi) / (1 - phi))`` slides instead of ``S``. 0 (default)
balances every cell, as PathoROB's RI datasets are.

Slides. Each (centre, class) cell holds ``slides_per_cell`` slides of ``patches_per_slide``
tiles; rows are written cell by cell and slide by slide, as PathoROB's metadata, so its APD
slide chunks are slides here too.

Output: the hub layout of the PathoROB datasets, so the real reader reads it —
``<out>/data/train-00000-of-00001.parquet`` with ``image`` (Image struct ``{bytes, path}``),
``subset``, ``slide_id``, ``patch_id``, ``biological_class``, ``medical_center`` — and a
``pathorob.json`` marker naming the dataset (``synthetic``), its views (all from the parquet)
and the configuration.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pathrobust.cache import cache_dir
from pathrobust.data.pathorob import INFO_FILE
from pathrobust.data.plism import SCANNERS, STAININGS
from pathrobust.errors import UserError

FORMAT_VERSION = 1
DATASET = "synthetic"
CLASSES = ("isotropic", "fibrous")
ROWS_PER_GROUP = 32


@dataclass(frozen=True)
class SynthPathorobConfig:
    id_centres: tuple[str, ...] = ("GIV_AT2", "HR_SQ")
    ood_centres: tuple[str, ...] = ("LM_P",)
    slides_per_cell: int = 9
    ood_slides_per_cell: int = 2
    patches_per_slide: int = 4
    correlation: float = 0.0
    class_quantile: float = 1 / 3
    tile_size: int = 224
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "version": FORMAT_VERSION}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def check(self) -> None:
        for c in (*self.id_centres, *self.ood_centres):
            parts = c.split("_")
            if len(parts) != 2 or parts[0] not in STAININGS or parts[1] not in SCANNERS:
                raise UserError(f"centre {c!r}: expected <STAINING>_<SCANNER> with a PLISM staining "
                                f"({', '.join(STAININGS)}) and scanner ({', '.join(SCANNERS)})")
        if len(set(self.id_centres + self.ood_centres)) != len(self.id_centres) + len(self.ood_centres):
            raise UserError("centres: each centre may appear once")
        if len(self.id_centres) < 2:
            raise UserError(f"id_centres: RI needs at least 2 in-domain centres, got {len(self.id_centres)}")
        if not 0 <= self.correlation < 1:
            raise UserError(f"correlation {self.correlation}: must be in [0, 1)")
        if not 0 < self.class_quantile <= 0.5:
            raise UserError(f"class_quantile {self.class_quantile}: must be in (0, 0.5]")
        if self.slides_per_cell < 1 or self.patches_per_slide < 1 or self.ood_slides_per_cell < 0:
            raise UserError("slides_per_cell and patches_per_slide must be >= 1, ood_slides_per_cell >= 0")
        if not 16 <= self.tile_size <= 224:
            raise UserError(f"tile_size {self.tile_size}: must be 16..224")


def _gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=img.dtype)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    img = F.conv2d(F.pad(img, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(img, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


def tissue_anisotropy(tiles: np.ndarray, grad_sigma: float = 1.0, window_sigma: float = 4.0) -> np.ndarray:
    """Mean structure-tensor coherence (0 isotropic .. 1 aligned) of each tile's optical
    density; ``tiles`` uint8 ``(N, H, W, 3)`` -> ``(N,)`` float64."""
    out = np.empty(len(tiles))
    for s in range(0, len(tiles), 64):
        x = torch.from_numpy(tiles[s:s + 64]).permute(0, 3, 1, 2).float() / 255
        od = -torch.log(x.clamp_min(1 / 255)).sum(1, keepdim=True)
        g = _gaussian_blur(od, grad_sigma)
        gx = (g[..., :, 1:] - g[..., :, :-1])[..., :-1, :]
        gy = (g[..., 1:, :] - g[..., :-1, :])[..., :, :-1]
        jxx, jyy, jxy = (_gaussian_blur(v, window_sigma) for v in (gx * gx, gy * gy, gx * gy))
        coherence = torch.sqrt(((jxx - jyy) ** 2 + 4 * jxy ** 2).clamp_min(0)) / (jxx + jyy + 1e-6)
        out[s:s + 64] = coherence.mean(dim=(1, 2, 3)).double().numpy()
    return out


def cell_slides(config: SynthPathorobConfig) -> dict[tuple[str, str], int]:
    """Slides per (centre, class) cell (module doc: aligned ID cells grow with ``correlation``)."""
    phi = config.correlation
    aligned = int(round(config.slides_per_cell * (1 + phi) / (1 - phi)))
    out = {}
    for i, c in enumerate(config.id_centres):
        for j, b in enumerate(CLASSES):
            out[(c, b)] = aligned if j == i % len(CLASSES) else config.slides_per_cell
    for c in config.ood_centres:
        for b in CLASSES:
            out[(c, b)] = config.ood_slides_per_cell
    return out


def _render_centre(base: np.ndarray, centre: str, seed: int) -> list[bytes]:
    """Tiles ``(N, H, W, 3)`` uint8 under a centre's staining and scanner -> PNG bytes."""
    from pathrobust.data.synth_plism import _encode, render_scanner, render_staining, scanner_params, staining_params
    from pathrobust.stain import rgb_to_hed

    staining, scanner = centre.split("_")
    hed = rgb_to_hed(torch.from_numpy(base).permute(0, 3, 1, 2).double() / 255.0)
    stained = render_staining(hed, staining_params(staining, seed)).float()
    params = scanner_params(scanner, seed)
    gen = torch.Generator().manual_seed(zlib.crc32(centre.encode()) + seed)
    return [_encode(t, params["jpeg_quality"]) for t in render_scanner(stained, params, gen)]


def _schema():
    import pyarrow as pa

    return pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      ("subset", pa.string()), ("slide_id", pa.string()), ("patch_id", pa.string()),
                      ("biological_class", pa.string()), ("medical_center", pa.string())])


def synth_pathorob(out: str | os.PathLike, config: SynthPathorobConfig = SynthPathorobConfig(),
                   overwrite: bool = False) -> Path:
    """Write the synthetic dataset (module doc) to ``out``; returns ``out``. Built under a
    temporary name and renamed, so ``out`` is complete or absent."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pathrobust.data.he import sample_he_tiles

    config.check()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"--out {out}: exists and is not empty; pass --overwrite or another --out")
        shutil.rmtree(out)
    cells = cell_slides(config)
    p = config.patches_per_slide
    need = {b: sum(n for (_, bb), n in cells.items() if bb == b) * p for b in CLASSES}
    pool_n = int(np.ceil(max(need.values()) / config.class_quantile))
    pool, coords = sample_he_tiles(pool_n, config.tile_size, seed=config.seed, return_coords=True)
    order = np.argsort(tissue_anisotropy(pool), kind="stable")
    tail = int(np.floor(pool_n * config.class_quantile))
    rng = np.random.default_rng(config.seed)
    members = {"isotropic": rng.permutation(order[:tail])[:need["isotropic"]],
               "fibrous": rng.permutation(order[pool_n - tail:])[:need["fibrous"]]}
    taken = {b: 0 for b in CLASSES}
    rows, slide_no = [], 0
    for centre in (*config.id_centres, *config.ood_centres):
        subset = "ID" if centre in config.id_centres else "OOD"
        picks, meta = [], []
        for b in CLASSES:
            for _ in range(cells[(centre, b)]):
                slide = f"S{slide_no:03d}"
                slide_no += 1
                for _ in range(p):
                    i = members[b][taken[b]]
                    taken[b] += 1
                    picks.append(i)
                    meta.append((subset, slide, f"{i}_{coords[i][0]}_{coords[i][1]}", b, centre))
        if not picks:
            continue
        pngs = _render_centre(pool[np.array(picks)], centre, config.seed)
        rows += [{"image": {"bytes": png, "path": f"{m[1]}_{m[2]}.png"}, "subset": m[0], "slide_id": m[1],
                  "patch_id": m[2], "biological_class": m[3], "medical_center": m[4]} for png, m in zip(pngs, meta)]
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
    (tmp / "data").mkdir(parents=True)
    try:
        pq.write_table(pa.Table.from_pylist(rows, schema=_schema()), tmp / "data" / "train-00000-of-00001.parquet",
                       row_group_size=ROWS_PER_GROUP, compression="none")
        info = {"dataset": DATASET, "hub_table": f"{DATASET}.csv",
                "views": {"ri": f"{DATASET}.csv", "apd": f"{DATASET}.csv", "clustering": f"{DATASET}.csv"},
                "classes": list(CLASSES), "config": asdict(config), "version": FORMAT_VERSION, "rows": len(rows),
                "source": "pathrobust data synth-pathorob (simulated stainings and scanners on real CC0 H&E tiles of "
                          "OpenSlide CMU-1; see pathrobust/data/assets/ATTRIBUTION.md)"}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def default_pathorob_data(config: SynthPathorobConfig = SynthPathorobConfig()) -> Path:
    """The synthetic dataset used when no ``--data`` is given: built once into
    ``$PATHROBUST_CACHE/synth-pathorob/<config key>/``."""
    path = cache_dir("synth-pathorob") / config.key()
    if (path / INFO_FILE).is_file():
        return path
    try:
        return synth_pathorob(path, config, overwrite=True)
    except OSError:
        if (path / INFO_FILE).is_file():  # another process finished it first
            return path
        raise
