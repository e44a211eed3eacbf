"""One typed loader for every TOML pathrobust reads: suite protocols and distill recipes.

A TOML table maps onto a dataclass; its fields' type hints say what each key must be.
Unknown keys, wrong types, missing keys and out-of-range values raise one
:class:`~pathrobust.errors.UserError` line, ``<file>: '<table>.<key>' what is wrong``.

Ranges live next to the field they constrain, as field metadata::

    @dataclass
    class Probe:
        lr: float = field(metadata=positive())
        runs: int = field(metadata=at_least(1))
        centering: str = field(metadata=one_of("sinkhorn", "ema"))

A field without a default is required: suite protocols declare no defaults at all, so the
values live in the TOML only (``suites/<name>.toml``), never repeated in code.

Supported hints: ``bool``, ``int``, ``float``, ``str``, ``X | None``, ``list[X]``,
``tuple[X, ...]``, ``dict[str, X]`` and nested dataclasses (also as ``dict`` values).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pathrobust.errors import UserError

T = TypeVar("T")
Check = Callable[[Any], str | None]  # returns what is wrong, or None


# -- range checks (field metadata) ----------------------------------------------------------
def _check(fn: Check) -> dict[str, Check]:
    return {"check": fn}


def positive() -> dict[str, Check]:
    return _check(lambda v: None if v > 0 else f"must be > 0, got {v}")


def non_negative() -> dict[str, Check]:
    return _check(lambda v: None if v >= 0 else f"must be >= 0, got {v}")


def at_least(low: float) -> dict[str, Check]:
    return _check(lambda v: None if v >= low else f"must be >= {low}, got {v}")


def in_range(low: float, high: float) -> dict[str, Check]:
    return _check(lambda v: None if low <= v <= high else f"must be in [{low}, {high}], got {v}")


def probability() -> dict[str, Check]:
    return in_range(0, 1)


def one_of(*choices: str) -> dict[str, Check]:
    return _check(lambda v: None if v in choices else f"must be one of {', '.join(map(str, choices))}, got {v!r}")


def each(check: dict[str, Check]) -> dict[str, Check]:
    """Apply a check to every element of a list/tuple field."""
    inner = check["check"]

    def fn(values):
        for v in values:
            problem = inner(v)
            if problem:
                return f"every value {problem}"
        return None
    return _check(fn)


def non_empty() -> dict[str, Check]:
    return _check(lambda v: None if len(v) else "must not be empty")


# -- loading ---------------------------------------------------------------------------------
def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """A TOML file as a dict; a missing or malformed file is one UserError line."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML ({exc})") from None


def load_config(cls: type[T], path: str | os.PathLike, table: str | None = None) -> T:
    """Read ``path`` (optionally only its ``table``) into dataclass ``cls``."""
    data = read_toml(path)
    if table is not None:
        if table not in data:
            raise UserError(f"{path}: missing table [{table}]")
        data = data[table]
        if not isinstance(data, dict):
            raise UserError(f"{path}: '{table}' must be a table")
    return from_dict(cls, data, str(path), prefix=f"{table}." if table else "")


def from_dict(cls: type[T], data: Mapping[str, Any], source: str = "<dict>", prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, validating every key (see the module doc)."""
    if not isinstance(data, Mapping):
        raise UserError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        known = ", ".join(fields)
        raise UserError(f"{source}: unknown key '{prefix}{unknown[0]}' (known: {known})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UserError(f"{source}: '{key}' is missing (required)")
            continue
        value = _coerce(data[name], hints[name], key, source)
        check = f.metadata.get("check")
        if check is not None and value is not None:
            problem = check(value)
            if problem:
                raise UserError(f"{source}: '{key}' {problem}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except UserError as exc:  # a __post_init__ cross-field check
        raise UserError(f"{source}: {exc}") from None


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    def bad(what: str) -> UserError:
        return UserError(f"{source}: '{key}' must be {what}, got {value!r}")

    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None and type(None) in args:
            return None
        if len(options) == 1:
            return _coerce(value, options[0], key, source)
        for option in options:
            try:
                return _coerce(value, option, key, source)
            except UserError:
                continue
        raise bad(" or ".join(_type_name(o) for o in options))
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, source, prefix=f"{key}.")
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        if not math.isfinite(value):
            raise bad("a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise bad("a list")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or hint is dict:
        if not isinstance(value, dict):
            raise bad("a table")
        inner = args[1] if len(args) == 2 else Any
        return {k: _coerce(v, inner, f"{key}.{k}", source) for k, v in value.items()}
    raise TypeError(f"pathrobust.config: unsupported type hint {hint!r} for {key}")


def to_dict(obj: Any) -> Any:
    """A config dataclass as plain JSON-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
