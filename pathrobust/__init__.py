"""pathrobust: benchmark and distill pathology tile encoders.

The CLI (``pathrobust ...``) is a thin layer over this package; everything it does is
importable. The main entry points:

* :func:`build_encoder` — a registered name, ``module:factory``, a distilled model folder,
  an :class:`EncoderSpec` or a plain ``torch.nn.Module`` -> an :class:`Encoder`;
* :func:`extract_features` — embed a tile folder, tile h5, slide or PLISM data into a
  resumable CLAM/TRIDENT-style h5 file;
* :func:`run_suite` — run a benchmark suite (``list_suites()``: plism, hest, eva, ...) and
  get its summary; the same run directory and results DB as ``pathrobust run``;
* :func:`register_encoder`, :func:`register_suite` — add your own.

Example::

    import pathrobust
    enc = pathrobust.build_encoder("h0-mini", pooling="cls+mean")
    pathrobust.extract_features(enc, "tiles/", "features/tiles.h5")
    summary = pathrobust.run_suite("plism", enc, data="plism-tiles", out="runs")
    print(summary["headline"])
"""

from __future__ import annotations

__version__ = "0.1.0"

# The names below are imported on first use (PEP 562): `pathrobust --help` and a usage error
# need neither torch nor timm, which take seconds to import.
_EXPORTS = {
    "UserError": "pathrobust.errors",
    "EncoderSpec": "pathrobust.registry",
    "get_spec": "pathrobust.registry",
    "list_specs": "pathrobust.registry",
    "register_encoder": "pathrobust.registry",
    "resolve_spec": "pathrobust.registry",
    "Encoder": "pathrobust.encoders.base",
    "build_encoder": "pathrobust.encoders.base",
    "extract_features": "pathrobust.extract",
    "load_features": "pathrobust.extract",
    "Suite": "pathrobust.suites.base",
    "SuiteResult": "pathrobust.suites.base",
    "list_suites": "pathrobust.suites.base",
    "register_suite": "pathrobust.suites.base",
    "run_suite": "pathrobust.suites.base",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pathrobust' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "Encoder",
    "EncoderSpec",
    "Suite",
    "SuiteResult",
    "UserError",
    "build_encoder",
    "extract_features",
    "get_spec",
    "list_specs",
    "list_suites",
    "load_features",
    "register_encoder",
    "register_suite",
    "resolve_spec",
    "run_suite",
]
