"""Fetch datasets and encoder weights from the Hugging Face hub, by name.

The table :data:`DATASETS` is the one place that says, per dataset name, which hub repository
holds it, which files belong to it (allow/ignore patterns), its licence, its approximate size
and whether it is gated. :func:`fetch_dataset` downloads a dataset (or a subset of it) with
``huggingface_hub.snapshot_download`` into the Hugging Face cache or ``dest``;
:func:`fetch_model` downloads the files a registered encoder needs and checks that they load
into its architecture. Both verify every file against the hub's sha256 and write a *fetch
manifest* (repo, commit, files with sizes and sha256) under ``$PATHROBUST_CACHE/fetched/``;
:func:`resolve_data` turns a fetched dataset's name back into its local folder.

Everything about reaching the hub lives here: the environment is read at call time
(``HF_ENDPOINT``, ``HF_HOME``/``HF_HUB_CACHE``, ``HF_TOKEN``/token file, ``HF_HUB_OFFLINE``),
a one-second connection probe (:func:`unreachable_reason`) runs before the hub client so an
offline machine gets one line instead of the client's retry loop, and :func:`explain_hub_error`
turns the client's exceptions (gated, token scope, not found, offline, disk full, interrupted)
into one line that says what to do.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import io
import json
import os
import re
import shutil
import socket
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from pathrobust.cache import cache_dir
from pathrobust.errors import UserError

DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_TIMEOUT_ENV = "PATHROBUST_HUB_PROBE_TIMEOUT"
PROBE_TIMEOUT_S = 1.5
MANIFEST_VERSION = 1
_GIT_OID_MAX = 32 << 20  # small (non-LFS) files are also checked against their git blob id


# -- the datasets --------------------------------------------------------------------------
@dataclass(frozen=True)
class Dataset:
    """One fetchable dataset: where it lives on the hub and which files belong to it.

    ``subsets`` names what ``--subset`` selects: ``"shards+slides"`` (PLISM parquet shards,
    by shard number/name or by slide), ``"slides"`` (one file per PLISM slide), ``"tasks"``
    (top-level task folders) or ``None`` (fetched whole)."""

    name: str
    repo_id: str
    license: str
    approx_size: str
    gated: bool
    allow: tuple[str, ...] | None
    ignore: tuple[str, ...] = (".gitattributes",)
    subsets: str | None = None
    suite: str = ""
    description: str = ""

    @property
    def url(self) -> str:
        return f"https://huggingface.co/datasets/{self.repo_id}"


# Sizes are estimates for planning (`pathrobust data fetch NAME --dry-run` prints the exact
# total from the hub). Gated = the hub page asks to accept conditions before downloading.
DATASETS: dict[str, Dataset] = {d.name: d for d in (
    Dataset("plism-tiles", "owkin/plism-dataset-tiles", "CC-BY-4.0", "~100 GB",
            gated=True, allow=("*.parquet",), subsets="shards+slides", suite="plism",
            description="PLISM: 91 stainings x scanners, 16,278 registered 224 px tiles each (293 parquet shards, 1.48 M rows)"),
    Dataset("plism-slides", "owkin/plism-dataset", "CC-BY-4.0", "~225 GB",
            gated=True, allow=("*_to_GMH_S60*.h5",), subsets="slides", suite="plism",
            description="PLISM: one <slide_id>.h5 per slide (tile id -> uint8 224x224x3)"),
    Dataset("hest-bench", "MahmoodLab/hest-bench", "CC-BY-NC-SA-4.0", "~10 GB",
            gated=True, allow=None, ignore=(".gitattributes", "fm_v1/*"), subsets="tasks", suite="hest",
            description="HEST-Benchmark: per task adata/, patches/, splits/ and var_50genes.json (never fm_v1/)"),
    Dataset("pathorob-camelyon", "bifold-pathomics/PathoROB-camelyon", "CC0-1.0", "~0.5 GB",
            gated=False, allow=("*.parquet", "*.md"), suite="pathorob",
            description="PathoROB Camelyon: 22,402 normal/tumour patches from 5 centres"),
    Dataset("pathorob-tcga", "bifold-pathomics/PathoROB-tcga", "CC-BY-NC-SA-4.0", "~1.2 GB",
            gated=False, allow=("*.parquet", "*.md"), suite="pathorob",
            description="PathoROB TCGA: BRCA/COAD/LUAD/LUSC patches from 8 centres"),
    Dataset("pathorob-tolkach-esca", "bifold-pathomics/PathoROB-tolkach_esca", "CC-BY-SA-4.0", "~0.4 GB",
            gated=False, allow=("*.parquet", "*.md"), suite="pathorob",
            description="PathoROB Tolkach ESCA: 16,300 patches, 6 classes from 4 centres"),
)}


def get_dataset(name: str) -> Dataset:
    key = name.strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise UserError(f"dataset '{name}': unknown; fetchable datasets: {', '.join(DATASETS)}")
    return DATASETS[key]


# -- the environment, read at call time -----------------------------------------------------
def _is_true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def hf_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value."""
    return _is_true(os.environ.get("HF_HUB_OFFLINE")) or _is_true(os.environ.get("TRANSFORMERS_OFFLINE"))


def _offline_var() -> str:
    return "HF_HUB_OFFLINE" if _is_true(os.environ.get("HF_HUB_OFFLINE")) else "TRANSFORMERS_OFFLINE"


def hf_home() -> Path:
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "huggingface")
    return Path(home).expanduser()


def hf_cache_dir() -> Path:
    """The hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return hf_home() / "hub"


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hf_token() -> tuple[str | None, str]:
    """``(token, where it came from)``; the token itself is never printed by pathrobust."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        value = (os.environ.get(var) or "").strip()
        if value:
            return value, var
    path = Path(os.environ.get("HF_TOKEN_PATH") or hf_home() / "token").expanduser()
    try:
        value = path.read_text().strip()
    except OSError:
        value = ""
    return (value, str(path)) if value else (None, f"no HF_TOKEN and no token file {path}")


def login_command() -> str:
    """The login command of the installed ``huggingface_hub``: ``hf auth login`` (0.34 and
    later ship the ``hf`` CLI; 1.0 removed ``huggingface-cli``), else ``huggingface-cli login``."""
    import importlib.util

    try:
        has_hf = importlib.util.find_spec("huggingface_hub.cli.hf") is not None
    except (ImportError, ValueError):
        has_hf = False
    return "hf auth login" if has_hf else "huggingface-cli login"


def repo_url(repo_id: str, repo_type: str = "model") -> str:
    prefix = "datasets/" if repo_type == "dataset" else ""
    return f"https://huggingface.co/{prefix}{repo_id}"


# -- is the hub there at all? ---------------------------------------------------------------
def _probe_target(endpoint: str) -> tuple[str, int, str]:
    """(host, port, what) to connect to: the proxy when one applies to the endpoint."""
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if p.hostname:
            return p.hostname, p.port or 8080, f"proxy {p.hostname}:{p.port or 8080}"
    return host, port, f"{host}:{port}"


def unreachable_reason(endpoint: str | None = None, timeout: float | None = None) -> str | None:
    """``None`` when a TCP connection to the hub (or its proxy) opens within ``timeout``
    seconds (default 1.5, ``$PATHROBUST_HUB_PROBE_TIMEOUT``); else why not, in a few words.

    Runs before the hub client, whose retry loop spends ~50 s on a machine without network."""
    endpoint = endpoint or hub_endpoint()
    if timeout is None:
        try:
            timeout = float(os.environ.get(PROBE_TIMEOUT_ENV) or PROBE_TIMEOUT_S)
        except ValueError:
            timeout = PROBE_TIMEOUT_S
    host, port, what = _probe_target(endpoint)
    if not host:
        return f"HF_ENDPOINT {endpoint!r} has no host"
    deadline = time.monotonic() + timeout
    result: dict[str, Any] = {}

    def lookup() -> None:
        try:
            result["addrs"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            result["error"] = exc

    worker = threading.Thread(target=lookup, daemon=True)  # getaddrinfo has no timeout of its own
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        return f"no DNS answer for {host} within {timeout:g} s"
    if "error" in result:
        return f"cannot resolve {host} ({getattr(result['error'], 'strerror', None) or result['error']})"
    last: OSError | None = None
    for family, kind, proto, _, address in result["addrs"]:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(left)
                sock.connect(address)
            return None
        except OSError as exc:
            last = exc
    if isinstance(last, ConnectionRefusedError):
        return f"connection refused by {what}"
    if last is None or isinstance(last, (socket.timeout, TimeoutError)):
        return f"no answer from {what} within {timeout:g} s"
    return f"cannot connect to {what} ({last.strerror or type(last).__name__})"


def unreachable_message(reason: str, endpoint: str | None = None) -> str:
    return f"the Hugging Face hub is unreachable ({endpoint or hub_endpoint()}: {reason})"


# -- errors, one line each ------------------------------------------------------------------
_NETWORK_ERRORS = {"ConnectError", "ConnectionError", "ConnectTimeout", "ReadTimeout", "TimeoutException",
                   "Timeout", "NetworkError", "ReadError", "RemoteProtocolError", "ChunkedEncodingError",
                   "ProtocolError", "IncompleteRead", "ProxyError", "OfflineModeIsEnabled"}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _server_message(exc: BaseException) -> str:
    msg = getattr(exc, "server_message", None)
    if not msg:
        response = getattr(exc, "response", None)
        msg = getattr(response, "headers", {}).get("X-Error-Message", "") if response is not None else ""
    return " ".join(str(msg or "").split())


@dataclass
class FetchContext:
    """What an error message needs to say what to do: what was being fetched and how far."""

    repo_id: str
    repo_type: str = "model"
    what: str = ""  # e.g. "plism-tiles" or "h0-mini"
    command: str = ""  # the command to rerun, e.g. "pathrobust data fetch plism-tiles"
    files_done: int | None = None
    files_total: int | None = None
    target: str = ""  # where the files go


def is_hub_error(exc: BaseException) -> bool:
    """Raised by the hub, the network or the disk (explained to the user), not a bug (re-raised)."""
    names = set().union(*(_names(e) for e in _chain(exc)))
    return bool(names & (_NETWORK_ERRORS | {"HfHubHTTPError", "OSError", "HTTPError", "HTTPStatusError",
                                             "TooManyRedirects", "DryRunError"}))


def explain_hub_error(exc: BaseException, ctx: FetchContext) -> UserError:
    """The client's exception -> one line naming the problem and its fix."""
    token, token_source = hf_token()
    page = repo_url(ctx.repo_id, ctx.repo_type)
    login = login_command()
    who = ctx.what or ctx.repo_id
    rerun = f"rerun `{ctx.command}` to resume" if ctx.command else "rerun the same command to resume"
    done = (f"{ctx.files_done} of {ctx.files_total} files finished and kept"
            if ctx.files_done is not None and ctx.files_total is not None else "finished files are kept")
    chain = list(_chain(exc))
    names = set().union(*(_names(e) for e in chain))
    status = next((s for s in (_status(e) for e in chain) if s is not None), None)
    server = next((m for m in (_server_message(e) for e in chain) if m), "")

    if "GatedRepoError" in names:
        if not token:
            return UserError(f"{who}: {ctx.repo_id} is gated and no Hugging Face token was found ({token_source}): "
                             f"accept the conditions at {page}, then run `{login}` or set HF_TOKEN")
        return UserError(f"{who}: {ctx.repo_id} is gated and the account of your token ({token_source}) has no access "
                         f"yet: accept the conditions at {page} with that account (approval can take a while), "
                         f"then rerun; or use another token (`{login}` or HF_TOKEN)")
    if status == 403:
        if "fine-grained" in server.lower() or "gated" in server.lower():
            return UserError(f"{who}: your Hugging Face token ({token_source}) may not read gated repos such as "
                             f"{ctx.repo_id}: a fine-grained token needs 'read access to public gated repos' — tick it "
                             "at https://huggingface.co/settings/tokens or use a read token, then rerun")
        return UserError(f"{who}: 403 forbidden by the hub for {ctx.repo_id} ({server or 'no reason given'}): your token "
                         f"({token_source}) lacks a permission — a fine-grained token needs 'read access to public "
                         "gated repos'; see https://huggingface.co/settings/tokens")
    if "RevisionNotFoundError" in names:
        return UserError(f"{who}: revision not found in {ctx.repo_id} ({page}/tree/main lists the branches)")
    if "RepositoryNotFoundError" in names:
        if not token:
            return UserError(f"{who}: {ctx.repo_id} not found on the hub, or private/gated and no Hugging Face token "
                             f"was sent ({token_source}): check {page}; if it asks to accept conditions, do so, then "
                             f"run `{login}` or set HF_TOKEN")
        return UserError(f"{who}: {ctx.repo_id} not found on the hub, or your token ({token_source}) cannot see it: "
                         f"check {page}")
    if status == 401:
        return UserError(f"{who}: the hub rejected your Hugging Face token ({token_source}{': ' + server if server else ''}): "
                         f"create a new one at https://huggingface.co/settings/tokens, then run `{login}` or set HF_TOKEN")
    if "RemoteEntryNotFoundError" in names or ("EntryNotFoundError" in names and "LocalEntryNotFoundError" not in names):
        return UserError(f"{who}: a file is missing from {ctx.repo_id} ({str(exc).splitlines()[-1][:160]})")
    for e in chain:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return UserError(f"{who}: disk full while writing {ctx.target or 'the download'} ({done}): free some space "
                             f"or choose --dest on a larger disk, then {rerun}")
    offline_named = any(n in names for n in ("OfflineModeIsEnabled", "LocalEntryNotFoundError", "IncompleteSnapshotError"))
    if hf_offline() and offline_named:
        return offline_error(who, ctx.repo_id, ctx.repo_type)
    if names & _NETWORK_ERRORS or offline_named:
        reason = unreachable_reason()
        if reason and not ctx.files_done:
            return UserError(f"{who}: {unreachable_message(reason)}; check the network or proxy (HTTPS_PROXY), then "
                             f"{rerun}")
        return UserError(f"{who}: download interrupted ({_short(exc)}); {done}: {rerun}")
    if any("Consistency check failed" in str(e) for e in chain):
        return UserError(f"{who}: download incomplete ({_short(exc)}); {done}: {rerun}")
    if status is not None and status >= 500:
        return UserError(f"{who}: the hub answered {status} (a server-side problem); {done}: {rerun} later")
    return UserError(f"{who}: {ctx.repo_id}: {_short(exc)}")


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:200]}"


def offline_error(who: str, repo_id: str, repo_type: str = "model", already: str | None = None) -> UserError:
    var = _offline_var()
    if already:
        return UserError(f"{who}: {var}=1 is set, so the hub was not contacted; a copy is already here ({already}); "
                         f"unset {var} to fetch more or newer files")
    return UserError(f"{who}: {var}=1 is set and {repo_id} is not in the Hugging Face cache ({hf_cache_dir()}): "
                     f"unset {var} to let pathrobust download it, or fetch it on a machine with network")


@contextlib.contextmanager
def _quiet_hub_logs() -> Iterator[None]:
    """The client logs every retry as a warning; pathrobust reports the outcome in one line."""
    import logging

    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# -- progress ------------------------------------------------------------------------------
_BYTES_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B [{elapsed}<{remaining}, {rate_fmt}]"


def _bar_class(enabled: bool, label: str = "downloading"):
    """A huggingface_hub tqdm class for ``snapshot_download``: one bar of bytes with bytes/s
    (the client's plain-HTTP bars show neither a rate nor, for the duplicate transfer bar,
    anything new), the file count; none when ``enabled`` is off, ``PATHROBUST_NO_PROGRESS`` is
    set or stderr is not a terminal."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    from pathrobust.progress import progress_enabled

    show = progress_enabled(enabled)

    def relabel(desc):
        return label if isinstance(desc, str) and desc.startswith("Reconstruct") else desc

    class _Bar(hf_tqdm):
        def __init__(self, *args, **kwargs):
            if not show or str(kwargs.get("name") or "").endswith(".transfer"):
                kwargs["disable"] = True
            elif kwargs.get("disable") is not True:
                kwargs["disable"] = None  # tqdm: hide when stderr is not a terminal
            if kwargs.get("unit") == "B":
                kwargs["bar_format"] = _BYTES_FORMAT
                kwargs["desc"] = relabel(kwargs.get("desc"))
            super().__init__(*args, **kwargs)

        def set_description(self, desc=None, refresh=True):
            super().set_description_str(relabel(desc), refresh)  # the format adds the ': '

        def set_description_str(self, desc=None, refresh=True):
            super().set_description_str(relabel(desc), refresh)

    return _Bar


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# -- what the hub holds --------------------------------------------------------------------
@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None  # LFS files: the hub's sha256 of the content
    git_oid: str | None  # git blob id (sha1 of "blob <size>\0" + content)


def _api(endpoint: str, token: str | None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token or False)


def list_remote(repo_id: str, repo_type: str, revision: str | None, endpoint: str, token: str | None) -> tuple[str, list[RemoteFile]]:
    """``(commit, files)`` of a repository at ``revision`` (default branch if None)."""
    from huggingface_hub.hf_api import RepoFile

    api = _api(endpoint, token)
    info = api.repo_info(repo_id, repo_type=repo_type, revision=revision)
    commit = info.sha
    files = [RemoteFile(f.path, int(f.size or 0), f.lfs.sha256 if f.lfs else None, f.blob_id)
             for f in api.list_repo_tree(repo_id, recursive=True, revision=commit, repo_type=repo_type)
             if isinstance(f, RepoFile)]
    return commit, sorted(files, key=lambda f: f.path)


def _filter(files: Iterable[RemoteFile], allow: Sequence[str] | None, ignore: Sequence[str] | None) -> list[RemoteFile]:
    def ok(path: str) -> bool:
        if allow and not any(fnmatch.fnmatchcase(path, p) for p in allow):
            return False
        return not (ignore and any(fnmatch.fnmatchcase(path, p) for p in ignore))

    return [f for f in files if ok(f.path)]


# -- subsets -------------------------------------------------------------------------------
def parse_subset(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [v for item in value for v in str(item).split(",")]
    return [v.strip() for v in items if v.strip()]


def select_files(ds: Dataset, files: list[RemoteFile], subset: Sequence[str], shard_slides=None) -> list[RemoteFile]:
    """The files of ``ds`` (its patterns), narrowed to ``subset``. ``shard_slides(shards)`` ->
    ``{shard path: slide ids}`` is called only when a PLISM slide is named among parquet shards."""
    base = _filter(files, ds.allow, ds.ignore)
    if not base:
        raise UserError(f"{ds.name}: {ds.repo_id} holds no files matching {', '.join(ds.allow or ('*',))}")
    if not subset:
        return base
    if ds.subsets is None:
        raise UserError(f"--subset {','.join(subset)}: {ds.name} has no subsets; fetch it whole (about {ds.approx_size})")
    if ds.subsets == "tasks":
        return _select_tasks(ds, base, subset)
    if ds.subsets == "slides":
        return _select_slide_files(ds, base, subset)
    return _select_shards(ds, base, subset, shard_slides)


def _select_tasks(ds: Dataset, base: list[RemoteFile], subset: Sequence[str]) -> list[RemoteFile]:
    tasks = sorted({f.path.split("/", 1)[0] for f in base if "/" in f.path})
    by_upper = {t.upper(): t for t in tasks}
    unknown = [s for s in subset if s.upper() not in by_upper]
    if unknown:
        raise UserError(f"--subset {','.join(unknown)}: not a {ds.name} task; valid: {', '.join(tasks)}")
    wanted = {by_upper[s.upper()] for s in subset}
    return [f for f in base if f.path.split("/", 1)[0] in wanted]


def _slide_key(slide_id: str) -> tuple[str, str] | None:
    m = re.match(r"^([A-Za-z0-9]+)_([A-Za-z0-9]+)_", slide_id)
    return (m.group(1), m.group(2)) if m else None


def _match_slides(subset: Sequence[str], slide_ids: Iterable[str]) -> tuple[set[str], list[str]]:
    """Slide ids named by ``subset`` (full ids, STAINING_SCANNER, a staining or a scanner) and
    the terms that name none."""
    from pathrobust.data.plism import SCANNERS, STAININGS

    slide_ids = list(slide_ids)
    keys = {sid: _slide_key(sid) for sid in slide_ids}
    chosen: set[str] = set()
    unknown: list[str] = []
    for term in subset:
        t = term[: -len(".h5")] if term.endswith(".h5") else term
        hits = {sid for sid, k in keys.items()
                if sid == t or (k and (f"{k[0]}_{k[1]}".upper() == t.upper() or
                                       (t.upper() in STAININGS and k[0].upper() == t.upper()) or
                                       (t.upper() in SCANNERS and k[1].upper() == t.upper())))}
        if hits:
            chosen |= hits
        else:
            unknown.append(term)
    return chosen, unknown


def _slides_hint(slide_ids: Iterable[str]) -> str:
    from pathrobust.data.plism import SCANNERS, STAININGS

    keys = sorted({f"{k[0]}_{k[1]}" for k in map(_slide_key, slide_ids) if k})
    listed = ", ".join(keys) if len(keys) <= 24 else f"{len(keys)} such as {', '.join(keys[:3])}"
    return (f"valid: slides STAINING_SCANNER ({listed}), a staining ({', '.join(STAININGS)}) "
            f"or a scanner ({', '.join(SCANNERS)})")


def _select_slide_files(ds: Dataset, base: list[RemoteFile], subset: Sequence[str]) -> list[RemoteFile]:
    by_slide = {Path(f.path).name[: -len(".h5")]: f for f in base}
    chosen, unknown = _match_slides(subset, by_slide)
    if unknown:
        raise UserError(f"--subset {','.join(unknown)}: no such {ds.name} slide; {_slides_hint(by_slide)}")
    return [f for sid, f in sorted(by_slide.items()) if sid in chosen]


_SHARD_NAME = re.compile(r"^(?:.*/)?(train-(\d+)-of-(\d+))(?:\.parquet)?$")


def _select_shards(ds: Dataset, base: list[RemoteFile], subset: Sequence[str], shard_slides) -> list[RemoteFile]:
    shards = sorted(base, key=lambda f: f.path)
    index_of = {}
    for i, f in enumerate(shards):
        m = _SHARD_NAME.match(f.path)
        index_of[int(m.group(2)) if m else i] = f
    chosen: dict[str, RemoteFile] = {}
    slide_terms: list[str] = []
    for term in subset:
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", term)
        named = _SHARD_NAME.match(term)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            missing = [i for i in range(lo, hi + 1) if i not in index_of]
            if missing or hi < lo:
                raise UserError(f"--subset {term}: {ds.name} has shards 0-{max(index_of)} "
                                f"({len(index_of)} parquet files); {_shard_hint()}")
            chosen.update({index_of[i].path: index_of[i] for i in range(lo, hi + 1)})
        elif named and any(Path(f.path).stem == named.group(1) for f in shards):
            f = next(f for f in shards if Path(f.path).stem == named.group(1))
            chosen[f.path] = f
        elif named:
            raise UserError(f"--subset {term}: no such shard in {ds.repo_id} ({len(shards)} shards named like "
                            f"{Path(shards[0].path).stem}); {_shard_hint()}")
        else:
            slide_terms.append(term)
    if slide_terms:
        if shard_slides is None:
            raise UserError(f"--subset {','.join(slide_terms)}: selecting {ds.name} by slide needs the hub; {_shard_hint()}")
        index = shard_slides(shards)
        all_slides = sorted({s for ids in index.values() for s in ids})
        wanted, unknown = _match_slides(slide_terms, all_slides)
        if unknown:
            raise UserError(f"--subset {','.join(unknown)}: neither a shard nor a slide of {ds.name}; {_shard_hint()}; "
                            f"{_slides_hint(all_slides)}")
        chosen.update({f.path: f for f in shards if wanted & set(index.get(f.path, ()))})
    return [chosen[p] for p in sorted(chosen)]


def _shard_hint() -> str:
    return "shards are named by number (0, 3-7) or file name (train-00012-of-00293)"


class _RangeFile(io.RawIOBase):
    """A read-only, seekable view of a remote file through HTTP range requests (what pyarrow
    needs to read a parquet footer and one column without downloading the file)."""

    def __init__(self, url: str, size: int, headers: dict[str, str]) -> None:
        from huggingface_hub.utils import get_session

        self.session = get_session()
        self.url, self.size, self.headers, self.pos = url, size, dict(headers), 0
        response = self.session.head(url, headers=self.headers, follow_redirects=False)
        if response.status_code in (301, 302, 303, 307, 308) and response.headers.get("Location"):
            target = urljoin(url, response.headers["Location"])
            if urlsplit(target)[:2] != urlsplit(url)[:2]:
                self.headers.pop("authorization", None)  # never send the token to a CDN
            self.url = target
        elif response.status_code >= 400:
            from huggingface_hub.utils import hf_raise_for_status

            hf_raise_for_status(response)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: offset, io.SEEK_CUR: self.pos + offset, io.SEEK_END: self.size + offset}[whence]
        return self.pos

    def readinto(self, buffer) -> int:
        if self.pos >= self.size or len(buffer) == 0:
            return 0
        end = min(self.size, self.pos + len(buffer)) - 1
        response = self.session.get(self.url, headers={**self.headers, "Range": f"bytes={self.pos}-{end}"})
        if response.status_code >= 400:
            from huggingface_hub.utils import hf_raise_for_status

            hf_raise_for_status(response)
        data = response.content if response.status_code == 206 else response.content[self.pos: end + 1]
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


def plism_shard_slides(repo_id: str, commit: str, shards: Sequence[RemoteFile], endpoint: str, token: str | None,
                       progress: bool = True) -> dict[str, list[str]]:
    """``{shard path: slide ids}`` of PLISM parquet shards, read from the hub without
    downloading them: the parquet footer's row-group statistics of ``slide_id`` (one range
    request or two per shard), the ``slide_id`` column itself where a row group spans slides.
    Cached per commit under ``$PATHROBUST_CACHE/fetched/index/``."""
    from concurrent.futures import ThreadPoolExecutor

    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    from pathrobust.progress import tile_progress

    cache = cache_dir("fetched", "index", f"{repo_id.replace('/', '--')}@{commit}.json")
    try:
        known = json.loads(cache.read_text())
    except (OSError, json.JSONDecodeError):
        known = {}
    todo = [f for f in shards if f.path not in known]
    headers = build_hf_headers(token=token or False)

    def read(f: RemoteFile) -> tuple[str, list[str]]:
        import pyarrow.parquet as pq

        url = hf_hub_url(repo_id, f.path, repo_type="dataset", revision=commit, endpoint=endpoint)
        with io.BufferedReader(_RangeFile(url, f.size, headers), buffer_size=1 << 16) as fh:
            pf = pq.ParquetFile(fh)
            names = pf.schema_arrow.names
            if "slide_id" not in names:
                raise UserError(f"{repo_id}/{f.path}: no slide_id column (expected owkin/plism-dataset-tiles shards)")
            col = names.index("slide_id")
            ids: set[str] = set()
            for g in range(pf.num_row_groups):
                stats = pf.metadata.row_group(g).column(col).statistics
                if stats is not None and stats.has_min_max and stats.min == stats.max:
                    ids.add(stats.min if isinstance(stats.min, str) else stats.min.decode())
                else:
                    ids.update(pf.read_row_group(g, columns=["slide_id"]).column(0).to_pylist())
        return f.path, sorted(ids)

    if todo:
        with tile_progress("indexing shards", total=len(todo), unit="shards", enabled=progress) as advance, \
                ThreadPoolExecutor(max_workers=8) as pool:
            for path, ids in pool.map(read, todo):
                known[path] = ids
                advance(1)
        cache.parent.mkdir(parents=True, exist_ok=True)
        _write_json(cache, known)
    return {f.path: known[f.path] for f in shards}


# -- manifests -----------------------------------------------------------------------------
def manifest_path(name: str, kind: str = "dataset") -> Path:
    return cache_dir("fetched", f"{name}.json") if kind == "dataset" else cache_dir("fetched", "models", f"{name}.json")


def _write_json(path: Path, data: Any) -> None:
    from pathrobust import atomic

    atomic.write_text(path, json.dumps(data, indent=2) + "\n")


def read_manifest(name: str, kind: str = "dataset") -> dict[str, Any] | None:
    path = manifest_path(name, kind)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable fetch manifest ({exc}); delete it and fetch again") from None


def git_blob_oid(path: Path) -> str:
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _discard(local: Path) -> None:
    """Remove a corrupt download: the file, and in the hub cache the blob its link points to."""
    target = local.resolve()
    local.unlink(missing_ok=True)
    if target != local:
        target.unlink(missing_ok=True)


def _file_records(root: Path, remote: Sequence[RemoteFile], what: str, progress: bool,
                  command: str) -> list[dict[str, Any]]:
    """sha256 and size of the fetched files (hashes cached by path, size and mtime), checked
    against the hub's sha256 (LFS files) or git blob id (small files). A file that differs is
    removed, so that running ``command`` again downloads it afresh."""
    from pathrobust.progress import tile_progress
    from pathrobust.weights import sha256_file

    records = []
    with tile_progress(f"sha256 {what}", total=len(remote), unit="files", enabled=progress) as advance:
        for f in remote:
            local = root / f.path
            size = local.stat().st_size
            digest = sha256_file(local)
            problem = None
            if size != f.size:
                problem = f"{size} bytes but the hub says {f.size}"
            elif f.sha256 and digest != f.sha256:
                problem = f"sha256 {digest[:12]}… differs from the hub's {f.sha256[:12]}…"
            elif not f.sha256 and f.git_oid and size <= _GIT_OID_MAX and git_blob_oid(local) != f.git_oid:
                problem = "content differs from the hub's (git blob id)"
            if problem:
                _discard(local)
                raise UserError(f"{what}: {local}: {problem}; the corrupt copy was removed: rerun `{command}`")
            records.append({"path": f.path, "size": size, "sha256": digest,
                            "verified": bool(f.sha256 or (f.git_oid and size <= _GIT_OID_MAX))})
            advance(1)
    return records


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("pathrobust", "huggingface_hub"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "?"
    return out


# -- downloading ---------------------------------------------------------------------------
def _free_bytes(path: Path) -> int:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _check_space(needed: int, target: Path, who: str) -> None:
    free = _free_bytes(target)
    if needed > free:
        raise UserError(f"{who}: disk full: {fmt_bytes(needed)} to download but {fmt_bytes(free)} free on {target}; "
                        "free some space or choose --dest on a larger disk")


def _local_root(repo_id: str, repo_type: str, commit: str, dest: Path | None) -> Path:
    if dest is not None:
        return dest
    return hf_cache_dir() / f"{repo_type}s--{repo_id.replace('/', '--')}" / "snapshots" / commit


def _present(root: Path, files: Iterable[RemoteFile]) -> list[RemoteFile]:
    return [f for f in files if (root / f.path).is_file()]


def _prepare(who: str, repo_id: str, repo_type: str, command: str, already: str | None = None) -> tuple[str, str | None]:
    """Endpoint and token for talking to the hub, after the offline and reachability checks."""
    if hf_offline():
        raise offline_error(who, repo_id, repo_type, already)
    endpoint = hub_endpoint()
    reason = unreachable_reason(endpoint)
    if reason:
        raise UserError(f"{who}: {unreachable_message(reason, endpoint)}; check the network or proxy (HTTPS_PROXY), "
                        f"or run `{command}` on a machine with network and copy the result here")
    return endpoint, hf_token()[0]


def _download(repo_id: str, repo_type: str, revision: str | None, files: Sequence[RemoteFile], dest: Path | None,
              endpoint: str, token: str | None, progress: bool, ctx: FetchContext) -> Path:
    """Download ``files`` with ``snapshot_download`` (resumable: finished files are kept and
    skipped next time). Returns the local root holding them."""
    from huggingface_hub import snapshot_download

    try:
        with _quiet_hub_logs():
            root = snapshot_download(
                repo_id, repo_type=repo_type, revision=revision, allow_patterns=[f.path for f in files],
                ignore_patterns=None, local_dir=str(dest) if dest is not None else None,
                cache_dir=str(hf_cache_dir()), token=token or False, endpoint=endpoint,
                tqdm_class=_bar_class(progress, ctx.what or repo_id), max_workers=8)
    except UserError:
        raise
    except Exception as exc:
        if not is_hub_error(exc):
            raise
        if ctx.files_total is not None:
            ctx.files_done = len(_present(dest, files)) if dest is not None else _count_cached(repo_id, repo_type, files)
        raise explain_hub_error(exc, ctx) from None
    return Path(root)


def _count_cached(repo_id: str, repo_type: str, files: Sequence[RemoteFile]) -> int:
    snaps = hf_cache_dir() / f"{repo_type}s--{repo_id.replace('/', '--')}" / "snapshots"
    best = 0
    for snap in snaps.glob("*") if snaps.is_dir() else ():
        best = max(best, len(_present(snap, files)))
    return best


# -- datasets ------------------------------------------------------------------------------
@dataclass
class FetchPlan:
    """What a fetch would do: the files, their sizes and which are already here."""

    dataset: Dataset
    commit: str
    files: list[RemoteFile]
    present: list[str]
    root: Path
    remote: list[RemoteFile]  # every file of the repository at ``commit``

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def download_bytes(self) -> int:
        here = set(self.present)
        return sum(f.size for f in self.files if f.path not in here)

    def to_dict(self) -> dict[str, Any]:
        here = set(self.present)
        return {"name": self.dataset.name, "repo_id": self.dataset.repo_id, "commit": self.commit,
                "dest": str(self.root), "total_bytes": self.total_bytes, "download_bytes": self.download_bytes,
                "files": [{"path": f.path, "size": f.size, "present": f.path in here} for f in self.files]}


def plan_dataset(name: str, subset: str | Sequence[str] | None = None, dest: str | os.PathLike | None = None,
                 revision: str | None = None, progress: bool = True) -> FetchPlan:
    """List what :func:`fetch_dataset` would download (asks the hub; downloads nothing)."""
    ds = get_dataset(name)
    terms = parse_subset(subset)
    command = f"pathrobust data fetch {ds.name}" + (f" --subset {','.join(terms)}" if terms else "")
    previous = read_manifest(ds.name)
    endpoint, token = _prepare(ds.name, ds.repo_id, "dataset", command, previous and previous.get("path"))
    ctx = FetchContext(ds.repo_id, "dataset", ds.name, command)
    try:
        with _quiet_hub_logs():
            commit, remote = list_remote(ds.repo_id, "dataset", revision, endpoint, token)
            files = select_files(ds, remote, terms, shard_slides=lambda shards: plism_shard_slides(
                ds.repo_id, commit, shards, endpoint, token, progress))
    except Exception as exc:
        if isinstance(exc, UserError) or not is_hub_error(exc):
            raise
        raise explain_hub_error(exc, ctx) from None
    root = _local_root(ds.repo_id, "dataset", commit, Path(dest).expanduser().resolve() if dest else None)
    return FetchPlan(ds, commit, files, [f.path for f in _present(root, files)], root, remote)


def fetch_dataset(name: str, subset: str | Sequence[str] | None = None, dest: str | os.PathLike | None = None,
                  revision: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Download dataset ``name`` (or the ``subset`` of it) into the Hugging Face cache or
    ``dest``, verify every file and write its fetch manifest. Returns the manifest.

    Interrupted? Run it again: finished files are kept and skipped."""
    plan = plan_dataset(name, subset, dest, revision, progress)
    ds, terms = plan.dataset, parse_subset(subset)
    dest_path = Path(dest).expanduser().resolve() if dest else None
    command = f"pathrobust data fetch {ds.name}" + (f" --subset {','.join(terms)}" if terms else "") + \
        (f" --dest {dest}" if dest else "")
    _check_space(plan.download_bytes, plan.root, ds.name)
    endpoint, token = hub_endpoint(), hf_token()[0]
    ctx = FetchContext(ds.repo_id, "dataset", ds.name, command, files_total=len(plan.files),
                       target=str(plan.root))
    if dest_path is not None:
        ctx.target = str(dest_path)
    root = _download(ds.repo_id, "dataset", plan.commit, plan.files, dest_path, endpoint, token, progress, ctx)
    # Every file of the dataset present here at this commit (earlier subsets included).
    remote_all = _filter(plan.remote, ds.allow, ds.ignore)
    here = _present(root, remote_all)
    manifest = {
        "manifest_version": MANIFEST_VERSION, "kind": "dataset", "name": ds.name, "repo_id": ds.repo_id,
        "repo_type": "dataset", "revision": revision or "main", "commit": plan.commit, "endpoint": endpoint,
        "path": str(root), "license": ds.license, "gated": ds.gated, "suite": ds.suite,
        "subset": terms, "complete": len(here) == len(remote_all), "files_in_dataset": len(remote_all),
        "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": _versions(),
        "files": _file_records(root, here, ds.name, progress, command),
    }
    manifest["total_bytes"] = sum(f["size"] for f in manifest["files"])
    _write_json(manifest_path(ds.name), manifest)
    if dest_path is not None:
        _write_json(dest_path / ".pathrobust" / "fetch-manifest.json", manifest)
    return manifest


def fetched_datasets() -> list[dict[str, Any]]:
    """One row per dataset of the table: fetched or not, where, size, licence, commit."""
    rows = []
    for ds in DATASETS.values():
        m = read_manifest(ds.name)
        row = {"name": ds.name, "repo_id": ds.repo_id, "license": ds.license, "gated": ds.gated,
               "approx_size": ds.approx_size, "suite": ds.suite, "description": ds.description,
               "fetched": False, "path": None, "bytes": None, "commit": None,
               "files": None, "complete": None, "subset": None, "missing": False}
        if m:
            exists = Path(m["path"]).is_dir()
            row.update(fetched=exists, path=m["path"], bytes=m.get("total_bytes"), commit=m.get("commit"),
                       files=len(m.get("files", [])), complete=m.get("complete"), subset=m.get("subset") or None,
                       missing=not exists)
        rows.append(row)
    return rows


def resolve_data(value: str | os.PathLike) -> Path:
    """``--data`` as typed -> a local path.

    An existing path is returned as it is; a dataset name of :data:`DATASETS` (``plism-tiles``,
    ``hest-bench``...) becomes the folder of its fetched copy; anything else is returned as a
    path for the suite to report."""
    path = Path(value).expanduser()
    if path.exists():
        return path
    text = str(value).strip()
    key = text.lower().replace("_", "-")
    if key not in DATASETS or "/" in text or os.sep in text:
        return path
    m = read_manifest(key)
    if m is None:
        raise UserError(f"--data {text}: dataset not fetched yet; run `pathrobust data fetch {key}` "
                        f"(about {DATASETS[key].approx_size}; `--dry-run` lists the files), or pass a folder")
    root = Path(m["path"])
    if not root.is_dir():
        raise UserError(f"--data {text}: the fetched copy at {root} is gone; run `pathrobust data fetch {key}` again")
    return root


# -- models --------------------------------------------------------------------------------
def model_files(spec, remote: Sequence[RemoteFile]) -> list[RemoteFile]:
    """The files ``spec`` needs from its repository: the first weights file of
    :data:`pathrobust.weights.HUB_FILES` present (else the only top-level weights file) and the
    timm ``config.json`` when there is one."""
    from pathrobust.weights import HUB_FILES, WEIGHT_SUFFIXES

    by_path = {f.path: f for f in remote}
    weights = next((by_path[n] for n in HUB_FILES if n in by_path), None)
    if weights is None:
        top = [f for f in remote if "/" not in f.path and f.path.endswith(WEIGHT_SUFFIXES)]
        if len(top) != 1:
            found = ", ".join(f.path for f in top) or "none"
            raise UserError(f"{spec.name}: {spec.hub_id} holds no {' or '.join(HUB_FILES)} (top-level weights: {found})")
        weights = top[0]
    return [weights] + ([by_path["config.json"]] if "config.json" in by_path else [])


def verify_weights(spec, weights_path: Path, config: dict[str, Any] | None, source: str) -> int:
    """Check that a checkpoint loads into ``spec``'s architecture: every key present with its
    shape, none extra (no forward pass). The architecture is built on the meta device, so a
    1B-parameter model costs no memory. Returns the number of tensors checked."""
    import torch

    from pathrobust.encoders.backbone import architecture_from_config, create_backbone
    from pathrobust.registry import get_converter
    from pathrobust.weights import check_fits, read_state_dict

    arch, kwargs = architecture_from_config(spec, config)
    try:
        with torch.device("meta"):
            module = create_backbone(spec, kwargs, arch)
    except Exception:  # an architecture that cannot be built on meta: build it for real
        module = create_backbone(spec, kwargs, arch)
    sd = read_state_dict(weights_path)
    sd = get_converter(spec)(sd, module)
    check_fits(module, sd, source)
    return len(sd)


def fetch_model(model: str, dest: str | os.PathLike | None = None, revision: str | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Download the files registered encoder ``model`` needs into the Hugging Face cache (where
    ``build_encoder`` finds them) or ``dest/<name>/`` (a ``$PATHROBUST_WEIGHTS_DIR`` layout),
    verify that they fit the architecture and write the fetch manifest. Returns it."""
    from pathrobust.registry import resolve_spec
    from pathrobust.weights import _read_config

    spec = resolve_spec(model)
    if not spec.pretrained or not spec.hub_id:
        raise UserError(f"{spec.name}: has no weights on the Hugging Face hub "
                        f"({'weight-free encoder' if not spec.pretrained else 'no hub_id in its spec'})")
    revision = revision or spec.revision
    dest_path = Path(dest).expanduser().resolve() / spec.name if dest else None
    command = f"pathrobust models fetch {spec.name}" + (f" --dest {dest}" if dest else "")
    if hf_offline():
        from pathrobust.weights import local_weights

        raise offline_error(spec.name, spec.hub_id, "model", local_weights(spec))
    endpoint, token = _prepare(spec.name, spec.hub_id, "model", command)
    ctx = FetchContext(spec.hub_id, "model", spec.name, command)
    try:
        with _quiet_hub_logs():
            commit, remote = list_remote(spec.hub_id, "model", revision, endpoint, token)
    except Exception as exc:
        if not is_hub_error(exc):
            raise
        raise explain_hub_error(exc, ctx) from None
    files = model_files(spec, remote)
    root = _local_root(spec.hub_id, "model", commit, dest_path)
    todo = [f for f in files if not (root / f.path).is_file()]
    _check_space(sum(f.size for f in todo), root, spec.name)
    ctx.files_total, ctx.target = len(files), str(root)
    root = _download(spec.hub_id, "model", revision, files, dest_path, endpoint, token, progress, ctx)
    weights_path = root / files[0].path
    source = f"hf:{spec.hub_id}@{commit[:12]}"
    n_tensors = verify_weights(spec, weights_path, _read_config(root), source)
    manifest = {
        "manifest_version": MANIFEST_VERSION, "kind": "model", "name": spec.name, "repo_id": spec.hub_id,
        "repo_type": "model", "revision": revision or "main", "commit": commit, "endpoint": endpoint,
        "path": str(root), "weights": str(weights_path), "license": spec.license, "gated": spec.gated,
        "spec_hash": spec.hash, "verified": {"tensors": n_tensors, "architecture": spec.arch or spec.builder},
        "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": _versions(),
        "files": _file_records(root, files, spec.name, progress, command),
    }
    manifest["sha256"] = manifest["files"][0]["sha256"]
    manifest["total_bytes"] = sum(f["size"] for f in manifest["files"])
    _write_json(manifest_path(spec.name, "model"), manifest)
    if dest_path is not None:
        _write_json(dest_path / ".pathrobust" / "fetch-manifest.json", manifest)
    return manifest


# -- doctor --------------------------------------------------------------------------------
def _version_of(module: str) -> str | None:
    import importlib

    try:
        mod = importlib.import_module(module)
    except Exception:  # not installed or broken: doctor reports, never crashes
        return None
    return str(getattr(mod, "__version__", "?"))


def doctor_report(probe: bool = True) -> dict[str, Any]:
    """What this machine has for pathrobust: versions, devices, Hugging Face settings (the
    token only as found / not found), which registered models have weights here and which
    datasets are fetched. ``probe=False`` skips the one-second hub probe."""
    import platform
    import sys

    versions: dict[str, str | None] = {"python": platform.python_version(), "pathrobust": _versions()["pathrobust"]}
    for mod in ("torch", "timm", "huggingface_hub", "safetensors", "numpy", "h5py", "pyarrow"):
        versions[mod] = _version_of(mod)
    devices: list[dict[str, Any]] = [{"device": "cpu", "name": platform.processor() or platform.machine(),
                                      "cores": os.cpu_count()}]
    try:
        import torch

        versions["cuda (torch build)"] = torch.version.cuda
        versions["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                devices.append({"device": f"cuda:{i}", "name": props.name,
                                "memory": fmt_bytes(props.total_memory), "capability": f"{props.major}.{props.minor}"})
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            devices.append({"device": "mps", "name": "Apple GPU"})
    except Exception as exc:  # torch missing or broken
        versions["torch"] = f"unusable ({type(exc).__name__})"
    try:
        import openslide

        versions["openslide-python"] = openslide.__version__
        versions["openslide (library)"] = openslide.__library_version__
    except Exception as exc:  # the C library may be missing
        versions["openslide-python"] = f"unusable ({type(exc).__name__}: {str(exc)[:80]})"

    token, source = hf_token()
    offline = hf_offline()
    endpoint = hub_endpoint()
    hub = {"endpoint": endpoint, "cache": str(hf_cache_dir()), "token": f"found ({source})" if token else "not found",
           "offline": f"{_offline_var()}=1" if offline else "no", "login": login_command()}
    if probe and not offline:
        reason = unreachable_reason(endpoint)
        hub["reachable"] = "yes" if reason is None else f"no ({reason})"
    else:
        hub["reachable"] = "not checked"

    from pathrobust.registry import list_specs
    from pathrobust.weights import local_weights

    models = []
    for spec in list_specs():
        if not spec.pretrained:
            continue
        try:
            where = local_weights(spec)
        except Exception as exc:  # a broken plugin spec must not take doctor down
            where = None
            note = f"{type(exc).__name__}"
        else:
            note = ""
        models.append({"name": spec.name, "hub_id": spec.hub_id, "gated": spec.gated, "weights": where,
                       "note": note})
    return {"versions": versions, "devices": devices, "hub": hub, "models": models,
            "datasets": fetched_datasets(), "executable": sys.executable}
