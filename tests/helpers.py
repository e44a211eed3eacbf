"""Shared test helpers: tiny encoder specs and running the CLI in-process."""

from __future__ import annotations

import os
import socket
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


def free_port() -> int:
    """A TCP port free right now on localhost (for torchrun's rendezvous; tests run in parallel)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, check: bool = False,
            subprocess_: bool = False) -> subprocess.CompletedProcess:
    """Run ``pathrobust ARGS``: in this process through :func:`pathrobust.cli.main` (what the
    console script calls; the start-up of a fresh interpreter with torch and timm costs ~8 s of
    CPU), or in a subprocess ``python -m pathrobust`` (the path a user takes) when ``env`` is
    given (plugins on another PYTHONPATH) or ``subprocess_`` is set."""
    if env is not None or subprocess_:
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATHROBUST_NO_PROGRESS": "1",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])),
                    **(env or {})}
        proc = subprocess.run([sys.executable, "-m", "pathrobust", *args], capture_output=True, text=True,
                              env=full_env, cwd=cwd)
    else:
        proc = _run_in_process(list(args), cwd)
    if check and proc.returncode != 0:
        pytest.fail(f"pathrobust {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _run_in_process(args: list[str], cwd: Path | None) -> subprocess.CompletedProcess:
    """``main(args)`` with stdout/stderr captured (rich consoles write to whatever sys.stdout and
    sys.stderr are at print time) and the exit status taken from its ``SystemExit``."""
    import contextlib
    import io

    from pathrobust.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_cwd = os.getcwd()
    code = 0
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(args)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.chdir(old_cwd)
    return subprocess.CompletedProcess(["pathrobust", *args], code, out.getvalue(), err.getvalue())


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Bad input: non-zero exit, no traceback, one line on stderr naming what is wrong."""
    assert proc.returncode != 0, proc.stdout
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in err, err
