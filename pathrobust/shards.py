"""What a sharded launch leaves in its directory, and completing it (``pathrobust merge``).

A directory worked on by job-array shards (``--shard i/n``) holds:

* ``launch.json`` — the command and arguments that made it (``pathrobust run <suite>`` or
  ``pathrobust extract``), without the shard; ``pathrobust merge DIR`` reruns them in one
  process once every shard is done, which then only completes what is left (evaluation,
  summary, DB rows; files whose chunks are all there);
* ``shards/<i>-of-<n>.json`` — one marker per finished shard: its index, the shard count and
  a digest of the plan (the inputs and what identifies the outputs), so a merge refuses
  shards of different configurations.

The last shard to finish finds every marker and completes the work itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import typing
from pathlib import Path
from typing import Any

from pathrobust import atomic
from pathrobust.errors import UserError

LAUNCH = "launch.json"
MARKERS = "shards"


# -- the launch record ------------------------------------------------------------------------------
def write_launch(directory: Path, launch: dict[str, Any]) -> None:
    atomic.write_json(Path(directory) / LAUNCH, launch)


def read_launch(directory: Path) -> dict[str, Any]:
    path = Path(directory) / LAUNCH
    if not Path(directory).is_dir():
        raise UserError(f"{directory}: no such directory")
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{directory}: no {LAUNCH}; not a directory written by `pathrobust run` or "
                        "`pathrobust extract`") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable ({exc})") from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def suite_launch(name: Any, model, data, out, features, pooling, weights, device, precision, batch_size, workers,
                 protocol, db_path, trust_code, options) -> dict[str, Any]:
    """The launch record of ``pathrobust run <suite>`` (a model given as a Python object is
    recorded as such: such a run is completed by calling ``run_suite`` again)."""
    import dataclasses

    suite = name if isinstance(name, str) else f"{name.__module__}:{name.__qualname__}"
    return {
        "command": "run", "suite": suite,
        "model": model if isinstance(model, str) or model is None else None,
        "model_is_object": not (isinstance(model, str) or model is None),
        "data": _jsonable(data), "out": str(out), "features": _jsonable(features), "pooling": pooling,
        "weights": weights, "device": device, "precision": precision, "batch_size": batch_size,
        "workers": workers, "protocol": _jsonable(protocol), "db_path": _jsonable(db_path),
        "trust_code": trust_code,
        "options": {f.name: _jsonable(getattr(options, f.name)) for f in dataclasses.fields(options)},
    }


def restore_options(options_cls: type, values: dict[str, Any]) -> Any:
    """A suite's Options from its launch record (paths and tuples as their fields declare)."""
    import dataclasses

    hints = typing.get_type_hints(options_cls)
    kwargs = {}
    for f in dataclasses.fields(options_cls):
        if f.name not in values:
            continue
        kwargs[f.name] = _restore(values[f.name], hints[f.name])
    return options_cls(**kwargs)


def _restore(value: Any, hint: Any) -> Any:
    if value is None:
        return None
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        return _restore(value, args[0])
    if hint is Path:
        return Path(value)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


# -- markers ----------------------------------------------------------------------------------------
def plan_digest(entries: list[tuple[str, str, Any]], extra: dict[str, Any]) -> str:
    """Digest of a sharded plan: each (name, output file, source) by the source's
    fingerprint and size, plus ``extra`` (what identifies the outputs)."""
    blob = json.dumps({"items": [[name, out, source.fingerprint(), len(source)] for name, out, source in entries],
                       **extra}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def marker_path(directory: Path, index: int, size: int) -> Path:
    return Path(directory) / MARKERS / f"{index}-of-{size}.json"


def write_marker(directory: Path, index: int, size: int, plan: str) -> Path:
    path = marker_path(directory, index, size)
    atomic.write_json(path, {"shard": index, "of": size, "plan": plan, "host": socket.gethostname(),
                             "pid": os.getpid(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return path


def read_markers(directory: Path) -> list[dict[str, Any]]:
    folder = Path(directory) / MARKERS
    found = []
    for path in sorted(folder.glob("*-of-*.json")) if folder.is_dir() else []:
        try:
            found.append({**json.loads(path.read_text()), "file": path.name})
        except (OSError, ValueError):
            raise UserError(f"{path}: unreadable shard marker; remove it and rerun that shard") from None
    return found


def check_markers(directory: Path) -> list[int]:
    """The shards whose marker is missing (empty: all done). Markers of different shard
    counts or plans (another configuration) are one-line errors."""
    markers = read_markers(directory)
    if not markers:
        raise UserError(f"{directory}: no shard markers ({MARKERS}/); nothing was run with --shard here")
    sizes = sorted({int(m["of"]) for m in markers})
    plans = sorted({str(m["plan"]) for m in markers})
    if len(sizes) > 1 or len(plans) > 1:
        which = ", ".join(f"{m['shard']}/{m['of']} (plan {m['plan']})" for m in markers)
        raise UserError(f"{directory}: shards from different configurations ({which}); remove "
                        f"{Path(directory) / MARKERS} and run the shards of one configuration again")
    n = sizes[0]
    done = {int(m["shard"]) for m in markers}
    return [i for i in range(n) if i not in done]


def missing_message(directory: Path, missing: list[int], n: int) -> str:
    return (f"{directory}: shard(s) {', '.join(f'{i}/{n}' for i in missing)} not finished; run them "
            f"(--shard i/{n}), then merge again")


def shard_count(directory: Path) -> int:
    markers = read_markers(directory)
    return int(markers[0]["of"]) if markers else 0


# -- merge --------------------------------------------------------------------------------------------
def merge(directory: str | os.PathLike, *, progress: bool = True, say=None) -> dict[str, Any]:
    """Complete a sharded launch: check that every shard left its marker (one line naming
    the missing ones otherwise), then rerun the launch in this process — which finds the
    shards' work done and completes the rest. Returns the run's summary (``run``) or
    ``{"files": [...]}`` (``extract``)."""
    directory = Path(directory)
    launch = read_launch(directory)
    missing = check_markers(directory)
    if missing:
        raise UserError(missing_message(directory, missing, shard_count(directory)))
    say = say or (lambda message: None)
    if launch.get("command") == "run":
        if launch.get("model_is_object"):
            raise UserError(f"{directory}: its model was a Python object; complete it by calling run_suite(...) "
                            "again without shard")
        from pathrobust.suites.base import load_suite, run_suite

        name = launch["suite"]
        suite = load_suite(name, launch.get("protocol"))
        options = restore_options(suite.Options, launch.get("options", {}))
        return run_suite(name, launch.get("model"), launch.get("data"), launch["out"], features=launch.get("features"),
                         pooling=launch.get("pooling"), weights=launch.get("weights"), device=launch.get("device", "auto"),
                         precision=launch.get("precision", "auto"), batch_size=launch.get("batch_size", 64),
                         workers=launch.get("workers", 0), protocol=launch.get("protocol"), db_path=launch.get("db_path"),
                         trust_code=launch.get("trust_code", False), progress=progress, say=say, options=options,
                         merge_into=directory)
    if launch.get("command") == "extract":
        from pathrobust.extract import extract_dataset

        args = {k: v for k, v in launch.items() if k != "command"}
        files = extract_dataset(**args, progress=progress, say=say, merge_into=directory)
        return {"files": [str(f) for f in files]}
    raise UserError(f"{directory / LAUNCH}: unknown command {launch.get('command')!r}")
