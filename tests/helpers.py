"""Shared test helpers: tiny encoder specs and running the CLI in-process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pathrobust.registry import EncoderSpec

REPO = Path(__file__).resolve().parents[1]


def tiny_vit_spec(name: str = "tiny-vit", img: int = 56, dim: int = 64, depth: int = 2, **changes) -> EncoderSpec:
    """A ViT/14 with 4 registers, small enough for CPU tests (random weights)."""
    base = dict(
        name=name, family="test", arch="vit_small_patch14_reg4_dinov2",
        arch_kwargs={"img_size": img, "embed_dim": dim, "depth": depth, "num_heads": 2},
        input_size=img, poolings={"cls": dim, "cls+mean": 2 * dim, "mean": dim}, num_prefix_tokens=5,
        pretrained=False, precision="fp32",
    )
    base.update(changes)
    return EncoderSpec(**base)


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Run ``python -m pathrobust ARGS`` in a subprocess (the path a user takes)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATHROBUST_NO_PROGRESS": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])),
                **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "pathrobust", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd)
    if check and proc.returncode != 0:
        pytest.fail(f"pathrobust {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Bad input: non-zero exit, no traceback, one line on stderr naming what is wrong."""
    assert proc.returncode != 0, proc.stdout
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in err, err
