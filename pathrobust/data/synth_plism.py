"""Synthetic PLISM-like data: real H&E tiles under simulated stainings and scanners.

Base pixels are real tissue tiles of the bundled CC0 Aperio slide
(:func:`pathrobust.data.he.sample_he_tiles`; see ``data/assets/ATTRIBUTION.md``). Each of the
13 PLISM staining protocols is simulated in Beer-Lambert optical density: the tile is
deconvolved into haematoxylin / eosin / residual concentrations (:mod:`pathrobust.stain`) and
re-rendered with that protocol's own H and E absorption vectors and concentration scales
(protocols ending in ``H`` get a heavier haematoxylin). Each of the 7 scanners then applies
its colour response (3×3 matrix), white balance, gamma, optical blur with a sub-pixel shift,
sensor noise and JPEG compression. All parameters derive deterministically from the
protocol / scanner names and the seed.

Output: the layout of ``owkin/plism-dataset-tiles``, so the real reader reads it —
``<out>/data/train-000NN-of-000MM.parquet`` with columns ``slide_id``, ``tile_id``,
``png`` (Hugging Face Image struct ``{bytes, path}``), ``stainer``, ``scanner``; rows grouped by
slide, shard boundaries independent of slides; real slide ids (``GIV_AT2_to_GMH_S60.tif``);
tile ids ``<i>_<level>_<x>_<y>`` written row-major (by y) so the (x, y) sort of the reader
is not the file order.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import uuid
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pathrobust.data.plism import SCANNERS, STAININGS, make_slide_id, make_tile_id
from pathrobust.errors import UserError
from pathrobust.stain import EPS, RGB_FROM_HED, rgb_to_hed

FORMAT_VERSION = 1
DEFAULT_TILES_PER_SLIDE = 48
TILE_LEVEL = 16
GRID_COLUMNS = 8
ROWS_PER_SHARD = 150  # shards cut across slides, as in the real dataset
ROWS_PER_GROUP = 64
DONE_MARKER = "synth_plism.json"


@dataclass(frozen=True)
class SynthPlismConfig:
    tiles_per_slide: int = DEFAULT_TILES_PER_SLIDE
    stainings: tuple[str, ...] = STAININGS
    scanners: tuple[str, ...] = SCANNERS
    tile_size: int = 224
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "version": FORMAT_VERSION}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def _rng(name: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(name.encode()), seed])


def staining_params(staining: str, seed: int = 0) -> dict[str, np.ndarray | float]:
    """Simulated protocol: H and E optical-density vectors (unit) and concentration scales."""
    family = staining[:-1] if staining.endswith("H") and staining[:-1] in {s for s in STAININGS} else staining
    rng = _rng("stain:" + family, seed)
    base = RGB_FROM_HED.numpy()
    h_vec = base[0] + rng.normal(0, 0.07, 3)
    e_vec = base[1] + rng.normal(0, 0.07, 3)
    h_scale = rng.uniform(0.7, 1.3) * (1.3 if family != staining else 1.0)
    return {"h_vec": np.abs(h_vec) / np.linalg.norm(h_vec), "e_vec": np.abs(e_vec) / np.linalg.norm(e_vec),
            "h_scale": float(h_scale), "e_scale": float(rng.uniform(0.7, 1.3))}


def scanner_params(scanner: str, seed: int = 0) -> dict[str, np.ndarray | float | int]:
    """Simulated scanner: colour matrix, white balance, gamma, blur, shift, noise, JPEG quality."""
    rng = _rng("scan:" + scanner, seed)
    return {"colour": np.eye(3) + rng.normal(0, 0.04, (3, 3)), "white_balance": rng.uniform(0.92, 1.08, 3),
            "gamma": float(rng.uniform(0.85, 1.2)), "blur_sigma": float(rng.uniform(0.4, 1.2)),
            "shift": rng.uniform(-0.5, 0.5, 2), "noise": float(rng.uniform(0.5, 3.0) / 255),
            "jpeg_quality": int(rng.integers(70, 96))}


def render_staining(hed: torch.Tensor, params: dict) -> torch.Tensor:
    """Concentrations ``(N, 3, H, W)`` (H, E, residual) -> RGB in [0, 1] under a protocol."""
    m = RGB_FROM_HED.clone().to(hed.dtype)
    m[0] = torch.as_tensor(params["h_vec"], dtype=hed.dtype)
    m[1] = torch.as_tensor(params["e_vec"], dtype=hed.dtype)
    scale = torch.tensor([params["h_scale"], params["e_scale"], 1.0], dtype=hed.dtype).view(1, 3, 1, 1)
    od = torch.einsum("nchw,cd->ndhw", hed * scale, m)
    log_adjust = float(np.log(EPS))
    return torch.exp(od * log_adjust).clamp(0, 1)


def _blur_shift_1d(x: torch.Tensor, sigma: float, shift: float, dim: int) -> torch.Tensor:
    """Gaussian blur along ``dim`` whose centre is moved by ``shift`` px (sub-pixel shift and
    optics in one separable kernel), edges replicated. Sums of shifted slices: fast on CPU."""
    radius = max(1, int(np.ceil(3 * sigma + abs(shift))))
    taps = np.arange(-radius, radius + 1)
    k = np.exp(-((taps - shift) ** 2) / (2 * sigma**2))
    k = k / k.sum()
    size = x.shape[dim]
    pad = [x.narrow(dim, 0, 1)] * radius + [x] + [x.narrow(dim, size - 1, 1)] * radius
    xp = torch.cat(pad, dim=dim)
    out = torch.zeros_like(x)
    for j, w in enumerate(k):
        out.add_(xp.narrow(dim, j, size), alpha=float(w))
    return out


def render_scanner(rgb: torch.Tensor, params: dict, generator: torch.Generator) -> np.ndarray:
    """RGB ``(N, 3, H, W)`` in [0, 1] -> uint8 ``(N, H, W, 3)`` as scanned (before JPEG)."""
    colour = torch.as_tensor(params["colour"], dtype=rgb.dtype)
    wb = torch.as_tensor(params["white_balance"], dtype=rgb.dtype).view(1, 3, 1, 1)
    x = torch.einsum("nchw,dc->ndhw", rgb, colour) * wb
    x = x.clamp(0, 1) ** params["gamma"]
    dx, dy = map(float, params["shift"])
    x = _blur_shift_1d(_blur_shift_1d(x, params["blur_sigma"], dx, dim=3), params["blur_sigma"], dy, dim=2)
    x = x + params["noise"] * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _encode(tile: np.ndarray, quality: int) -> bytes:
    """JPEG round trip (the scanner's compression), then PNG (the dataset's storage)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(tile).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as img:
        scanned = img.convert("RGB")
    out = io.BytesIO()
    scanned.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def _schema():
    import pyarrow as pa

    return pa.schema([("slide_id", pa.string()), ("tile_id", pa.string()),
                      ("png", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      ("stainer", pa.string()), ("scanner", pa.string())])


def synth_plism(out: str | os.PathLike, config: SynthPlismConfig = SynthPlismConfig(), overwrite: bool = False,
                progress: bool = True) -> Path:
    """Write a synthetic PLISM dataset (see the module doc) to ``out``; returns ``out``.

    Built under a temporary name and renamed, so ``out`` is complete or absent."""
    from pathrobust.data.he import sample_he_tiles
    from pathrobust.progress import tile_progress

    out = Path(out)
    for s in config.stainings:
        if s not in STAININGS:
            raise UserError(f"--stainings: unknown staining {s!r} (PLISM: {', '.join(STAININGS)})")
    for s in config.scanners:
        if s not in SCANNERS:
            raise UserError(f"--scanners: unknown scanner {s!r} (PLISM: {', '.join(SCANNERS)})")
    if config.tiles_per_slide < 2:
        raise UserError(f"--tiles-per-slide {config.tiles_per_slide}: must be >= 2")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"--out {out}: exists and is not empty; pass --overwrite or another --out")
        shutil.rmtree(out)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
    (tmp / "data").mkdir(parents=True)
    try:
        n = config.tiles_per_slide
        base = sample_he_tiles(n, config.tile_size, seed=config.seed)
        hed = rgb_to_hed(torch.from_numpy(base).permute(0, 3, 1, 2).double() / 255.0)
        tile_ids = [make_tile_id(i, TILE_LEVEL, (i % GRID_COLUMNS) * config.tile_size,
                                 (i // GRID_COLUMNS) * config.tile_size) for i in range(n)]
        slides = [(st, sc) for st in config.stainings for sc in config.scanners]
        total = len(slides) * n
        n_shards = max(1, -(-total // ROWS_PER_SHARD))
        writer = _ShardWriter(tmp / "data", n_shards)
        with tile_progress("synth-plism", total=total, enabled=progress) as advance, \
                ThreadPoolExecutor(max_workers=2) as pool:
            for staining in config.stainings:
                stained = render_staining(hed, staining_params(staining, config.seed)).float()
                for scanner in config.scanners:
                    sid = make_slide_id(staining, scanner)
                    params = scanner_params(scanner, config.seed)
                    gen = torch.Generator().manual_seed(zlib.crc32(sid.encode()) + config.seed)
                    tiles = render_scanner(stained, params, gen)
                    pngs = list(pool.map(lambda t: _encode(t, params["jpeg_quality"]), tiles))
                    writer.add([{"slide_id": sid, "tile_id": tid, "png": {"bytes": png, "path": f"{tid}.png"},
                                 "stainer": staining, "scanner": scanner} for tid, png in zip(tile_ids, pngs)])
                    advance(n)
        writer.close()
        info = {**asdict(config), "version": FORMAT_VERSION, "key": config.key(), "slides": len(slides), "rows": total,
                "shards": writer.written, "source": "pathrobust data synth-plism (simulated stainings and scanners "
                "on real CC0 H&E tiles of OpenSlide CMU-1; see pathrobust/data/assets/ATTRIBUTION.md)"}
        (tmp / DONE_MARKER).write_text(json.dumps(info, indent=2) + "\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


class _ShardWriter:
    """Cuts a stream of rows into ``train-000NN-of-000MM.parquet`` shards of ROWS_PER_SHARD rows."""

    def __init__(self, folder: Path, n_shards: int) -> None:
        self.folder, self.n_shards = folder, n_shards
        self.rows: list[dict] = []
        self.written = 0

    def add(self, rows: list[dict]) -> None:
        self.rows.extend(rows)
        while len(self.rows) >= ROWS_PER_SHARD:
            self._flush(self.rows[:ROWS_PER_SHARD])
            self.rows = self.rows[ROWS_PER_SHARD:]

    def close(self) -> None:
        if self.rows:
            self._flush(self.rows)
            self.rows = []

    def _flush(self, rows: list[dict]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(rows, schema=_schema())
        pq.write_table(table, self.folder / f"train-{self.written:05d}-of-{self.n_shards:05d}.parquet",
                       row_group_size=ROWS_PER_GROUP, compression="none")
        self.written += 1


def build_synthetic_plism(out: str | os.PathLike, config: SynthPlismConfig = SynthPlismConfig(),
                          progress: bool = True) -> Path:
    """The synthetic dataset of ``config`` at ``out``: reused when ``out`` already holds it
    (same parameters), else (re)built. Marked synthetic (:mod:`pathrobust.data.synthetic`)."""
    from pathrobust.data.synthetic import mark_synthetic

    out = Path(out)
    marker = out / DONE_MARKER
    try:
        if json.loads(marker.read_text()).get("key") == config.key():
            return out
    except (OSError, ValueError):
        pass
    try:
        synth_plism(out, config, overwrite=True, progress=progress)
    except OSError:
        if marker.is_file():  # another process finished it first
            return out
        raise
    mark_synthetic(out, "synth-plism", asdict(config), note="simulated stainings and scanners on real CC0 H&E tiles; "
                   "not the real PLISM slides")
    return out


def parse_names(value: str | None, known: Sequence[str], option: str) -> tuple[str, ...]:
    """``"GIV,GM"`` -> ``("GIV", "GM")``; ``None`` -> all ``known``."""
    if not value:
        return tuple(known)
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in names if v not in known]
    if bad:
        raise UserError(f"{option} {value}: unknown {', '.join(bad)} (choose from {', '.join(known)})")
    return names
