"""CLI command modules, one per area; each registers its commands on the apps of pathrobust.cli."""
