"""Every built-in family, and the converters their specs name: importing this module
registers them (``pathrobust.encoders`` imports it; the registry imports that package at its
first lookup)."""

from pathrobust.encoders import convert, conch  # noqa: F401  (converters: timm, in-order, transformers-*, conch)
from pathrobust.encoders import baselines, bioptimus, histai, kaiko, mahmood, owkin, paige, providence  # noqa: F401
