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

from pathrobust.errors import UserError  # noqa: E402
from pathrobust.registry import EncoderSpec, get_spec, list_specs, register_encoder, resolve_spec  # noqa: E402
from pathrobust.encoders.base import Encoder, build_encoder  # noqa: E402
from pathrobust.extract import extract_features, load_features  # noqa: E402
from pathrobust.suites.base import Suite, SuiteResult, list_suites, register_suite, run_suite  # noqa: E402

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
