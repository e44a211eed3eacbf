"""Spec hashes are run identities: they must not drift.

Run ids, the results DB and the committed demo report (``reports/demo``) are keyed by
``spec.hash``. These values were recorded before the encoder registry was reorganised
(converters named by specs, spec-declared weight locators); a change here re-keys every
stored run, so it must be deliberate (then update the table and regenerate the demo report).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pathrobust.registry import EncoderSpec, list_specs

ROOT = Path(__file__).resolve().parents[1]
RECORDED = {
    "conch": "c4c909da00f8649f",
    "conch-224": "8db90c9d088b2152",
    "efficientnet-lite0-imagenet": "e12e400731c4393b",
    "h-optimus-0": "862a27bc9dd13c6d",
    "h-optimus-1": "64344a8fc66746ea",
    "h0-mini": "3ad8a6f0a45ecf31",
    "hed-histogram": "b4d4789bb2721dc2",
    "hibou-b": "d92c8a501888b1ee",
    "hibou-l": "98d5b490d7bdb1a9",
    "kaiko-vit-b16": "adb9440b8fc2e629",
    "kaiko-vit-b8": "2dde7b81604f3157",
    "kaiko-vit-l14": "5a37803f19c266ad",
    "kaiko-vit-s16": "f965119ccc6e3ef4",
    "kaiko-vit-s8": "0599ae4fd63e0848",
    "midnight-12k": "e5915a25dc287eba",
    "phikon": "3df9ff70d05eb6b3",
    "phikon-v2": "17ae5b4ab597e123",
    "prov-gigapath": "1b6d00579e880990",
    "rgb-histogram": "c57b8c26b85b72d1",
    "uni": "eba09f294c771b86",
    "uni2-h": "01ed3a109d394a54",
    "virchow": "9d92008ec593ff65",
    "virchow2": "510260b90cfc9bb0",
    "vit-s14-random": "970c48726280c84f",
}
DEMO_STUDENT, DEMO_FLOOR = "ab1baa58eb01e80b", "a413908f0ac74df6"


def test_builtin_spec_hashes_are_unchanged():
    hashes = {s.name: s.hash for s in list_specs() if s.name in RECORDED}
    assert hashes == RECORDED


def test_demo_students_keep_the_hashes_of_the_committed_report():
    from pathrobust.distill.export import student_spec
    from pathrobust.distill.recipe import load_recipe
    from pathrobust.distill.trainer import build_student_backbone

    recipe = load_recipe("demo")
    spec = student_spec(recipe, build_student_backbone(recipe), Path("/anywhere/model.safetensors"),
                        "efficientnet-lite0-imagenet")
    floor = spec.replace(name=f"{spec.name}-random-init", pretrained=False, weights_path=None, description="floor")
    assert (spec.hash, floor.hash) == (DEMO_STUDENT, DEMO_FLOOR)
    report = json.loads((ROOT / "reports" / "demo" / "leaderboard.json").read_text())
    in_report = {row["spec_hash"] for board in report["boards"] for row in board["rows"] if row.get("spec_hash")}
    assert {DEMO_STUDENT, DEMO_FLOOR, RECORDED["efficientnet-lite0-imagenet"]} <= in_report


@pytest.mark.parametrize("name", ["efficientnet-lite0-imagenet", "conch", "phikon"])
def test_python_only_fields_are_neither_saved_nor_hashed(name):
    spec = next(s for s in list_specs() if s.name == name)
    data = spec.to_dict()
    assert "weights_locator" not in data
    again = EncoderSpec.from_dict(json.loads(json.dumps(data)))
    assert again == spec and again.hash == spec.hash and again.weights_locator is None
