"""CLI command modules (each registers its commands on the apps of :mod:`pathrobust.cli`)."""
