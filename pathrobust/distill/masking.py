"""BEiT-style block masks for iBOT (DINOv2 ``dinov2/data/masking.py``), deterministic per
generator, with the ratios stratified over the masked images as in DINOv2's collate.

The block sampler may stop short of the target count when no further block fits; the
remainder is then filled with random single positions so that each image holds exactly
``int(ratio * N)`` masked positions (the sampled ratio is what the loss sees)."""

from __future__ import annotations

import math

import numpy as np


class BlockMaskGenerator:
    """Block masks on an ``(h, w)`` grid.

    Args:
        grid: ``(h, w)`` patch grid.
        min_num_patches: smallest block area.
        max_num_patches: largest block area (DINOv2: half the grid).
        min_aspect: blocks have aspect ratio in ``[min_aspect, 1/min_aspect]``.
    """

    def __init__(self, grid: tuple[int, int], min_num_patches: int = 4, max_num_patches: int | None = None,
                 min_aspect: float = 0.3) -> None:
        self.height, self.width = grid
        self.n = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = max_num_patches or max(1, int(0.5 * self.n))
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def _add_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        for _ in range(10):
            area = rng.uniform(min(self.min_num_patches, budget), budget)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if 0 < h < self.height and 0 < w < self.width:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())
                if 0 < new <= budget:
                    block[:] = True
                    return new
        return 0

    def __call__(self, n_masked: int, rng: np.random.Generator) -> np.ndarray:
        """``(h, w)`` bool mask with exactly ``min(n_masked, N)`` True positions."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        n_masked = min(n_masked, self.n)
        count = 0
        while count < n_masked:
            added = self._add_block(mask, min(n_masked - count, self.max_num_patches), rng)
            if added == 0:
                break
            count += added
        if count < n_masked:  # top up with single positions
            free = np.flatnonzero(~mask.ravel())
            mask.ravel()[rng.choice(free, size=n_masked - count, replace=False)] = True
        return mask


def sample_masks(n_images: int, grid: tuple[int, int], rng: np.random.Generator, sample_probability: float = 0.5,
                 min_ratio: float = 0.1, max_ratio: float = 0.5) -> np.ndarray:
    """Masks for ``n_images`` global-crop images -> ``(n_images, h*w)`` bool.

    ``int(n_images * sample_probability)`` images get a block mask; the i-th of them has a
    ratio drawn uniformly from the i-th of equal strata of ``[min_ratio, max_ratio]``; which
    images are masked is a random permutation. The others are all False."""
    h, w = grid
    n = h * w
    generator = BlockMaskGenerator(grid)
    n_masked_images = int(n_images * sample_probability)
    edges = np.linspace(min_ratio, max_ratio, n_masked_images + 1)
    masks = np.zeros((n_images, n), dtype=bool)
    for i in range(n_masked_images):
        ratio = rng.uniform(edges[i], edges[i + 1])
        masks[i] = generator(int(ratio * n), rng).ravel()
    return masks[rng.permutation(n_images)]
