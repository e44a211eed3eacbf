"""CLI command modules (registered through ``pathrobust.cli._COMMAND_MODULES``)."""
