"""The CLI's front door: help with examples, models list/show (table and JSON)."""

import json

from tests.helpers import assert_one_line_error, run_cli


def test_cli_help_lists_commands():
    out = run_cli("--help", check=True).stdout
    for command in ("models", "extract", "run", "data"):
        assert command in out
    assert "Examples" in run_cli("extract", "--help", check=True).stdout


def test_models_list_json_and_table():
    rows = {r["name"]: r for r in json.loads(run_cli("models", "list", "--json", check=True).stdout)}
    h0 = rows["h0-mini"]
    assert h0["dims"] == {"cls": 768, "cls+mean": 1536, "mean": 768} and h0["access"] == "gated"
    assert h0["weights_local"] is None  # not on this machine
    assert rows["efficientnet-lite0-imagenet"]["weights_local"].startswith("package")
    assert rows["rgb-histogram"]["access"] == "no weights"
    table = run_cli("models", "list", env={"COLUMNS": "160"}, check=True).stdout
    assert "virchow2" in table and "1280 / 2560*" in table


def test_models_show():
    data = json.loads(run_cli("models", "show", "virchow2", "--json", check=True).stdout)
    assert data["num_prefix_tokens"] == 5 and data["default_pooling"] == "cls+mean"
    assert data["arch_kwargs"]["mlp_layer"] == "timm.layers:SwiGLUPacked" and len(data["spec_hash"]) == 16
    assert_one_line_error(run_cli("models", "show", "virchow3"), "virchow3")
