"""A third-party suite as another package would ship it: one module and one TOML, found
through the entry-point group ``pathrobust.suites`` (tests/test_suite_contract.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pathrobust.config import at_least
from pathrobust.suites.base import RunContext, Suite, SuiteResult, TaskRow, option


@dataclass(frozen=True)
class ToySynthetic:
    tiles: int = field(metadata=at_least(2))
    size: int = field(metadata=at_least(8))
    seed: int


@dataclass(frozen=True)
class ToyProtocol:
    weight: float
    synthetic: ToySynthetic


@dataclass(frozen=True)
class ToyOptions:
    scale: float = option("--scale", "Multiply the score (a protocol variant when not 1).", 1.0)


class ToySuite(Suite):
    """Mean L2 norm of the features of a folder of tiles."""

    name = "toy"
    summary = "Toy suite: the mean feature norm of a tile folder."
    description = "Toy suite: the mean feature norm of a folder of tiles (a plugin test)."
    examples = ("pathrobust run toy --model rgb-histogram",)
    Protocol = ToyProtocol
    Options = ToyOptions
    toml = Path(__file__).with_name("toy.toml")

    def build_synthetic(self, root, overrides, progress):
        from PIL import Image

        from pathrobust.data.synthetic import mark_synthetic, synthetic_info

        params = {**asdict(self.protocol.synthetic), **overrides}
        if synthetic_info(root) is None:
            root.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng(params["seed"])
            for i in range(params["tiles"]):
                Image.fromarray(rng.integers(0, 255, (params["size"],) * 2 + (3,), dtype=np.uint8)).save(root / f"t{i}.png")
            mark_synthetic(root, "toy", params)
        return root

    def open_data(self, path, options, embed):
        from pathrobust.data.tiles import FolderTiles

        return FolderTiles(path)

    def evaluate(self, ctx: RunContext) -> SuiteResult:
        features = ctx.cache.load(ctx.data).features
        score = float(np.linalg.norm(features, axis=1).mean()) * self.protocol.weight * ctx.options.scale
        return SuiteResult(headline=score, rows=[TaskRow("", {"score": score, "n_tiles": len(features)})],
                           summary={"score": score})
