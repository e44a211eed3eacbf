"""One dense task end to end for one encoder: cached token grids -> eva's decoder runs ->
scores (and segmentation consistency where the task has renderings).

The EVA suite's dense tasks call :func:`evaluate_dense_task`; everything protocol-specific is
in its :class:`~pathrobust.probes.decoder.DecoderConfig` (from ``suites/eva.toml``) and the
reader's :class:`~pathrobust.data.eva_dense.DenseTask`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pathrobust.data.eva_dense import DenseTask, DenseTiles
from pathrobust.data.synth_dense import rendering_splits
from pathrobust.encoders.base import Encoder
from pathrobust.encoders.grid import embed_token_grids, load_token_grids
from pathrobust.errors import UserError
from pathrobust.probes.decoder import DecoderConfig, DecoderResult, DenseSplit, train_decoder_runs


@dataclass
class DenseEvaluation:
    """``scores``: metric -> (mean, std) over runs on the task's reported split;
    ``per_run``: each run's scores there; ``consistency``: rendering -> (mean, std) over runs
    of the segmentation consistency against the reference rendering; ``render_dice``:
    rendering -> (mean, std) of the headline Dice against the masks (both empty when the task
    has no renderings)."""

    task: str
    scores: dict[str, tuple[float, float]]
    per_run: list[dict[str, float]]
    consistency: dict[str, tuple[float, float]] = field(default_factory=dict)
    render_dice: dict[str, tuple[float, float]] = field(default_factory=dict)
    result: DecoderResult | None = field(default=None, repr=False)


GridFiles = Callable[[DenseTiles, str], Path]  # (tiles, split name) -> grid file


def folder_grid_files(encoder: Encoder, task: DenseTask, cache_dir: str | os.PathLike, *, batch_size: int = 32,
                      dtype: str = "float16", device: str | torch.device | None = None,
                      progress: Any = None) -> GridFiles:
    """Grid files in ``<cache_dir>/<task>/<split>.h5`` (reused while model, weights and tiles
    agree). A suite passes its run's feature cache instead (``FeatureCache.grids``)."""
    def grid_file(tiles: DenseTiles, split: str) -> Path:
        return embed_token_grids(encoder, tiles, Path(cache_dir) / task.name / f"{split}.h5", batch_size=batch_size,
                                 dtype=dtype, device=device, progress=progress)
    return grid_file


def task_splits(encoder: Encoder, task: DenseTask, grids: str | os.PathLike | GridFiles, *,
                names: list[str] | None = None, batch_size: int = 32, dtype: str = "float16",
                device: str | torch.device | None = None, progress: Any = None) -> dict[str, DenseSplit]:
    """Each split's :class:`DenseSplit` with its token grids, computed once: ``grids`` is a
    cache folder (:func:`folder_grid_files`) or a function ``(tiles, split) -> grid file``."""
    grid_file = grids if callable(grids) else folder_grid_files(encoder, task, grids, batch_size=batch_size,
                                                                 dtype=dtype, device=device, progress=progress)
    out = {}
    for name in names or list(task.splits):
        tiles = task.splits[name]
        array, _ = load_token_grids(grid_file(tiles, name))
        if len(array) != len(tiles):
            raise UserError(f"{task.root}: {len(array)} token grids for {len(tiles)} tiles of split '{name}'; "
                            "pass --overwrite")
        out[name] = DenseSplit.from_tiles(tiles, array)
    return out


def evaluate_dense_task(encoder: Encoder, task: DenseTask, config: DecoderConfig,
                        grids: str | os.PathLike | GridFiles, *, device: str | torch.device = "cpu",
                        embed_batch_size: int = 32, dtype: str = "float16", progress: Any = None) -> DenseEvaluation:
    """Train ``config.n_runs`` decoders on ``task.train_split`` (checkpoint on
    ``task.val_split``) and score them on ``task.eval_split``; with ``val_<rendering>`` splits
    (synthetic data) also the segmentation consistency of each rendering against ``val``.

    ``grids``: where the token grids come from (see :func:`task_splits`); ``progress`` is
    called with 1 after each decoder step."""
    renders = rendering_splits(task.splits)
    needed = list(dict.fromkeys([task.train_split, task.val_split, task.eval_split, *renders]))
    splits = task_splits(encoder, task, grids, names=needed, batch_size=embed_batch_size, dtype=dtype,
                         device=device)
    extra = {name: splits[name] for name in needed if name not in (task.train_split, task.val_split)}
    result = train_decoder_runs(splits[task.train_split], splits[task.val_split], task.labels, config,
                                mean=encoder.spec.mean, std=encoder.spec.std, score_splits=extra,
                                predict_splits=[*renders, "val"] if renders else (), device=device,
                                progress=progress)
    reported = None if task.eval_split == task.val_split else task.eval_split
    per_run = [r.scores if reported is None else r.split_scores[reported] for r in result.runs]
    consistency = result.consistency("val", renders) if renders else {}
    render_dice = {name: result.summary(name)["dice"] for name in renders}
    return DenseEvaluation(task.name, result.summary(reported), per_run, consistency, render_dice, result)
