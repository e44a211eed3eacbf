"""Import every built-in family so its specs register (called lazily by the registry)."""

from pathrobust.encoders import baselines, bioptimus, histai, kaiko, mahmood, owkin, paige, providence  # noqa: F401
