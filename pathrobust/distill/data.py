"""Training data: tiles from folders, tile h5 files or whole slides, as a deterministic
stream of per-step batches with per-rank shards.

The stream: epoch ``e`` visits all N tiles in the order ``permutation_e`` (seeded by
``(seed, e)``); step ``s`` takes stream positions ``[s*B, (s+1)*B)`` of the global batch B;
rank ``r`` of ``W`` takes the ``r``-th contiguous ``B/W`` of them. Each sample's crops are
drawn from a generator seeded by ``(seed, stream position)`` and the iBOT masks of step ``s``
from ``(seed, s)`` over the global batch. A batch is therefore a pure function of
``(seed, step, rank, world)``: a resumed run continues exactly, and the union of the ranks'
batches is the 1-process batch.

Whole slides: OpenSlide tissue detection and a grid of tiles at ``target_mpp`` over every
slide; the seeded permutation turns that into random tissue tiles across all slides.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pathrobust.data.tiles import ArrayTiles, TileSource
from pathrobust.distill.augment import MultiCropAugment
from pathrobust.distill.masking import sample_masks
from pathrobust.distill.recipe import Recipe
from pathrobust.errors import UserError


class ConcatTiles(TileSource):
    """Several tile sources as one (index order: source by source)."""

    def __init__(self, sources: list[TileSource]) -> None:
        self.sources = [s for s in sources if len(s) > 0]
        if not self.sources:
            raise UserError("--data: no tiles found")
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])
        self.name = self.sources[0].name if len(self.sources) == 1 else f"{len(self.sources)}-sources"
        self.coords = np.concatenate([s.coords for s in self.sources])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, index: int) -> np.ndarray:
        which = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return self.sources[which].read(index - int(self.offsets[which]))


def open_training_tiles(data: Path | None, recipe: Recipe) -> TileSource:
    """``--data`` (a tile folder, a tile h5 or a folder of them, a slide or a folder of
    slides) -> one source; without ``--data``, ``recipe.data.synthetic_tiles`` real H&E
    tiles from the bundled slide."""
    if data is None:
        from pathrobust.data.he import sample_he_tiles

        size = max(recipe.data.tile_size, recipe.crops.global_size)
        tiles = sample_he_tiles(recipe.data.synthetic_tiles, size=size, seed=recipe.seed)
        return ArrayTiles(tiles, name="bundled-he")
    from pathrobust.data.sources import open_tile_sources
    from pathrobust.data.slides import SLIDE_SUFFIXES, SlideTiles, find_slides

    d, data = recipe.data, Path(data)
    if not data.exists():
        raise UserError(f"--data {data}: does not exist")
    is_slide = data.is_file() and data.suffix.lower() in SLIDE_SUFFIXES
    has_slides = data.is_dir() and any(p.suffix.lower() in SLIDE_SUFFIXES for p in data.rglob("*"))
    if is_slide or has_slides:
        slides = find_slides(data)
        return ConcatTiles([SlideTiles(p, d.tile_size, d.target_mpp, min_tissue=d.min_tissue) for p in slides])
    return ConcatTiles(open_tile_sources(data))


def sample_generator(seed: int, position: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, 1, position]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@dataclass
class Batch:
    """One rank's share of one step.

    globals_: ``(G, b, 3, Sg, Sg)`` float [0, 1]; locals_: ``(L, b, 3, Sl, Sl)``;
    masks: ``(G, b, h*w)`` bool iBOT positions on the student's patch grid; step: the step."""

    step: int
    globals_: torch.Tensor
    locals_: torch.Tensor
    masks: torch.Tensor


class StepBatches(torch.utils.data.Dataset):
    """``dataset[step]`` -> :class:`Batch` for this rank (usable by a DataLoader with
    ``batch_size=None`` and a sampler over steps, so workers prefetch whole steps)."""

    def __init__(self, source: TileSource, recipe: Recipe, grid: tuple[int, int], rank: int = 0, world: int = 1) -> None:
        if recipe.optim.batch_size % world:
            raise UserError(f"{recipe.source}: 'optim.batch_size' {recipe.optim.batch_size} is not divisible by the {world} ranks")
        self.source = source
        self.recipe = recipe
        self.grid = grid
        self.rank = rank
        self.world = world
        self.local_batch = recipe.optim.batch_size // world
        self.augment = MultiCropAugment(recipe.crops, recipe.augment)
        self._perm_cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.recipe.total_steps

    def _index(self, position: int) -> int:
        n = len(self.source)
        epoch, offset = divmod(position, n)
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            self._perm_cache = (epoch, np.random.default_rng([self.recipe.seed, 0, epoch]).permutation(n))
        return int(self._perm_cache[1][offset])

    def __getitem__(self, step: int) -> Batch:
        r, B, b = self.recipe, self.recipe.optim.batch_size, self.local_batch
        start = step * B + self.rank * b
        globals_, locals_ = [], []
        for position in range(start, start + b):
            tile = self.source.read(self._index(position))
            g, l = self.augment(tile, sample_generator(r.seed, position))
            globals_.append(g)
            locals_.append(l)
        m = r.masking
        n_global = r.crops.n_global
        masks = sample_masks(n_global * B, self.grid, np.random.default_rng([r.seed, 2, step]),
                             m.sample_probability, m.min_ratio, m.max_ratio)
        masks = masks.reshape(n_global, B, -1)[:, self.rank * b:(self.rank + 1) * b]
        return Batch(step=step, globals_=torch.stack(globals_, 1), locals_=torch.stack(locals_, 1),
                     masks=torch.from_numpy(np.ascontiguousarray(masks)))
