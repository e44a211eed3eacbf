"""Scale-out: torchrun ranks (gloo, 2 CPU processes), job-array shards and concurrent launches
give the outputs of one process, every chunk computed once (counted from the logs).

Subprocess launches are the expensive part (each imports torch): torchrun runs are kept to
five; shards, merges and bad input run in this process through the CLI's ``main``."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pathrobust.cli import main
from tests.helpers import REPO, free_port

BATCH, CHUNK = 8, 16
SIZES = {"slide0": 120, "slide1": 250, "slide2": 70}   # 8 + 16 + 5 = 29 chunks of 16 tiles
N_CHUNKS = sum(-(-n // CHUNK) for n in SIZES.values())

MODEL = textwrap.dedent('''
    from pathrobust import EncoderSpec

    def tiny():
        return EncoderSpec(
            name="tiny", family="test", arch="vit_small_patch16_224",
            arch_kwargs={"img_size": 32, "patch_size": 16, "embed_dim": 48, "depth": 1, "num_heads": 2},
            input_size=32, poolings={"cls": 48, "cls+mean": 96}, pretrained=False, precision="fp32",
        )
''')
CHUNK_LINE = re.compile(r"INFO (\[(?P<who>[a-z]+ \d+/\d+)\] )?chunk (?P<file>\S+) (?P<chunk>\d+)/\d+ tiles")


def _env(**extra) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PATHROBUST_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1",
            "PATHROBUST_CHUNK_TILES": str(CHUNK),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])), **extra}


def _torchrun(*args: str, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "pathrobust", *args]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _single(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pathrobust", *args], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, ok: bool = True, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    if ok:
        assert proc.returncode == 0, out
    return out


def _chunks(log: Path, start: int = 0) -> list[tuple[str, int, str]]:
    """(file, chunk, who) of every chunk line of ``log`` from line ``start``."""
    lines = log.read_text().splitlines()[start:] if log.is_file() else []
    found = [CHUNK_LINE.search(line) for line in lines]
    return [(m["file"], int(m["chunk"]), m["who"] or "") for m in found if m]


def _cli(*args: str, capsys=None) -> tuple[int, str]:
    """``pathrobust ARGS`` in this process: (exit status, stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    import pathrobust.extract

    monkeypatch.setattr(pathrobust.extract, "DEFAULT_CHUNK_TILES", CHUNK)  # as PATHROBUST_CHUNK_TILES does


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks run with 1 thread: same kernels, same bits
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    from pathrobust.data.he import sample_he_tiles

    root = tmp_path_factory.mktemp("scale")
    (root / "tiny_model.py").write_text(MODEL)
    data = root / "data"
    data.mkdir()
    for k, (name, n) in enumerate(SIZES.items()):
        with h5py.File(data / f"{name}.h5", "w") as f:
            f["img"] = sample_he_tiles(n, size=32, seed=k)
            f["coords"] = np.stack([np.arange(n), np.zeros(n)], 1).astype(np.int64)
    args = ["--model", f"{root / 'tiny_model.py'}:tiny", "--data", str(data), "--workers", "0",
            "--batch-size", str(BATCH), "--no-progress"]
    code, _ = _cli("extract", *args, "--out", str(root / "reference"))
    assert code == 0
    reference = {p.name: p.read_bytes() for p in (root / "reference" / "tiny").glob("*.h5")}
    assert sorted(reference) == [f"{n}.h5" for n in SIZES]
    return root, args, reference


def _same_files(folder: Path, reference: dict[str, bytes]) -> None:
    assert sorted(p.name for p in folder.glob("*.h5")) == sorted(reference)
    for name, data in reference.items():
        assert (folder / name).read_bytes() == data, name
    assert not list(folder.glob("*.partial")) and not list(folder.glob("*.lock"))


def _each_chunk_once(chunks) -> None:
    counts = Counter((f, c) for f, c, _ in chunks)
    assert len(counts) == N_CHUNKS and set(counts.values()) == {1}, counts.most_common(3)


def test_torchrun_extraction_equals_one_process(setup):
    root, args, reference = setup
    out = root / "torchrun"
    text = _finish(_torchrun("extract", *args, "--out", str(out)))
    _same_files(out / "tiny", reference)
    chunks = _chunks(out / "tiny" / "extract.log")
    _each_chunk_once(chunks)
    assert {who for _, _, who in chunks} == {"rank 0/2", "rank 1/2"}  # both ranks took a share
    assert text.count("✓") == len(SIZES)  # rank 0 alone reports


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _wait_for(predicate, timeout: float = 300, what: str = "") -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_killed_rank_then_relaunch_completes_only_what_is_missing(setup):
    root, args, reference = setup
    out = root / "killed"
    log = out / "tiny" / "extract.log"
    proc = _torchrun("extract", *args, "--out", str(out))
    _wait_for(lambda: len(_chunks(log)) >= 4 or proc.poll() is not None, what="the first chunks")
    ranks = _children(proc.pid)
    assert len(ranks) == 2 and proc.poll() is None, "the launch ended before a rank could be killed"
    for pid in ranks:  # freeze both so the kill lands mid-run, then kill one
        os.kill(pid, signal.SIGSTOP)
    os.kill(ranks[1], signal.SIGKILL)
    os.kill(ranks[0], signal.SIGCONT)
    _finish(proc, ok=False)
    assert proc.returncode != 0
    first = _chunks(log)
    assert 0 < len(first) < N_CHUNKS
    n_lines = len(log.read_text().splitlines())

    _finish(_torchrun("extract", *args, "--out", str(out)))
    second = _chunks(log, start=n_lines)
    assert len(second) == N_CHUNKS - len(first)  # only what was missing
    _each_chunk_once(first + second)
    _same_files(out / "tiny", reference)


def test_two_concurrent_launches_do_every_chunk_once(setup):
    """A one-process launch and a 2-rank torchrun launch over the same outputs. The first is
    frozen mid-run (holding chunk locks) until the second works, so they overlap for sure."""
    root, args, reference = setup
    out = root / "concurrent"
    log = out / "tiny" / "extract.log"
    alone = _single("extract", *args, "--out", str(out))
    _wait_for(lambda: len(_chunks(log)) >= 2 or alone.poll() is not None, what="the first launch's chunks")
    os.kill(alone.pid, signal.SIGSTOP)
    try:
        ranks = _torchrun("extract", *args, "--out", str(out))
        _wait_for(lambda: any(who.startswith("rank") for _, _, who in _chunks(log)) or ranks.poll() is not None,
                  what="the second launch's chunks")
    finally:
        os.kill(alone.pid, signal.SIGCONT)
    _finish(alone)
    _finish(ranks)
    chunks = _chunks(log)
    _each_chunk_once(chunks)
    who = Counter(w.split()[0] if w else "alone" for _, _, w in chunks)
    assert who["alone"] >= 2 and who["rank"] >= 1, who
    _same_files(out / "tiny", reference)


def test_shards_then_merge_equal_one_process(setup, capsys):
    root, args, reference = setup
    out = root / "shards"
    folder = out / "tiny"
    code, err = _cli("extract", *args, "--out", str(out), "--shard", "1/2", capsys=capsys)
    assert code == 0 and "waiting for shard(s) 0/2" in err
    code, err = _cli("merge", str(folder), capsys=capsys)
    assert code == 2 and "shard(s) 0/2 not finished" in err and len(err.strip().splitlines()) == 1
    code, err = _cli("extract", *args, "--out", str(out), "--shard", "0/2", capsys=capsys)  # the last completes
    assert code == 0
    _same_files(folder, reference)
    _each_chunk_once(_chunks(folder / "extract.log"))
    assert {who for _, _, who in _chunks(folder / "extract.log")} == {"shard 0/2", "shard 1/2"}
    code, err = _cli("merge", str(folder), capsys=capsys)
    assert code == 0 and "3 feature file(s) complete" in err

    # a marker of another configuration (another shard count) in the same folder
    marker = json.loads((folder / "shards" / "0-of-2.json").read_text())
    (folder / "shards" / "2-of-3.json").write_text(json.dumps({**marker, "shard": 2, "of": 3}))
    code, err = _cli("merge", str(folder), capsys=capsys)
    assert code == 2 and "shards from different configurations" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, env, fragment", [
    (["--shard", "3/2"], {}, "--shard 3/2: shard 3 of 2 does not exist"),
    (["--shard", "1-2"], {}, "--shard 1-2: expected i/n"),
    (["--shard", "slurm"], {}, "--shard slurm: SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT are not set"),
    (["--shard", "0/2"], {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, "--shard: not with torchrun"),
    (["--shard", "0/2", "--overwrite"], {}, "--overwrite with --shard"),
])
def test_bad_shard_options_are_one_line(setup, capsys, monkeypatch, argv, env, fragment):
    root, args, _ = setup
    for key in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for command in (["extract", *args, "--out", str(root / "bad")],
                    ["run", "plism", "--model", "rgb-histogram", "--features", str(root / "nowhere")]):
        code, err = _cli(*command, *argv, capsys=capsys)
        assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err


def test_merge_of_something_else_is_one_line(tmp_path, capsys):
    code, err = _cli("merge", str(tmp_path), capsys=capsys)
    assert code == 2 and "no launch.json" in err and len(err.strip().splitlines()) == 1


# -- PLISM ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plism(tmp_path_factory, setup):
    from pathrobust.data.synth_plism import SynthPlismConfig, synth_plism
    from pathrobust.suites.base import run_suite

    root, _, _ = setup
    data = synth_plism(tmp_path_factory.mktemp("plism") / "data", SynthPlismConfig(
        tiles_per_slide=40, stainings=("GIV", "GM", "HR"), scanners=("AT2", "S60"), tile_size=32), progress=False)
    model = f"{root / 'tiny_model.py'}:tiny"
    args = ["--model", model, "--data", str(data), "--workers", "0", "--batch-size", str(BATCH), "--bootstrap", "20",
            "--no-probes", "--no-progress"]
    summary = run_suite("plism", model, data, root / "plism-reference", workers=0, batch_size=BATCH, bootstrap=20,
                        probes=False, progress=False)
    return root, args, Path(summary["run_dir"])


def _same_run(a: Path, b: Path) -> None:
    assert (a / "metrics.csv").read_bytes() == (b / "metrics.csv").read_bytes()
    assert (a / "results.csv").read_bytes() == (b / "results.csv").read_bytes()
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["headline"] == sb["headline"] and sa["leaderboard_bootstrap"] == sb["leaderboard_bootstrap"]
    ea, eb = (sorted((d.parent / "embeddings").rglob("*.h5")) for d in (a, b))
    assert [p.name for p in ea] == [p.name for p in eb] and len(ea) == 6
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(ea, eb))


def test_plism_under_torchrun_equals_one_process(plism):
    root, args, reference = plism
    out = root / "plism-torchrun"
    text = _finish(_torchrun("run", "plism", *args, "--out", str(out)))
    run_dir = out / "plism" / "tiny" / reference.name
    _same_run(reference, run_dir)
    log = run_dir / "log.txt"
    whos = {who for _, _, who in _chunks(log)}
    assert whos == {"rank 0/2", "rank 1/2"}  # every slide's chunks split over both ranks
    assert Counter((f, c) for f, c, _ in _chunks(log)).most_common(1)[0][1] == 1
    assert text.count("Top-10") >= 1 and text.count("✓") == 1  # rank 0 reports once


def test_plism_shards_then_merge(plism, capsys):
    root, args, reference = plism
    out = root / "plism-shards"
    run_dir = out / "plism" / "tiny" / reference.name
    code, err = _cli("run", "plism", *args, "--out", str(out), "--shard", "0/2", capsys=capsys)
    assert code == 0 and "waiting for shard(s) 1/2" in err and not (run_dir / "summary.json").exists()
    code, err = _cli("merge", str(run_dir), capsys=capsys)
    assert code == 2 and "shard(s) 1/2 not finished" in err
    code, err = _cli("run", "plism", *args, "--out", str(out), "--shard", "1/2", capsys=capsys)
    assert code == 0
    _same_run(reference, run_dir)
    assert {who for _, _, who in _chunks(run_dir / "log.txt")} == {"shard 0/2", "shard 1/2"}
    code, err = _cli("merge", str(run_dir), capsys=capsys)
    assert code == 0 and "reusing the finished run" in err


def test_gpu_check_runs_its_cpu_smoke_version(capsys, one_thread):
    """benchmarks/gpu_check.py at tiny sizes on the CPU: every part starts and prints."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    gpu_check.main(["--cpu-smoke"])
    out = capsys.readouterr().out
    assert out.count("pipeline/bare") == 2 and "ViT-g/14" in out
    assert "metrics/floor" in out and "GEMM" in out
    assert "one distillation step" in out and "step" in out.split("one distillation step")[1]


# -- locks --------------------------------------------------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _lock_with(path: Path, **owner) -> None:
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(), **owner}))


def test_lock_of_a_dead_or_reused_pid_is_taken_over(tmp_path):
    from pathrobust import locks

    lock = tmp_path / "item.lock"
    me = locks._me()
    _lock_with(lock, pid=me["pid"], start=me["start"])  # ours: a second claim from this process
    assert locks.try_acquire(lock)
    _lock_with(lock, pid=_dead_pid(), start=None)
    assert locks.try_acquire(lock) and locks.owner(lock)["pid"] == os.getpid()
    if me["start"] is not None:  # a live pid whose start time differs: the pid was reused
        _lock_with(lock, pid=1, start=-5)
        assert locks.try_acquire(lock)
        _lock_with(lock, pid=1, start=locks._start_time(1))  # a live process that is not us
        assert not locks.try_acquire(lock)


def test_lock_of_another_host_goes_stale_without_heartbeat(tmp_path):
    from pathrobust import locks

    lock = tmp_path / "item.lock"
    _lock_with(lock, host="elsewhere", pid=1, time=time.time() - 10)
    assert not locks.try_acquire(lock, stale_after=60)
    _lock_with(lock, host="elsewhere", pid=1, time=time.time() - 120)
    assert locks.try_acquire(lock, stale_after=60)
    before = locks.owner(lock)["time"]
    time.sleep(0.01)
    assert locks.refresh(lock) and locks.owner(lock)["time"] > before
    with locks.Heartbeat(interval=0.01) as heartbeat:
        heartbeat.add(lock)
        time.sleep(0.1)
    assert locks.owner(lock)["time"] > before + 0.01
    locks.release(lock)
    assert not lock.exists()


def _race(path: str, barrier, done, results) -> None:
    from pathrobust import locks

    barrier.wait()
    results.put(locks.try_acquire(path, stale_after=60))
    done.wait()  # the winner stays alive until all have tried (a dead winner's lock is stale again)


def test_one_of_several_processes_takes_over_a_stale_lock(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    lock = tmp_path / "item.lock"
    for _ in range(3):
        _lock_with(lock, pid=_dead_pid(), start=None)
        barrier, done, results = ctx.Barrier(4), ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(str(lock), barrier, done, results)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        wins = [results.get(timeout=5) for _ in procs]
        assert wins.count(True) == 1, wins
        assert not list(tmp_path.glob("*.takeover"))
