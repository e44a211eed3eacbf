"""``pathrobust demo``: the whole mission, end to end, offline, on real H&E pixels.

1. Build every demo suite's synthetic dataset from the bundled CC0 H&E (each suite's TOML
   says, in ``[demo]``, the sizes it uses here and in the reduced ``quick`` setting).
2. Distill a tiny ViT student from the ImageNet EfficientNet-Lite0 teacher (``distill/demo.toml``).
3. Run every demo suite on the teacher, the student, the student's random initialisation
   (what distillation added) and the colour-histogram floors.
4. Write the leaderboard report and print a short table.

The demo knows suites only through the registry: a suite with a ``[demo]`` table joins it.
Every step reuses finished work: a second run only redoes what is missing.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pathrobust.registry import EncoderSpec, load_spec_dir, save_spec_dir

TEACHER = "efficientnet-lite0-imagenet"
FLOORS = ("rgb-histogram", "hed-histogram")


@dataclass(frozen=True)
class DemoConfig:
    """How big the demo is: ``reduced`` takes each suite's ``[demo.quick]`` setting (the tests')."""

    reduced: bool = False
    distill_steps: int | None = None  # None: the recipe's
    recipe: str = "demo"
    batch_size: int = 64
    workers: int = 2

    @classmethod
    def quick(cls) -> DemoConfig:
        return cls(reduced=True, distill_steps=4, workers=0)


@dataclass
class DemoResult:
    out: Path
    models: list[str]
    suites: list[str]
    scores: dict[str, dict[str, float | None]]  # model -> suite -> headline score
    report_html: Path
    report_md: Path
    seconds: float


def demo_suites():
    """The registered suites that declare a ``[demo]`` table, in their demo order."""
    from pathrobust.suites.base import list_suites

    return sorted((s for s in list_suites() if s.demo is not None), key=lambda s: (s.demo.order, s.name))


def _student_floor(student_dir: Path, out: Path) -> Path:
    """The student's architecture at its random initialisation: the floor distillation lifts."""
    floor_dir = out / "student-random-init"
    if not (floor_dir / "encoder.json").is_file():
        spec = load_spec_dir(student_dir)
        floor: EncoderSpec = spec.replace(name=f"{spec.name}-random-init", pretrained=False, weights_path=None,
                                          description=f"{spec.name}'s architecture at random initialisation (seed {spec.seed})")
        save_spec_dir(floor, floor_dir)
    return floor_dir


def run_demo(out: str | Path = "pathrobust-demo", config: DemoConfig = DemoConfig(), progress: bool = True,
             say: Callable[[str], None] = print) -> DemoResult:
    """Run the demo into ``out`` (see the module doc); returns the scores and report paths."""
    from pathrobust.distill.recipe import load_recipe
    from pathrobust.distill.trainer import distill
    from pathrobust.reports.build import write_report
    from pathrobust.suites.base import headline, run_suite

    started = time.perf_counter()
    out = Path(out)
    runs = out / "runs"
    suites = demo_suites()
    settings = {s.name: s.demo.quick if config.reduced else s.demo.full for s in suites}

    say("1/4 synthetic data from the bundled H&E slide")
    data = {s.name: s.build_synthetic(out / "data" / s.name, settings[s.name].synthetic, progress) for s in suites}

    say("2/4 distilling a tiny ViT from the ImageNet EfficientNet-Lite0 teacher")
    student_dir = out / "student"
    if not (student_dir / "encoder.json").is_file():
        recipe = load_recipe(config.recipe)
        if config.distill_steps is not None:
            recipe = recipe.replace(optim=dataclasses.replace(recipe.optim, steps=config.distill_steps,
                                                              checkpoint_every=config.distill_steps))
        distill(recipe, student_dir, resume=True, progress=progress, log=say)
    floor_dir = _student_floor(student_dir, out)

    models = [TEACHER, str(student_dir), str(floor_dir), *FLOORS]
    names = {m: load_spec_dir(Path(m)).name if Path(m).is_dir() else m for m in models}
    scores: dict[str, dict[str, float | None]] = {names[m]: {} for m in models}
    for i, model in enumerate(models, 1):
        say(f"3/4 suites · {names[model]} ({i}/{len(models)})")
        for suite in suites:
            summary = run_suite(suite.name, model, data[suite.name], runs, batch_size=config.batch_size,
                                workers=config.workers, progress=progress, **settings[suite.name].options)
            scores[names[model]][suite.name] = headline(summary)

    say("4/4 leaderboard report")
    files = write_report(runs / "results.sqlite", out / "report")
    return DemoResult(out, [names[m] for m in models], [s.name for s in suites], scores, files.html, files.markdown,
                      time.perf_counter() - started)
