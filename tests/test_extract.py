"""Resumable extraction: SIGKILL at any moment, rerun, byte-identical output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from pathrobust.data.tiles import ArrayTiles
from pathrobust.encoders.base import build_encoder
from pathrobust.errors import UserError
from pathrobust.extract import WORKERS_MIN_TILES, extract_features, load_features
from tests.helpers import REPO, tiny_vit_spec

N_TILES = 240

SCRIPT = textwrap.dedent(f'''
    import sys, time
    import numpy as np
    sys.path.insert(0, {str(REPO)!r})
    from pathrobust.data.tiles import ArrayTiles
    from pathrobust.encoders.base import build_encoder
    from pathrobust.extract import extract_features
    from tests.helpers import tiny_vit_spec

    class SlowTiles(ArrayTiles):
        def read(self, i):
            time.sleep(0.004)  # decoding cost, so a kill lands mid-run
            return super().read(i)

    tiles = np.random.default_rng(0).integers(0, 255, ({N_TILES}, 64, 64, 3), dtype=np.uint8)
    encoder = build_encoder(tiny_vit_spec())
    extract_features(encoder, SlowTiles(tiles, name="slide"), sys.argv[1], batch_size=8, chunk_tiles=32,
                     num_workers=0, progress=False)
''')


def _run(script: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script), str(out)], env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_sigkill_at_several_points_then_resume_is_byte_identical(tmp_path):
    script = tmp_path / "extract.py"
    script.write_text(SCRIPT)
    reference = tmp_path / "reference.h5"
    assert _run(script, reference).wait(timeout=300) == 0

    out = tmp_path / "resumed.h5"
    partial = out.with_name(out.name + ".partial")
    kills = 0
    for wait_chunks in (0, 1, 3, 5):
        proc = _run(script, out)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            done = len(list(partial.glob("*.npy"))) if partial.exists() else 0
            if done >= wait_chunks and (wait_chunks or partial.exists()):
                break
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        assert not out.exists() or proc.returncode == 0  # never a half-written final file
    assert kills >= 3
    assert _run(script, out).wait(timeout=300) == 0
    assert out.read_bytes() == reference.read_bytes()
    assert not partial.exists()


def test_finished_file_is_kept_and_conflicts_are_reported(tmp_path):
    tiles = ArrayTiles(np.random.default_rng(0).integers(0, 255, (10, 56, 56, 3), dtype=np.uint8), name="s")
    enc = build_encoder(tiny_vit_spec())
    path = extract_features(enc, tiles, tmp_path / "s.h5", batch_size=4, progress=False)
    mtime = path.stat().st_mtime_ns
    extract_features(enc, tiles, path, batch_size=4, progress=False)
    assert path.stat().st_mtime_ns == mtime  # not rewritten
    other = build_encoder(tiny_vit_spec(), pooling="cls+mean")
    with pytest.raises(UserError, match="already exists with different pooling"):
        extract_features(other, tiles, path, progress=False)
    extract_features(other, tiles, path, overwrite=True, progress=False)
    ff = load_features(path)
    assert ff.features.shape == (10, 128) and ff.attrs["pooling"] == "cls+mean"
    assert ff.attrs["model"] == "tiny-vit" and ff.attrs["precision"] == "fp32"
    assert ff.attrs["spec_hash"] == other.spec.hash and ff.attrs["pathrobust_version"]


def test_features_do_not_depend_on_batch_size_or_workers(tmp_path):
    n = WORKERS_MIN_TILES + 8  # enough for worker processes to be used
    tiles = ArrayTiles(np.random.default_rng(2).integers(0, 255, (n, 28, 28, 3), dtype=np.uint8), name="s")
    enc = build_encoder(tiny_vit_spec(img=28))
    a = load_features(extract_features(enc, tiles, tmp_path / "a.h5", batch_size=n, progress=False)).features
    b = load_features(extract_features(enc, tiles, tmp_path / "b.h5", batch_size=50, num_workers=2, progress=False)).features
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
