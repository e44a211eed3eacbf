"""Exported students are reproducible artefacts: the same tensors give the same
``model.safetensors`` bytes (metadata in sorted order, so ``weights_sha256`` and the run ids
built from it are stable), and every file is written with the user's umask."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pathrobust.distill.export import safetensors_bytes
from tests.test_distill_train import recipe, teacher  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
TENSORS = {"blocks.0.w": torch.arange(12.0).view(3, 4), "cls_token": torch.ones(1, 1, 4),
           "a_half": torch.zeros(2, dtype=torch.float16), "steps": torch.arange(3)}
METADATA = {"teacher": "t", "format": "pt", "recipe": "r", "zeta": "z", "alpha": "a"}


def test_safetensors_bytes_are_a_valid_file_with_sorted_metadata(tmp_path):
    blob = safetensors_bytes(TENSORS, METADATA)
    (tmp_path / "m.safetensors").write_bytes(blob)
    back = load_file(str(tmp_path / "m.safetensors"))
    assert back.keys() == TENSORS.keys() and all(torch.equal(back[k], TENSORS[k]) for k in TENSORS)
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert f.metadata() == METADATA
    n = int.from_bytes(blob[:8], "little")
    assert n % 8 == 0
    header = json.loads(blob[8:8 + n])
    assert list(header)[0] == "__metadata__" and list(header["__metadata__"]) == sorted(METADATA)


def test_same_tensors_same_bytes_across_processes():
    """safetensors' own metadata order changes with each hash map (and process): not ours."""
    code = ("import hashlib, torch; from pathrobust.distill.export import safetensors_bytes; "
            "t = {'w': torch.arange(6.0), 'b': torch.ones(2)}; "
            "print(hashlib.sha256(safetensors_bytes(t, {'teacher': 't', 'format': 'pt', 'recipe': 'r'})).hexdigest())")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    digests = {subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
               for _ in range(3)}
    assert len(digests) == 1
    ours = {hashlib.sha256(safetensors_bytes(TENSORS, dict(reversed(list(METADATA.items()))))).hexdigest(),
            hashlib.sha256(safetensors_bytes(TENSORS, METADATA)).hexdigest()}
    assert len(ours) == 1


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_distillation_twice_gives_the_same_weights_file_with_the_umask(teacher, tmp_path):  # noqa: F811
    from pathrobust.distill.trainer import distill

    r = recipe(teacher, steps=1, warmup=0)
    old = os.umask(0o022)
    try:
        distill(r, tmp_path / "a", progress=False)
    finally:
        os.umask(old)
    old = os.umask(0o077)
    try:
        distill(r, tmp_path / "b", progress=False)
    finally:
        os.umask(old)
    a, b = (tmp_path / "a" / "model.safetensors").read_bytes(), (tmp_path / "b" / "model.safetensors").read_bytes()
    assert hashlib.sha256(a).hexdigest() == hashlib.sha256(b).hexdigest()
    for name in ("model.safetensors", "encoder.json", "checkpoint.pt", "history.json"):
        assert _mode(tmp_path / "a" / name) == 0o644, name  # 0666 & ~022
        assert _mode(tmp_path / "b" / name) == 0o600, name  # 0666 & ~077
    assert not list((tmp_path / "a").glob("*.tmp"))
