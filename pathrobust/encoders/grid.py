"""Patch-token grids of any encoder, and a per-tile cache of them for the dense tasks.

:func:`token_grid` gives the last block's patch tokens as a feature map ``(B, C, h, w)``, as
eva's segmentation encoders do (timm ``features_only=True, out_indices=1``, i.e.
``FeatureGetterNet`` -> ``forward_intermediates(indices=1, norm=False, output_fmt="NCHW",
intermediates_only=True)``):

* timm ViTs (anything with ``patch_embed`` and ``forward_intermediates``, also a builder's
  ``trunk`` such as CONCH's) go through that same call: CLS and register tokens dropped and
  **no final norm**. pathrobust's pooled features come from ``forward_features``, which
  applies the final LayerNorm, so a grid is not a reshaped ``forward_tokens`` (the tests check
  both facts);
* CNNs give the final feature map of ``forward_features`` (the map the ``cls`` pooling
  averages; ``backbone_tokens``' leading global-average token is dropped). eva's timm
  ``features_only`` would take the last *stage* instead (EfficientNet: 320 channels before
  ``conv_head``); pathrobust keeps the map its own pooling uses;
* any other backbone: ``forward_tokens`` without the spec's ``num_prefix_tokens``, reshaped to
  the input's aspect ratio (its final norm, if any, stays).

An encoder that yields no patch tokens at the input size (a colour histogram, CONCH's pooled
``forward_features``, an input smaller than one patch) is a one-line :class:`UserError`.

:func:`embed_token_grids` caches the grids of a :class:`TileSource` in one h5 file
(``grids`` ``(N, C, h, w)`` float16 by default, ``coords``, ``tile_ids``; provenance
attributes), written atomically and reused when model, weights, source and dtype agree.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pathrobust.data.tiles import TileSource
from pathrobust.encoders.base import Encoder
from pathrobust.errors import UserError

GRID_DTYPES = {"float16": np.float16, "float32": np.float32}
GRID_FORMAT = 1
IDENTITY_ATTRS = ("kind", "format", "model", "spec_hash", "weights_sha256", "source_fingerprint", "dtype",
                  "input_size")


def _timm_vit(backbone: nn.Module) -> nn.Module | None:
    """The timm ViT inside a backbone (itself, or a builder's ``trunk``), or None."""
    for module in (backbone, getattr(backbone, "trunk", None)):
        if module is not None and hasattr(module, "patch_embed") and hasattr(module, "forward_intermediates"):
            return module
    return None


def _no_tokens(encoder: Encoder, x: torch.Tensor, why: str) -> UserError:
    return UserError(f"encoder '{encoder.name}' gives no patch-token grid for {x.shape[-2]}x{x.shape[-1]} px "
                     f"inputs ({why}); dense tasks need a ViT or CNN backbone")


def token_grid(encoder: Encoder, x: torch.Tensor) -> torch.Tensor:
    """Patch-token grid of a batch.

    Args:
        encoder: any pathrobust :class:`Encoder` (its normalisation is applied here).
        x: ``(B, 3, H, W)`` uint8, or float in [0, 1].

    Returns:
        ``(B, C, h, w)`` float (``h = H / patch`` for ViTs).

    Raises:
        UserError: the encoder yields no patch tokens at this input size.
    """
    backbone = encoder.backbone
    vit = _timm_vit(backbone)
    if vit is not None:
        patch = vit.patch_embed.patch_size
        if x.shape[-2] < patch[0] or x.shape[-1] < patch[1]:
            raise _no_tokens(encoder, x, f"smaller than one {patch[0]}x{patch[1]} patch")
        xn = encoder.normalize(x)
        try:
            grids = vit.forward_intermediates(xn, indices=1, norm=False, output_fmt="NCHW", intermediates_only=True)
        except (AssertionError, RuntimeError) as exc:
            raise _no_tokens(encoder, x, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        return grids[-1]
    xn = encoder.normalize(x)
    if encoder.channels_last:
        xn = xn.contiguous(memory_format=torch.channels_last)
    out = backbone.forward_features(xn) if hasattr(backbone, "forward_features") else backbone(xn)
    if out.ndim == 4:  # CNN: the final feature map itself
        if out.shape[-1] * out.shape[-2] == 0:
            raise _no_tokens(encoder, x, "empty feature map")
        return out.contiguous()
    if out.ndim != 3:
        raise _no_tokens(encoder, x, f"output of shape {tuple(out.shape)}")
    patches = out[:, encoder.num_prefix_tokens:]
    n = patches.shape[1]
    if n == 0:
        raise _no_tokens(encoder, x, f"{out.shape[1]} tokens, all prefix tokens")
    h = round(math.sqrt(n * x.shape[-2] / x.shape[-1]))
    w = n // max(h, 1)
    if h * w != n:
        raise _no_tokens(encoder, x, f"{n} patch tokens do not form a grid")
    return patches.transpose(1, 2).reshape(len(out), -1, h, w)


@torch.inference_mode()
def token_grid_shape(encoder: Encoder, size: int | None = None) -> tuple[int, int, int] | None:
    """``(C, h, w)`` of the encoder's grid for ``size`` px tiles (default: its input size), or
    None when it gives none (a suite can then skip its dense tasks for that encoder)."""
    return None if grid_problem(encoder, size) else _probe(encoder, size)


@torch.inference_mode()
def grid_problem(encoder: Encoder, size: int | None = None) -> str | None:
    """Why the encoder gives no patch-token grid for ``size`` px tiles (default: its input
    size), as one line; None when it gives one."""
    try:
        _probe(encoder, size)
    except UserError as exc:
        return str(exc)
    return None


def _probe(encoder: Encoder, size: int | None) -> tuple[int, int, int]:
    size = size or encoder.input_size
    device = next(encoder.parameters(), torch.empty(0)).device
    return tuple(token_grid(encoder, torch.zeros(1, 3, size, size, dtype=torch.uint8, device=device)).shape[1:])


def grid_attrs(encoder: Encoder, source: TileSource, dtype: str) -> dict[str, Any]:
    """Provenance and identity attributes of a grid file."""
    from pathrobust import __version__

    return {
        "kind": "token_grid", "format": GRID_FORMAT, **encoder.provenance(),
        "spec_json": json.dumps(encoder.spec.to_dict(), sort_keys=True),
        "source": source.name, "source_fingerprint": source.fingerprint(), "dtype": dtype,
        "pathrobust_version": __version__,
    }


def read_grid_attrs(path: str | os.PathLike) -> dict[str, Any]:
    import h5py

    with h5py.File(path, "r") as f:
        return {k: (v.decode() if isinstance(v, bytes) else v.item() if hasattr(v, "item") and np.ndim(v) == 0 else v)
                for k, v in f.attrs.items()}


def load_token_grids(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """``(grids (N, C, h, w), attributes)`` of a grid file."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if "grids" not in f:
                raise UserError(f"{path}: not a token-grid file (no 'grids' dataset)")
            grids = f["grids"][:]
    except OSError as exc:
        raise UserError(f"{path}: not a readable h5 file ({exc})") from None
    return grids, read_grid_attrs(path)


def grid_file_current(path: str | os.PathLike, encoder: Encoder, source: TileSource, dtype: str) -> bool:
    """Whether ``path`` holds the grids of ``source`` by ``encoder`` in ``dtype`` (same
    identity attributes: model, weights, source fingerprint, dtype...)."""
    path = Path(path)
    return path.is_file() and _same_identity(path, grid_attrs(encoder, source, dtype))


def _same_identity(path: Path, attrs: dict[str, Any]) -> bool:
    try:
        existing = read_grid_attrs(path)
    except OSError:
        return False
    return all(str(existing.get(k)) == str(attrs.get(k)) for k in IDENTITY_ATTRS)


@torch.inference_mode()
def embed_token_grids(encoder: Encoder, source: TileSource, out_path: str | os.PathLike, *, batch_size: int = 32,
                      dtype: str = "float16", device: str | torch.device | None = None,
                      overwrite: bool = False, progress: Any = None) -> Path:
    """Token grids of every tile of ``source`` into ``out_path`` (h5), once.

    Tiles go through ``encoder.prepare`` (the spec's resize / centre crop; tiles already at the
    input size pass unchanged). The file holds ``grids`` ``(N, C, h, w)`` in ``dtype``
    (``float16`` or ``float32``), chunked one tile per chunk, ``coords`` ``(N, 2)``,
    ``tile_ids`` when the source has ids, and :func:`grid_attrs`. It is written under a
    temporary name and renamed; an existing file with the same identity is returned as is,
    one with another identity is an error unless ``overwrite``.
    """
    import h5py

    if dtype not in GRID_DTYPES:
        raise UserError(f"grid dtype '{dtype}': expected one of {', '.join(GRID_DTYPES)}")
    out_path = Path(out_path)
    attrs = grid_attrs(encoder, source, dtype)
    if out_path.exists() and not overwrite:
        if _same_identity(out_path, attrs):
            return out_path
        raise UserError(f"{out_path}: holds token grids of another model, source or dtype; remove it or pass overwrite")
    if len(source) == 0:
        raise UserError(f"tile source '{source.name}' is empty: no token grids to compute")
    device = torch.device(device) if device is not None else next(encoder.parameters(), torch.empty(0)).device
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    try:
        with h5py.File(tmp, "w") as f:
            dset = None
            for start in range(0, len(source), batch_size):
                idx = range(start, min(start + batch_size, len(source)))
                x = torch.stack([encoder.prepare(source.read(i)) for i in idx]).to(device)
                g = token_grid(encoder, x).float().cpu().numpy().astype(GRID_DTYPES[dtype])
                if dset is None:
                    dset = f.create_dataset("grids", shape=(len(source), *g.shape[1:]), dtype=GRID_DTYPES[dtype],
                                            chunks=(1, *g.shape[1:]))
                dset[start:start + len(g)] = g
                if progress is not None:
                    progress(len(g))
            f.create_dataset("coords", data=np.asarray(source.coords, dtype=np.int64).reshape(-1, 2))
            if source.tile_ids is not None:
                f.create_dataset("tile_ids", data=np.array([s.encode() for s in source.tile_ids]))
            for k, v in attrs.items():
                f.attrs[k] = v
            f.attrs["grid_shape"] = list(dset.shape[1:])
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out_path
