"""The trainer's objectives (one per heads.mode), its timing hook and distributed helpers.

The recorded traces below come from the trainer as it was before the objectives were split
out (commit 4b355bd, one Distiller with a branch per mode). On the machine that recorded
them the refactored trainer reproduces them bit for bit, along with the final student, EMA,
teacher heads, centres and optimiser state; the tolerance only allows another CPU's float
kernels."""

from __future__ import annotations

import tomllib

import numpy as np
import pytest
import torch

from pathrobust.distill import dist as D
from pathrobust.distill.objectives import (OBJECTIVES, DinoIbotStudent, PrototypeDinoIbotObjective,
                                           RegressionObjective, RegressionStudent, WarmupDinoIbotObjective)
from pathrobust.distill.recipe import HEAD_MODES, recipe_from_dict
from pathrobust.distill.timing import NO_TIMER, StepTimer
from tests.test_distill_train import teacher, tiny_recipe_toml  # noqa: F401  (fixture)

RECORDED = {
    "warmup-sinkhorn": [
        {"loss": 6.741579532623291, "dino": 5.399216175079346, "ibot": 1.3423632383346558},
        {"loss": 7.347611427307129, "dino": 4.4078850746154785, "ibot": 2.2710835933685303, "koleo": 6.686429977416992},
        {"loss": 7.562226295471191, "dino": 4.498800754547119, "ibot": 2.3341174125671387, "koleo": 7.293081283569336},
        {"loss": 11.361684799194336, "dino": 6.465596675872803, "ibot": 3.701356887817383, "koleo": 11.947310447692871},
    ],
    "warmup-ema": [
        {"loss": 6.741579532623291, "dino": 5.399216175079346, "ibot": 1.3423632383346558},
        {"loss": 6.816612720489502, "dino": 4.146885871887207, "ibot": 2.0010838508605957, "koleo": 6.686429977416992},
        {"loss": 7.510172367095947, "dino": 4.3901543617248535, "ibot": 2.39070987701416, "koleo": 7.293081283569336},
        {"loss": 7.568274974822998, "dino": 4.196808338165283, "ibot": 2.1693599224090576, "koleo": 12.021069526672363},
    ],
    "prototypes-ema": [
        {"loss": 7.2571492195129395, "dino": 4.298971652984619, "ibot": 2.284005880355835, "koleo": 6.741720676422119},
        {"loss": 7.170412540435791, "dino": 4.26568603515625, "ibot": 2.236083507537842, "koleo": 6.686429977416992},
        {"loss": 11.031880378723145, "dino": 6.304219722747803, "ibot": 3.530533790588379, "koleo": 11.971274375915527},
    ],
    "prototypes-sinkhorn": [
        {"loss": 7.240138530731201, "dino": 4.370906352996826, "ibot": 2.1950600147247314, "koleo": 6.741720676422119},
        {"loss": 7.32004451751709, "dino": 4.38118839263916, "ibot": 2.2702131271362305, "koleo": 6.686429977416992},
        {"loss": 11.440776824951172, "dino": 6.435054779052734, "ibot": 3.8030354976654053, "koleo": 12.026864051818848},
    ],
    "regression-sinkhorn": [
        {"loss": 2.914591073989868, "cls": 1.202138066291809, "patch": 1.038280963897705, "koleo": 6.741720676422119},
        {"loss": 2.963118076324463, "cls": 1.206160306930542, "patch": 1.0883147716522217, "koleo": 6.686429977416992},
        {"loss": 3.027949810028076, "cls": 1.217860460281372, "patch": 0.6778284311294556, "koleo": 11.322608947753906},
    ],
}


def tiny(teacher_model, mode, centering, steps=3, warmup=1):
    return recipe_from_dict(tomllib.loads(tiny_recipe_toml(teacher_model, mode=mode, steps=steps, warmup=warmup,
                                                           centering=centering)), "tiny.toml")


TERMS = {"loss", "dino", "ibot", "koleo", "cls", "patch"}


# every objective, both centrings, the heads' warm-up phase (the other two recorded cases
# were checked once, by hand; they add run time, not coverage)
@pytest.mark.parametrize("case", ["warmup-sinkhorn", "prototypes-ema", "regression-sinkhorn"])
def test_loss_traces_match_the_trainer_before_the_refactor(teacher, tmp_path, case):  # noqa: F811
    from pathrobust.distill.trainer import distill

    mode, centering = case.split("-")
    distill(tiny(teacher, mode, centering), tmp_path / case, progress=False)
    history = torch.load(tmp_path / case / "checkpoint.pt", weights_only=True)["history"]
    assert [set(h) & TERMS for h in history] == [set(r) for r in RECORDED[case]]
    for got, want in zip(history, RECORDED[case], strict=True):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (case, got["step"], key)


def test_one_objective_per_head_mode():
    assert set(OBJECTIVES) == set(HEAD_MODES)
    assert OBJECTIVES["regression"] is RegressionObjective and RegressionObjective.student_class is RegressionStudent
    assert OBJECTIVES["warmup"] is WarmupDinoIbotObjective and OBJECTIVES["prototypes"] is PrototypeDinoIbotObjective
    assert WarmupDinoIbotObjective.student_class is PrototypeDinoIbotObjective.student_class is DinoIbotStudent


@pytest.mark.parametrize("mode", HEAD_MODES)
def test_objective_state_and_phases(teacher, tmp_path, mode):  # noqa: F811
    from pathrobust.distill.trainer import Distiller

    d = Distiller(tiny(teacher, mode, "ema", warmup=2), tmp_path, progress=False)
    assert type(d.objective) is OBJECTIVES[mode] and type(d.student) is OBJECTIVES[mode].student_class
    assert d.objective.head_steps == (2 if mode == "warmup" else 0)
    assert d.schedule(d.objective.head_steps)["student_step"] == 0
    names = {n.split(".")[0] for n, _ in d.student.named_parameters()}
    assert names == ({"backbone", "cls_proj", "patch_proj"} if mode == "regression" else {"backbone", "dino_head", "ibot_head"})
    state = d.objective.state_dict()
    assert set(state) == {"teacher_heads", "centers", "heads_optimizer"}
    assert bool(state["teacher_heads"]) == (mode != "regression")
    assert bool(state["heads_optimizer"]) == (mode == "warmup")
    if mode == "prototypes":  # prepare() fits unit-norm k-means prototypes of the teacher
        d.objective.prepare(d.batches)
        protos = d.objective.teacher_heads.dino.prototypes
        assert torch.allclose(protos.norm(dim=1), torch.ones(len(protos)), atol=1e-5)


class SpyTimer:
    def __init__(self):
        self.calls = []

    def start(self, device):
        self.calls.append("start")

    def mark(self, phase):
        self.calls.append(phase)


def test_step_timing_is_a_hook(teacher, tmp_path):  # noqa: F811
    from pathrobust.distill.trainer import Distiller

    d = Distiller(tiny(teacher, "regression", "sinkhorn"), tmp_path, progress=False)
    assert d.timer is NO_TIMER
    spy = SpyTimer()
    d.timer = spy
    d.train_step(d.batches[0])
    assert spy.calls == ["start", "teacher", "losses", "student", "losses", "student", "optimizer"]
    ticks = iter(range(100))
    d.timer = StepTimer(clock=lambda: float(next(ticks)))  # each boundary one "second" apart
    d.train_step(d.batches[1])
    t = d.timer.times
    assert (t.teacher, t.losses, t.student, t.optimizer) == (1.0, 2.0, 2.0, 1.0)
    with pytest.raises(ValueError, match="unknown phase"):
        d.timer.mark("bogus")


def test_distributed_helpers_are_identities_in_one_process():
    x = torch.arange(6.0).view(3, 2)
    assert not D.is_distributed() and D.world_size() == 1 and D.rank() == 0
    assert D.gather_rows(x) is x and D.all_gather_with_grad(x) is x
    assert D.mean_over_ranks({"a": torch.tensor(2.5), "b": torch.tensor([4.0])}) == {"a": 2.5, "b": 4.0}
    module = torch.nn.Linear(2, 2)
    assert D.wrap_ddp(module, torch.device("cpu")) is module
    D.barrier()
    assert np.isclose(float(D.all_reduce_sum(torch.tensor(3.0))), 3.0)
