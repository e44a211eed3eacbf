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
    """Run the whole mission offline: synthetic data from real H&E for every suite, a distilled
    student, all suites on teacher, student and baselines, and the leaderboard report.

    A second run reuses everything that finished; an interrupted run resumes.

    Examples:
      pathrobust demo
      pathrobust demo --out /tmp/demo --quick
    """
    from pathrobust.demo import DemoConfig, demo_suites, run_demo

    config = DemoConfig.quick() if quick else DemoConfig()
    result = run_demo(out, config, progress=not no_progress, say=lambda m: err_console.print(f"[bold cyan]»[/] {m}"))
    suites = {s.name: s for s in demo_suites()}
    table = Table(title=f"pathrobust demo · {result.seconds / 60:.1f} min · synthetic data")
    table.add_column("model", no_wrap=True)
    for name in result.suites:
        lb = suites[name].leaderboard
        table.add_column(f"{lb.short} {lb.score_label.lower()} {'↑' if lb.direction == 'higher' else '↓'}",
                         justify="right")
    for model in result.models:
        s = result.scores[model]
        table.add_row(model, *(f"{s[k]:.3f}" if s.get(k) is not None else "-" for k in result.suites))
    console.print(table)
    console.print(f"Report: [bold]{result.report_html}[/] (open in a browser) · {result.report_md}")
