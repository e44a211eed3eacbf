"""``pathrobust doctor``: what this machine has for pathrobust."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from pathrobust import cli_options as opt
from pathrobust.cli import app, console


@app.command("doctor")
def doctor_command(
    as_json: opt.Json = False,
    no_probe: Annotated[bool, typer.Option("--no-probe", help="Do not check whether the Hugging Face hub answers.")] = False,
) -> None:
    """Versions (torch, CUDA, timm, openslide...), devices, Hugging Face settings (token found
    or not; never printed), which registered models have weights on this machine and which
    datasets are fetched.

    Examples:
      pathrobust doctor
      pathrobust doctor --json --no-probe
    """
    from pathrobust.hub import doctor_report, fmt_bytes

    report = doctor_report(probe=not no_probe)
    if as_json:
        print(json.dumps(report, indent=2, default=str))
        return
    table = Table(title="pathrobust doctor", show_header=False, pad_edge=False)
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in report["versions"].items():
        table.add_row(key, value or "[dim]not installed[/]")
    for dev in report["devices"]:
        table.add_row(dev["device"], ", ".join(str(v) for k, v in dev.items() if k != "device" and v))
    for key, value in report["hub"].items():
        table.add_row(f"hub {key}", str(value))
    console.print(table)

    models = Table(title="registered models: weights on this machine", pad_edge=False)
    for col in ("model", "hub", "gated", "weights"):
        models.add_column(col, overflow="fold")
    for m in report["models"]:
        models.add_row(m["name"], m["hub_id"] or "-", "yes" if m["gated"] else "no",
                       f"[green]{m['weights']}[/]" if m["weights"] else "[dim]-[/] " + m["note"])
    console.print(models)

    data = Table(title="datasets (pathrobust data fetch NAME)", pad_edge=False)
    for col in ("dataset", "fetched", "where", "size", "commit"):
        data.add_column(col, overflow="fold")
    for d in report["datasets"]:
        state = ("yes" if d["complete"] else f"part ({d['files']} files)") if d["fetched"] else \
            ("[red]gone[/]" if d["path"] else "[dim]-[/]")
        data.add_row(d["name"], state, d["path"] or "-", fmt_bytes(d["bytes"]) if d["bytes"] else "-",
                     (d["commit"] or "-")[:12])
    console.print(data)
