"""``pathrobust data fetch`` / ``models fetch`` / ``data list`` / ``doctor`` against a hub server on
127.0.0.1 (tests/hub_server.py), driven by the real ``huggingface_hub`` client.

Every test runs behind a socket guard: a DNS look-up or connection to anything but loopback
is refused and recorded, and the test fails if one was tried without being expected."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import socket
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save as save_safetensors

from pathrobust import hub
from pathrobust.cli import main
from pathrobust.errors import UserError
from pathrobust.registry import get_spec
from tests.hub_server import HubServer, Repo

STAININGS_SCANNERS = (("GMH", "S60"), ("GIV", "AT2"), ("GIV", "S60"), ("GMH", "AT2"))
TOKEN_OK, TOKEN_NEW, TOKEN_FINE = "hf_ok", "hf_not_accepted", "hf_fine_grained"


# -- the socket guard ----------------------------------------------------------------------
def _loopback(host) -> bool:
    host = str(host)
    return host in ("localhost", "::1") or host.startswith("127.")


class Guard:
    def __init__(self) -> None:
        self.blocked: list[tuple[str, str]] = []
        self.connects: list[tuple[str, int]] = []


@pytest.fixture(autouse=True)
def guard(monkeypatch):
    """Only 127.0.0.1 may be reached: other look-ups and connections fail (and are recorded)."""
    g = Guard()
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        if host is not None and not _loopback(host):
            g.blocked.append(("getaddrinfo", str(host)))
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (test guard: loopback only)")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            if not _loopback(address[0]):
                g.blocked.append(("connect", str(address[0])))
                raise ConnectionRefusedError(errno.ECONNREFUSED, "test guard: loopback only")
            g.connects.append((address[0], address[1]))
        return real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    yield g
    assert not g.blocked, f"tried to reach beyond 127.0.0.1: {g.blocked}"


# -- tiny repositories in the real layouts ----------------------------------------------------
def _png(rng) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _parquet(table) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=4)
    return buf.getvalue()


def plism_tiles_files() -> dict[str, bytes]:
    """owkin/plism-dataset-tiles: rows grouped by slide, cut into 3 shards of 8 rows, so slides
    span shards and some row groups hold two slides (4 slides x 6 tiles)."""
    import pyarrow as pa

    from pathrobust.data.plism import make_slide_id, make_tile_id
    from pathrobust.data.synth_plism import _schema

    rng = np.random.default_rng(0)
    rows = []
    for st, sc in STAININGS_SCANNERS:
        for i in range(6):
            tid = make_tile_id(i, 16, (i % 3) * 224, (i // 3) * 224)
            rows.append({"slide_id": make_slide_id(st, sc), "tile_id": tid, "png": {"bytes": _png(rng), "path": f"{tid}.png"},
                         "stainer": st, "scanner": sc})
    files = {f"data/train-{k:05d}-of-00003.parquet": _parquet(pa.Table.from_pylist(rows[8 * k: 8 * k + 8], schema=_schema()))
             for k in range(3)}
    return {**files, "README.md": b"# PLISM tiles\n", ".gitattributes": b"*.parquet filter=lfs\n"}


def _h5(write) -> bytes:
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        write(f)
    return buf.getvalue()


def plism_slides_files() -> dict[str, bytes]:
    rng = np.random.default_rng(1)

    def slide(f):
        for i in range(4):
            f.create_dataset(f"{i}_16_{i * 224}_0", data=rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))

    return {f"{st}_{sc}_to_GMH_S60.tif.h5": _h5(slide) for st, sc in STAININGS_SCANNERS[:3]} | {"README.md": b"# PLISM\n"}


def hest_bench_files() -> dict[str, bytes]:
    """MahmoodLab/hest-bench: <TASK>/{adata,patches,splits}, var_50genes.json, and fm_v1/ weights."""
    files: dict[str, bytes] = {}
    for task in ("IDC", "PRAD", "LUNG"):
        ids = [f"{task}_S{i}" for i in range(2)]
        for sid in ids:
            files[f"{task}/patches/{sid}.h5"] = _h5(lambda f: (f.create_dataset("img", data=np.zeros((2, 8, 8, 3), np.uint8)),
                                                               f.create_dataset("barcode", data=np.array([[b"a"], [b"b"]])),
                                                               f.create_dataset("coords", data=np.zeros((2, 2), np.int64))))
            files[f"{task}/adata/{sid}.h5ad"] = _h5(lambda f: f.create_dataset("X", data=np.ones((2, 3), np.float32)))
        for k, (train, test) in enumerate(((ids[:1], ids[1:]), (ids[1:], ids[:1]))):
            for kind, part in (("train", train), ("test", test)):
                files[f"{task}/splits/{kind}_{k}.csv"] = ("sample_id,patches_path,expr_path\n" + "".join(
                    f"{s},patches/{s}.h5,adata/{s}.h5ad\n" for s in part)).encode()
        files[f"{task}/var_50genes.json"] = json.dumps({"genes": ["G1", "G2", "G3"]}).encode()
    files["fm_v1/ctranspath/ctranspath.pth"] = b"\0" * 4096
    files["fm_v1/remedis/path-152x2-remedis-m_torch.pth"] = b"\1" * 4096
    files["README.md"] = b"# HEST-Benchmark\n"
    return files


def pathorob_files() -> dict[str, bytes]:
    import pyarrow as pa

    rng = np.random.default_rng(2)
    table = pa.table({"image": [{"bytes": _png(rng), "path": None} for _ in range(4)], "subset": ["ID"] * 4,
                      "slide_id": ["s1", "s1", "s2", "s2"], "patch_id": ["p1", "p2", "p3", "p4"],
                      "biological_class": ["normal", "tumor"] * 2, "medical_center": ["RUMC"] * 2 + ["UMCU"] * 2})
    return {"data/train-00000-of-00001.parquet": _parquet(table), "README.md": b"# PathoROB camelyon\n"}


H0_CONFIG = {"architecture": "vit_base_patch14_reg4_dinov2", "num_classes": 0,
             "model_args": {"img_size": 28, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 5.33334,
                            "init_values": 1e-5, "num_classes": 0}}


def tiny_h0_mini_state_dict() -> dict[str, torch.Tensor]:
    """H0-mini's architecture and key names (timm ViT/14, 4 registers, packed SwiGLU) at width
    32 and depth 2; the hub config.json (H0_CONFIG) describes that size, as the real one does."""
    from pathrobust.encoders.backbone import architecture_from_config, create_backbone

    spec = get_spec("h0-mini")
    arch, kwargs = architecture_from_config(spec, H0_CONFIG)
    return {k: v.contiguous() for k, v in create_backbone(spec.replace(seed=5), kwargs, arch).state_dict().items()}


@pytest.fixture(scope="module")
def server():
    srv = HubServer()
    srv.add(Repo("owkin/plism-dataset-tiles", "dataset", plism_tiles_files(), gated=True, accepted_tokens={TOKEN_OK}))
    srv.add(Repo("owkin/plism-dataset", "dataset", plism_slides_files(), gated=True, accepted_tokens={TOKEN_OK}))
    srv.add(Repo("MahmoodLab/hest-bench", "dataset", hest_bench_files(), gated=True, accepted_tokens={TOKEN_OK}))
    srv.add(Repo("bifold-pathomics/PathoROB-camelyon", "dataset", pathorob_files()))
    sd = tiny_h0_mini_state_dict()
    bin_buf = io.BytesIO()
    torch.save(sd, bin_buf)
    srv.add(Repo("bioptimus/H0-mini", "model", {
        "model.safetensors": save_safetensors(sd), "pytorch_model.bin": bin_buf.getvalue(),
        "config.json": json.dumps(H0_CONFIG).encode(), "README.md": b"# H0-mini\n"},
        gated=True, accepted_tokens={TOKEN_OK}))
    # A checkpoint that does not fit UNI's architecture (ViT-L/16): H0-mini's tiny one, no config.
    srv.add(Repo("MahmoodLab/uni", "model", {"pytorch_model.bin": bin_buf.getvalue()}, gated=True,
                 accepted_tokens={TOKEN_OK}))
    srv.tokens.update({TOKEN_OK: "read", TOKEN_NEW: "read", TOKEN_FINE: "fine-grained-no-gated"})
    srv.start()
    srv.h0_state_dict = sd
    yield srv
    srv.stop()


def _point_client_at(monkeypatch, endpoint: str) -> None:
    """The client reads some settings at import (HF_ENDPOINT, HF_HUB_OFFLINE): set them for this
    process as a fresh `pathrobust` process would read them from the environment."""
    import huggingface_hub.constants as constants
    from huggingface_hub.utils import _detect_agent

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # the client's once-a-day user-agent registry fetch: not in tests
    monkeypatch.setattr(_detect_agent, "_registry", {"standardEnvVars": [], "harnesses": {}})


@pytest.fixture
def env(server, tmp_path, monkeypatch):
    """A fresh HF_HOME and pathrobust cache, no token, online, the client pointed at the server."""
    for var in ("HF_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "PATHROBUST_WEIGHTS_DIR",
                "TRANSFORMERS_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("PATHROBUST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATHROBUST_NO_PROGRESS", "1")
    _point_client_at(monkeypatch, server.endpoint)
    server.faults.clear()
    server.clear_log()
    server.page_size = 1000
    return server


def cli(*args: str) -> None:
    main(list(args))


def cli_error(capsys, *args: str) -> str:
    """Run the CLI expecting bad-input exit 2; return its one stderr line."""
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def downloads(server: HubServer) -> list[str]:
    """Whole-file downloads (no Range header) seen by the server, as repo file names."""
    names = []
    for method, path, rng, _ in server.log:
        if method == "GET" and rng is None and (path.startswith("/blobs/") or "/resolve/" in path):
            names.append(path)
    return names


# -- the table -----------------------------------------------------------------------------
def test_dataset_table_is_complete_and_names_are_checked():
    assert set(hub.DATASETS) == {"plism-tiles", "plism-slides", "hest-bench", "pathorob-camelyon", "pathorob-tcga",
                                 "pathorob-tolkach-esca"}
    for ds in hub.DATASETS.values():
        assert ds.repo_id and ds.license and ds.approx_size and isinstance(ds.gated, bool)
    assert "fm_v1/*" in hub.DATASETS["hest-bench"].ignore
    assert hub.get_dataset("PathoROB_tolkach_esca").repo_id == "bifold-pathomics/PathoROB-tolkach_esca"
    with pytest.raises(UserError, match="fetchable datasets: plism-tiles, plism-slides, hest-bench"):
        hub.get_dataset("plism")


# -- fetching datasets ---------------------------------------------------------------------
def test_full_fetch_verifies_records_and_resolves_by_name(env, capsys, tmp_path):
    server = env
    server.page_size = 3  # the tree listing comes in pages (Link: rel="next")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "token").write_text(TOKEN_OK + "\n")  # what `hf auth login` writes
    cli("data", "fetch", "plism-tiles", "--json")
    manifest = json.loads(capsys.readouterr().out)
    repo = server.repos[("dataset", "owkin/plism-dataset-tiles")]
    shards = sorted(p for p in repo.files if p.endswith(".parquet"))
    assert manifest["repo_id"] == "owkin/plism-dataset-tiles" and manifest["commit"] == repo.commit
    assert [f["path"] for f in manifest["files"]] == shards  # README and .gitattributes are not part of it
    assert all(f["sha256"] == sha(repo.files[f["path"]]) and f["size"] == len(repo.files[f["path"]]) and f["verified"]
               for f in manifest["files"])
    assert manifest["complete"] and manifest["license"] == "CC-BY-4.0"
    root = tmp_path / "hf" / "hub" / "datasets--owkin--plism-dataset-tiles" / "snapshots" / repo.commit
    assert Path(manifest["path"]) == root and hub.resolve_data("plism-tiles") == root
    # A suite given `--data plism-tiles` reads the fetched copy: 4 slides of the same 6 tiles.
    from pathrobust.data.plism import open_plism

    slides = open_plism(hub.resolve_data("plism-tiles"))
    assert sorted(slides) == sorted(f"{st}_{sc}_to_GMH_S60.tif" for st, sc in STAININGS_SCANNERS)
    assert {len(s) for s in slides.values()} == {6}
    # Fetching again downloads nothing; `data list` shows where it is, its size and commit.
    server.clear_log()
    cli("data", "fetch", "plism-tiles", "--no-progress")
    assert downloads(server) == []
    assert "plism-tiles: 3 files" in capsys.readouterr().err
    # A copy that went bad on disk is caught, removed, and fetched again by the rerun.
    bad = root / shards[2]
    blob = bad.resolve()
    blob.chmod(0o644)
    blob.write_bytes(b"\0" * len(repo.files[shards[2]]))
    line = cli_error(capsys, "data", "fetch", "plism-tiles", "--no-progress")
    assert "sha256" in line and "differs from the hub's" in line and "rerun `pathrobust data fetch plism-tiles`" in line
    assert not bad.exists() and not blob.exists()
    cli("data", "fetch", "plism-tiles", "--no-progress")
    assert bad.read_bytes() == repo.files[shards[2]]
    capsys.readouterr()
    cli("data", "list", "--json")
    row = next(r for r in json.loads(capsys.readouterr().out) if r["name"] == "plism-tiles")
    assert row["fetched"] and row["path"] == str(root) and row["commit"] == repo.commit
    assert row["bytes"] == sum(len(repo.files[p]) for p in shards) and row["license"] == "CC-BY-4.0"


def test_subset_of_shards_and_of_slides(env, capsys, monkeypatch):
    server = env
    monkeypatch.setenv("HF_TOKEN", TOKEN_OK)
    repo = server.repos[("dataset", "owkin/plism-dataset-tiles")]
    m = hub.fetch_dataset("plism-tiles", subset="1", progress=False)
    assert [f["path"] for f in m["files"]] == ["data/train-00001-of-00003.parquet"]
    assert not m["complete"] and m["files_in_dataset"] == 3
    assert len(downloads(server)) == 1
    # By slide: the shards are indexed from their parquet footers with range requests; only the
    # shards holding GIV_AT2 (rows 6-11: shards 0 and 1) are downloaded.
    server.clear_log()
    m = hub.fetch_dataset("plism-tiles", subset="GIV_AT2", progress=False)
    ranged = [r for meth, p, r, _ in server.log if meth == "GET" and p.startswith("/blobs/") and r]
    assert ranged, "the slide index should read parquet footers by range"
    assert len(downloads(server)) == 1  # shard 1 is already here; shard 0 is new
    assert [f["path"] for f in m["files"]] == ["data/train-00000-of-00003.parquet", "data/train-00001-of-00003.parquet"]
    index = json.loads(next(hub.cache_dir("fetched", "index").glob("*.json")).read_text())
    assert index == {"data/train-00000-of-00003.parquet": ["GIV_AT2_to_GMH_S60.tif", "GMH_S60_to_GMH_S60.tif"],
                     "data/train-00001-of-00003.parquet": ["GIV_AT2_to_GMH_S60.tif", "GIV_S60_to_GMH_S60.tif"],
                     "data/train-00002-of-00003.parquet": ["GIV_S60_to_GMH_S60.tif", "GMH_AT2_to_GMH_S60.tif"]}
    assert repo.commit in next(hub.cache_dir("fetched", "index").glob("*.json")).name
    # plism-slides: a scanner names its slides
    plan = hub.plan_dataset("plism-slides", subset="S60")
    assert [f.path for f in plan.files] == ["GIV_S60_to_GMH_S60.tif.h5", "GMH_S60_to_GMH_S60.tif.h5"]


def test_dry_run_lists_files_and_total_without_downloading(env, capsys, tmp_path):
    server = env
    cli("data", "fetch", "hest-bench", "--dry-run")  # the listing of a gated repo needs no token
    out = capsys.readouterr().out
    repo = server.repos[("dataset", "MahmoodLab/hest-bench")]
    wanted = [p for p in repo.files if not p.startswith("fm_v1/") and p != ".gitattributes"]
    for p in wanted:
        assert p in out
    assert "fm_v1" not in out
    total = sum(len(repo.files[p]) for p in wanted)
    assert f"{len(wanted)} files, {hub.fmt_bytes(total)} ({hub.fmt_bytes(total)} to download)" in out
    assert downloads(server) == [] and not (tmp_path / "hf" / "hub").exists()
    cli("data", "fetch", "hest-bench", "--subset", "IDC", "--dry-run", "--json")
    plan = json.loads(capsys.readouterr().out)
    assert {f["path"].split("/")[0] for f in plan["files"]} == {"IDC"}
    assert plan["total_bytes"] == sum(len(repo.files[f["path"]]) for f in plan["files"])


def test_hest_subset_to_dest_never_fetches_weights(env, capsys, tmp_path, monkeypatch):
    server = env
    monkeypatch.setenv("HF_TOKEN", TOKEN_OK)
    dest = tmp_path / "bench"
    cli("data", "fetch", "hest-bench", "--subset", "IDC,prad", "--dest", str(dest), "--no-progress")
    assert "hest-bench:" in capsys.readouterr().err
    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file() and ".cache" not in p.parts
                 and ".pathrobust" not in p.parts)
    repo = server.repos[("dataset", "MahmoodLab/hest-bench")]
    assert got == sorted(p for p in repo.files if p.split("/")[0] in ("IDC", "PRAD"))
    assert not any("fm_v1" in p for _, p, _, _ in server.log if "/resolve/" in p)
    assert hub.resolve_data("hest-bench") == dest
    from pathrobust.data.hest import list_tasks, load_task

    assert list_tasks(hub.resolve_data("hest-bench")) == ["IDC", "PRAD"]
    assert [s.sample_id for s in load_task(dest / "IDC").samples] == ["IDC_S0", "IDC_S1"]
    assert json.loads((dest / ".pathrobust" / "fetch-manifest.json").read_text())["subset"] == ["IDC", "prad"]


def test_unknown_subset_lists_the_valid_ones(env, capsys):
    line = cli_error(capsys, "data", "fetch", "hest-bench", "--subset", "IDC,BRCA", "--dry-run")
    assert "--subset BRCA" in line and "valid: IDC, LUNG, PRAD" in line and "fm_v1" not in line
    line = cli_error(capsys, "data", "fetch", "plism-slides", "--subset", "XX_YY", "--dry-run")
    assert "--subset XX_YY" in line and "GIV_AT2, GIV_S60, GMH_S60" in line and "GMH" in line and "AT2" in line
    line = cli_error(capsys, "data", "fetch", "plism-tiles", "--subset", "7", "--dry-run")
    assert "shards 0-2" in line
    line = cli_error(capsys, "data", "fetch", "pathorob-camelyon", "--subset", "x", "--dry-run")
    assert "has no subsets" in line


def test_interrupted_transfer_resumes_with_a_range_request(env, monkeypatch):
    """The connection drops halfway through a file: the client asks for the rest (Range) and the
    file still verifies."""
    import huggingface_hub.constants as constants

    server = env
    monkeypatch.setenv("HF_TOKEN", TOKEN_OK)
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)  # the bytes written before the drop
    monkeypatch.setattr("huggingface_hub.file_download.time.sleep", lambda s: None)
    name = "GMH_S60_to_GMH_S60.tif.h5"
    data = server.repos[("dataset", "owkin/plism-dataset")].files[name]
    assert len(data) > 3 * 4096
    server.faults[("owkin/plism-dataset", name)] = "truncate_once"
    m = hub.fetch_dataset("plism-slides", subset="GMH_S60", progress=False)
    ranges = [r for meth, p, r, _ in server.log if meth == "GET" and p == f"/blobs/{sha(data)}"]
    assert ranges[0] is None and ranges[1].startswith("bytes=") and int(ranges[1][6:-1]) >= 4096
    assert m["files"][0]["sha256"] == sha(data)


def test_partial_download_says_how_to_resume_and_rerun_fetches_only_the_rest(env, capsys, monkeypatch):
    server = env
    monkeypatch.setenv("HF_TOKEN", TOKEN_OK)
    monkeypatch.setattr("huggingface_hub.file_download.time.sleep", lambda s: None)
    broken = "data/train-00001-of-00003.parquet"
    server.faults[("owkin/plism-dataset-tiles", broken)] = "truncate"  # every attempt stops halfway
    line = cli_error(capsys, "data", "fetch", "plism-tiles", "--no-progress")
    assert "download interrupted" in line and "2 of 3 files finished and kept" in line
    assert "rerun `pathrobust data fetch plism-tiles` to resume" in line
    assert hub.read_manifest("plism-tiles") is None
    server.faults.clear()
    server.clear_log()
    cli("data", "fetch", "plism-tiles", "--no-progress")
    repo = server.repos[("dataset", "owkin/plism-dataset-tiles")]
    assert downloads(server) == [f"/blobs/{sha(repo.files[broken])}"]  # only the unfinished file
    assert hub.read_manifest("plism-tiles")["complete"]


@pytest.mark.parametrize("token, fragments", [
    (None, ("no Hugging Face token was found", "accept the conditions at https://huggingface.co/datasets/owkin/plism-dataset-tiles",
            "`hf auth login`", "HF_TOKEN")),
    (TOKEN_NEW, ("has no access yet", "accept the conditions at https://huggingface.co/datasets/owkin/plism-dataset-tiles")),
    (TOKEN_FINE, ("a fine-grained token needs 'read access to public gated repos'", "settings/tokens")),
    ("hf_unknown", ("rejected your Hugging Face token", "settings/tokens", "hf auth login")),
])
def test_gated_and_token_errors_say_what_to_do(env, capsys, monkeypatch, token, fragments):
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    line = cli_error(capsys, "data", "fetch", "plism-tiles", "--no-progress")
    for fragment in fragments:
        assert fragment in line
    for secret in (TOKEN_OK, TOKEN_NEW, TOKEN_FINE, "hf_unknown"):
        assert secret not in line  # the token is never printed
    assert hub.read_manifest("plism-tiles") is None


def test_missing_repo_offline_and_disk_full(env, capsys, monkeypatch, tmp_path):
    line = cli_error(capsys, "data", "fetch", "pathorob-tcga")  # not on this hub
    assert "bifold-pathomics/PathoROB-tcga not found on the hub" in line and "no Hugging Face token was sent" in line
    # disk full: checked before downloading anything
    monkeypatch.setattr(hub, "_free_bytes", lambda path: 1000)
    line = cli_error(capsys, "data", "fetch", "pathorob-camelyon")
    assert "disk full" in line and "1.0 KB free" in line and "--dest" in line
    assert downloads(env) == []
    err = hub.explain_hub_error(OSError(errno.ENOSPC, "No space left on device"),
                                hub.FetchContext("a/b", "dataset", "x", "pathrobust data fetch x", 1, 3))
    assert "disk full" in str(err) and "1 of 3 files finished and kept" in str(err) and "to resume" in str(err)
    # offline with nothing cached: HF_HUB_OFFLINE named, and how to undo it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = cli_error(capsys, "data", "fetch", "plism-tiles")
    assert "HF_HUB_OFFLINE=1 is set" in line and "not in the Hugging Face cache" in line and "unset HF_HUB_OFFLINE" in line
    line = cli_error(capsys, "models", "fetch", "h0-mini")
    assert "HF_HUB_OFFLINE=1 is set" in line and "bioptimus/H0-mini" in line


def test_resolve_data_passes_paths_through_and_explains_unfetched_names(env, tmp_path, monkeypatch):
    assert hub.resolve_data(tmp_path) == tmp_path
    assert hub.resolve_data(str(tmp_path / "not-there")) == tmp_path / "not-there"  # the suite reports it
    with pytest.raises(UserError, match=r"--data plism-slides: dataset not fetched yet; run `pathrobust data fetch plism-slides`"):
        hub.resolve_data("plism-slides")
    (tmp_path / "plism-slides").mkdir()
    monkeypatch.chdir(tmp_path)
    assert hub.resolve_data("plism-slides") == Path("plism-slides")  # a real folder wins over a name


# -- fetching weights ----------------------------------------------------------------------
def test_models_fetch_h0_mini_fetches_only_what_it_needs_and_verifies(env, capsys, monkeypatch, tmp_path):
    from pathrobust.weights import locate_weights

    server = env
    monkeypatch.setenv("HF_TOKEN", TOKEN_OK)
    sd = server.h0_state_dict
    assert {"cls_token", "reg_token", "pos_embed", "patch_embed.proj.weight", "blocks.1.attn.qkv.weight",
            "blocks.1.ls2.gamma", "blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc2.weight", "norm.weight"} <= set(sd)
    assert tuple(sd["reg_token"].shape) == (1, 4, 32) and sd["blocks.1.mlp.fc1.weight"].shape[0] == 2 * sd["blocks.1.mlp.fc2.weight"].shape[1]
    cli("models", "fetch", "h0-mini", "--json")
    m = json.loads(capsys.readouterr().out)
    repo = server.repos[("model", "bioptimus/H0-mini")]
    assert [f["path"] for f in m["files"]] == ["model.safetensors", "config.json"]
    assert m["sha256"] == sha(repo.files["model.safetensors"]) and m["commit"] == repo.commit
    assert m["verified"]["tensors"] == len(sd)
    asked = {p.rsplit("/", 1)[-1] for _, p, _, _ in server.log if "/resolve/" in p}
    assert asked == {"model.safetensors", "config.json"}  # never pytorch_model.bin or README.md
    assert json.loads(hub.manifest_path("h0-mini", "model").read_text())["sha256"] == m["sha256"]
    # The cache copy is where pathrobust looks for weights, offline.
    found = locate_weights(get_spec("h0-mini"), offline=True)
    assert found.source.startswith("hf:bioptimus/H0-mini") and found.config["model_args"]["embed_dim"] == 32
    # --dest DIR lays out DIR/<name>/ for PATHROBUST_WEIGHTS_DIR
    cli("models", "fetch", "h0-mini", "--dest", str(tmp_path / "w"), "--no-progress")
    assert "fits the architecture" in capsys.readouterr().err
    monkeypatch.setenv("PATHROBUST_WEIGHTS_DIR", str(tmp_path / "w"))
    found = locate_weights(get_spec("h0-mini"))
    assert found.path == tmp_path / "w" / "h0-mini" / "model.safetensors"
    # doctor: versions, token found (not printed), h0-mini's weights, the datasets
    cli("doctor", "--json")
    out = capsys.readouterr().out
    report = json.loads(out)
    assert TOKEN_OK not in out and report["hub"]["token"] == "found (HF_TOKEN)"
    assert {"torch", "timm", "huggingface_hub", "openslide-python", "cuda (torch build)"} <= set(report["versions"])
    assert report["hub"]["reachable"] == "yes" and report["hub"]["login"] == "hf auth login"
    row = next(r for r in report["models"] if r["name"] == "h0-mini")
    assert row["weights"] and "h0-mini" in row["weights"]
    assert {d["name"] for d in report["datasets"]} == set(hub.DATASETS)


def test_models_fetch_rejects_a_checkpoint_that_does_not_fit(env, capsys, monkeypatch):
    line = cli_error(capsys, "models", "fetch", "uni", "--no-progress")
    assert "gated" in line and "https://huggingface.co/MahmoodLab/uni" in line and "hf auth login" in line
    monkeypatch.setenv("HF_TOKEN", TOKEN_OK)
    line = cli_error(capsys, "models", "fetch", "uni", "--no-progress")
    assert "does not fit the architecture" in line and "hf:MahmoodLab/uni@" in line and "cls_token" in line
    assert hub.read_manifest("uni", "model") is None


# -- no network ----------------------------------------------------------------------------
@pytest.fixture
def dead_endpoint(env, monkeypatch):
    """A hub address where nothing listens any more (connection refused)."""
    dead = HubServer().start()
    endpoint = dead.endpoint
    dead.stop()
    _point_client_at(monkeypatch, endpoint)
    return endpoint


def test_missing_weights_with_the_hub_unreachable_is_one_fast_line(dead_endpoint, guard, capsys, tmp_path):
    from pathrobust.weights import locate_weights

    port = int(dead_endpoint.rsplit(":", 1)[1])
    started = time.perf_counter()
    with pytest.raises(UserError) as err:
        locate_weights(get_spec("uni"))
    elapsed = time.perf_counter() - started
    msg = str(err.value)
    assert elapsed < 3.0, f"{elapsed:.1f} s"
    assert [c for c in guard.connects if c[1] == port] == [("127.0.0.1", port)]  # one probe, no retry loop
    assert "\n" not in msg and "hub is unreachable" in msg and "connection refused" in msg
    assert "--weights" in msg and "PATHROBUST_WEIGHTS_DIR" in msg and "pathrobust models fetch uni --dest DIR" in msg
    assert "hf auth login" in msg and "https://huggingface.co/MahmoodLab/uni" in msg
    assert "HF_HUB_OFFLINE" not in msg and "huggingface-cli" not in msg and "not found" not in msg
    # the same through the CLI, and for a dataset
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tiles / "t_0_0.png")
    started = time.perf_counter()
    line = cli_error(capsys, "extract", "--model", "uni", "--data", str(tiles), "--out", str(tmp_path / "o"))
    assert "hub is unreachable" in line and time.perf_counter() - started < 3.0
    line = cli_error(capsys, "data", "fetch", "plism-tiles")
    assert "hub is unreachable" in line and "connection refused" in line


def test_unresolvable_hub_name_is_reported_as_such(env, guard, monkeypatch):
    _point_client_at(monkeypatch, "https://huggingface.co")  # the guard answers 'Name or service not known'
    reason = hub.unreachable_reason()
    assert reason.startswith("cannot resolve huggingface.co")
    assert guard.blocked == [("getaddrinfo", "huggingface.co")]
    guard.blocked.clear()  # expected: that look-up is what is being tested


def test_login_command_follows_the_installed_client(monkeypatch):
    import importlib.util

    assert hub.login_command() == "hf auth login"  # huggingface_hub >= 0.34 ships `hf`
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "huggingface_hub.cli.hf" else real(name, *a))
    assert hub.login_command() == "huggingface-cli login"


def test_progress_bars_respect_no_progress_and_non_terminals(monkeypatch):
    monkeypatch.delenv("PATHROBUST_NO_PROGRESS", raising=False)
    bar = hub._bar_class(True)(total=10, file=io.StringIO())  # not a terminal
    assert bar.disable
    monkeypatch.setenv("PATHROBUST_NO_PROGRESS", "1")
    assert hub._bar_class(True)(total=10, file=io.StringIO(), disable=False).disable
