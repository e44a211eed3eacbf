"""``pathrobust demo``: the whole mission, end to end, offline, on real H&E pixels.

1. Build the synthetic PLISM-, HEST- and EVA-like datasets from the bundled CC0 Aperio slide.
2. Distill a tiny ViT student from the ImageNet EfficientNet-Lite0 teacher (``distill/demo.toml``).
3. Run the three suites on the teacher, the student, the student's random initialisation
   (what distillation added) and the colour-histogram floors.
4. Write the leaderboard report and print a short table.

Every step reuses finished work: a second run only redoes what is missing.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pathrobust.registry import EncoderSpec, load_spec_dir, save_spec_dir

TEACHER = "efficientnet-lite0-imagenet"
FLOORS = ("rgb-histogram", "hed-histogram")


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of everything the demo builds; ``quick()`` is the reduced setting of the tests."""

    plism_tiles_per_slide: int = 32
    plism_stainings: tuple[str, ...] | None = None  # None: all 13
    plism_scanners: tuple[str, ...] | None = None  # None: all 7
    hest: dict[str, Any] = field(default_factory=dict)  # SynthHestConfig overrides
    eva: dict[str, Any] = field(default_factory=dict)  # SynthEvaConfig overrides
    eva_max_steps: int | None = None
    eva_runs: int | None = None
    distill_steps: int | None = None  # None: the recipe's
    recipe: str = "demo"
    batch_size: int = 64
    workers: int = 2

    @classmethod
    def quick(cls) -> DemoConfig:
        return cls(
            plism_tiles_per_slide=12, plism_stainings=("GV", "HR", "MY"), plism_scanners=("AT2", "S60"),
            hest={"samples_per_task": 2, "spots_per_sample": 24, "folds": 2, "tasks": ("SYNTH_A",)},
            eva={"crc_train_per_class": 6, "crc_val_per_class": 3, "mhist_tiles": 30},
            eva_max_steps=200, eva_runs=2, distill_steps=4, workers=0,
        )


@dataclass
class DemoResult:
    out: Path
    models: list[str]
    scores: dict[str, dict[str, float | None]]  # model -> suite -> score
    report_html: Path
    report_md: Path
    seconds: float


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
    from pathrobust.data.synth_eva import SynthEvaConfig, write_synth_eva
    from pathrobust.data.synth_hest import SynthHestConfig, build_synth_hest
    from pathrobust.data.synth_plism import SynthPlismConfig, synth_plism
    from pathrobust.distill.recipe import load_recipe
    from pathrobust.distill.trainer import distill
    from pathrobust.reports.build import write_report
    from pathrobust.suites.eva import run_eva
    from pathrobust.suites.hest import run_hest
    from pathrobust.suites.plism import run_plism

    started = time.perf_counter()
    out = Path(out)
    data, runs = out / "data", out / "runs"

    say("1/4 synthetic data from the bundled H&E slide")
    plism_cfg = SynthPlismConfig(tiles_per_slide=config.plism_tiles_per_slide)
    if config.plism_stainings:
        plism_cfg = dataclasses.replace(plism_cfg, stainings=tuple(config.plism_stainings))
    if config.plism_scanners:
        plism_cfg = dataclasses.replace(plism_cfg, scanners=tuple(config.plism_scanners))
    plism_data = data / "plism"
    if not plism_data.exists():
        synth_plism(plism_data, plism_cfg, progress=progress)
    hest_data = data / "hest"
    if not hest_data.exists():
        build_synth_hest(hest_data, SynthHestConfig.from_mapping(config.hest))
    eva_data = data / "eva"
    if not eva_data.exists():
        write_synth_eva(eva_data, SynthEvaConfig(**config.eva))

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
    common = dict(batch_size=config.batch_size, progress=progress)
    for i, model in enumerate(models, 1):
        say(f"3/4 suites · {names[model]} ({i}/{len(models)})")
        plism = run_plism(model=model, out=runs, data=plism_data, workers=config.workers, **common)
        hest = run_hest(bench_root=hest_data, out=runs, model=model, num_workers=config.workers, **common)
        eva = run_eva(model, eva_data, out=runs, workers=config.workers, n_runs=config.eva_runs,
                      max_steps=config.eva_max_steps, **common)
        scores[names[model]] = {
            "plism": _get(plism, "leaderboard_unrounded"),
            "hest": _get(hest, "average"),
            "eva": _get(eva, "average"),
        }

    say("4/4 leaderboard report")
    files = write_report(runs / "results.sqlite", out / "report")
    return DemoResult(out, [names[m] for m in models], scores, files.html, files.markdown,
                      time.perf_counter() - started)


def _get(summary: dict[str, Any], key: str) -> float | None:
    """A suite summary's headline score (each suite's summary.json names it)."""
    value = summary.get(key)
    if isinstance(value, dict):
        value = value.get("balanced_accuracy_mean")
    return None if value is None else float(value)
