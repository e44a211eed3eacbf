"""``pathrobust demo``: everything end to end on bundled data and weights, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from pathrobust import cli_options as opt
from pathrobust.cli import app, console, err_console


@app.command("demo")
def demo(
    out: opt.OutDir = Path("pathrobust-demo"),
    quick: Annotated[bool, typer.Option("--quick", help="Reduced sizes (a smoke test in about a minute).")] = False,
    no_progress: opt.NoProgress = False,
) -> None:
    """Run the whole mission offline: synthetic PLISM/HEST/EVA data from real H&E, a distilled
    student, all suites on teacher, student and baselines, and the leaderboard report.

    A second run reuses everything that finished; an interrupted run resumes.

    Examples:
      pathrobust demo
      pathrobust demo --out /tmp/demo --quick
    """
    from pathrobust.demo import DemoConfig, run_demo

    config = DemoConfig.quick() if quick else DemoConfig()
    result = run_demo(out, config, progress=not no_progress, say=lambda m: err_console.print(f"[bold cyan]»[/] {m}"))
    table = Table(title=f"pathrobust demo · {result.seconds / 60:.1f} min")
    table.add_column("model", no_wrap=True)
    for col in ("PLISM leaderboard ↑", "HEST Pearson ↑", "EVA bal. acc. ↑"):
        table.add_column(col, justify="right")
    for name in result.models:
        s = result.scores[name]
        table.add_row(name, *(f"{s[k]:.3f}" if s.get(k) is not None else "-" for k in ("plism", "hest", "eva")))
    console.print(table)
    console.print(f"Report: [bold]{result.report_html}[/] (open in a browser) · {result.report_md}")
