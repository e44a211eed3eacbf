"""``pathrobust report``: leaderboards from the results database."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pathrobust.cli import app, err_console
from pathrobust.store import DB_FILENAME

DEFAULT_DB = Path("runs") / DB_FILENAME


@app.command("report")
def report(
    db: Annotated[Path, typer.Option("--db", help="Results database written by the suite runs (<out>/results.sqlite).")] = DEFAULT_DB,
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder.")] = Path("reports"),
    suite: Annotated[Optional[list[str]], typer.Option("--suite", "-s", help="Only this suite (repeatable): plism, hest, eva.")] = None,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Skip the plots (tables only).")] = False,
    no_published: Annotated[bool, typer.Option("--no-published", help="Leave out the published reference rows.")] = False,
) -> None:
    """Write leaderboards from recorded runs: leaderboard.md, .csv, .json, a self-contained
    leaderboard.html (sortable tables, suite filter, plots) and plots/*.png.

    Each suite is ranked by its reference rule (PLISM leaderboard metric, HEST average Pearson,
    EVA average balanced accuracy without BACH); rows differing in pooling or precision are
    distinct; published numbers appear in their own, marked tables.

    Examples:
      pathrobust report
      pathrobust report --db runs/results.sqlite --out reports/
      pathrobust report --suite plism --suite hest --out reports/plism-hest
    """
    from pathrobust.reports.build import write_report

    files = write_report(db, out, suites=suite or None, plots=not no_plots, include_published=not no_published)
    n = sum(len(b.rows) for b in files.report.boards)
    err_console.print(f"[green]✓[/] {n} leaderboard rows over {len(files.report.boards)} suite(s) -> {files.html}")
    for path in (files.markdown, files.csv, files.json, *files.plots):
        err_console.print(f"  {path}")
