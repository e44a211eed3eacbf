"""Recipe values out of range are one line naming the file and the key, before any training
(issue 19: global_size smaller than a patch, hue > 0.5, negative warmup_lr, negative jitter
strengths, and the other keys of the same kind)."""

from __future__ import annotations

import math
import tomllib

import pytest

from pathrobust.distill.recipe import recipe_from_dict, student_patch_size
from pathrobust.errors import UserError
from tests.helpers import assert_one_line_error, run_cli
from tests.test_distill_train import tiny_recipe_toml

TINY_PATCH = 8  # tiny_recipe_toml: arch_kwargs patch_size = 8, global 32 px, local 16 px


def tiny(**changes) -> dict:
    data = tomllib.loads(tiny_recipe_toml("rgb-histogram"))
    for dotted, value in changes.items():
        *tables, key = dotted.split("__")
        node = data
        for t in tables:
            node = node.setdefault(t, {})
        node[key] = value
    return data


@pytest.mark.parametrize("change,key,words", [
    ({"crops__global_size": 6}, "crops.global_size", "= 6 is smaller than the student's 8 px patch"),
    ({"crops__local_size": 4}, "crops.local_size", "= 4 is smaller than the student's 8 px patch"),
    ({"crops__global_size": 12, "student__arch_kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2}},
     "crops.global_size", "smaller than the student's 14 px patch"),  # the patch of the timm name
    ({"augment__hue": 0.6}, "augment.hue", "must be in [0, 0.5], got 0.6"),
    ({"augment__hue": -0.1}, "augment.hue", "must be >= 0"),
    ({"heads__warmup_lr": -0.001}, "heads.warmup_lr", "must be > 0"),
    ({"augment__brightness": -0.2}, "augment.brightness", "must be >= 0"),
    ({"augment__contrast": -0.2}, "augment.contrast", "must be >= 0"),
    ({"augment__saturation": -0.1}, "augment.saturation", "must be >= 0"),
    ({"augment__hed_sigma": 1.5}, "augment.hed_sigma", "must be in [0, 1]"),
    ({"heads__prototype_scale": 0.0}, "heads.prototype_scale", "must be > 0"),
    ({"optim__betas": [0.9, 1.0]}, "optim.betas", "each in [0, 1)"),
    ({"optim__betas": [0.9]}, "optim.betas", "[beta1, beta2]"),
    ({"seed": -1}, "seed", "must be >= 0"),
    ({"optim__base_lr": math.nan}, "optim.base_lr", "must be a finite number"),
    ({"loss__teacher_temp": math.inf}, "loss.teacher_temp", "must be a finite number"),
    ({"crops__global_scale": [0.3, math.nan]}, "crops.global_scale[1]", "must be a finite number"),
    ({"student__name": "my student"}, "student.name", "must be a non-empty word"),
    ({"teacher__model": " "}, "teacher.model", "must name an encoder"),
])
def test_out_of_range_values_name_file_and_key(change, key, words):
    with pytest.raises(UserError) as err:
        recipe_from_dict(tiny(**change), "bad.toml")
    msg = str(err.value)
    assert msg.startswith(f"bad.toml: '{key}' ") and words in msg and "\n" not in msg, msg


def test_values_at_the_edges_are_accepted():
    r = recipe_from_dict(tiny(crops__global_size=TINY_PATCH, crops__local_size=TINY_PATCH, augment__hue=0.5,
                              augment__brightness=0.0, optim__betas=[0.99, 0.9], seed=0), "ok.toml")
    assert student_patch_size(r) == TINY_PATCH and r.optim.betas == [0.99, 0.9]
    r = recipe_from_dict(tiny(crops__local_size=2, crops__n_local=0), "ok.toml")  # no local crops: size unused
    assert r.crops.n_local == 0


def test_the_built_student_checks_its_real_patch(tmp_path):
    from pathrobust.distill.trainer import build_student_backbone

    data = tiny(crops__global_size=12)
    data["student"]["arch"] = "vit_small_patch14_reg4_dinov2"
    data["student"]["arch_kwargs"] = {"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 8}
    r = recipe_from_dict(data, "bad.toml")  # the recipe says patch 8: fine on paper
    r.student.arch_kwargs["patch_size"] = 16  # as if the recipe could not say (a custom arch)
    with pytest.raises(UserError, match="bad.toml: 'crops.global_size' = 12 is smaller than the student's 16 px patch"):
        build_student_backbone(r)


def test_cli_reports_a_bad_recipe_in_one_line(tmp_path):
    text = tiny_recipe_toml("rgb-histogram").replace("[crops]", "[augment]\nhue = 0.7\n[crops]")
    (tmp_path / "bad.toml").write_text(text)
    proc = run_cli("distill", "--recipe", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, "bad.toml", "'augment.hue'", "[0, 0.5]")
    assert proc.returncode == 2 and not (tmp_path / "out").exists()
