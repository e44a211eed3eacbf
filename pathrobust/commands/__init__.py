"""CLI command modules, one per area; each registers its commands on the typer apps of pathrobust.cli."""
