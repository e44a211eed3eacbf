"""Write a report folder: leaderboard.{md,csv,json,html} and plots/*.png, each written atomically."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pathrobust import atomic
from pathrobust.reports.export import render_csv, render_json
from pathrobust.reports.html import render_html
from pathrobust.reports.markdown import render_markdown
from pathrobust.reports.plots import render_plots
from pathrobust.reports.tables import Report, build_report
from pathrobust.store import ResultsDB

PLOTS_DIR = "plots"


@dataclass
class ReportFiles:
    report: Report
    markdown: Path
    csv: Path
    json: Path
    html: Path
    plots: list[Path]


def _write(path: Path, data: str | bytes) -> None:
    if isinstance(data, bytes):
        atomic.write_bytes(path, data)
    else:
        atomic.write_text(path, data)


def write_report(db_path: str | os.PathLike, out: str | os.PathLike, suites: Sequence[str] | None = None,
                 plots: bool = True, include_published: bool = True) -> ReportFiles:
    """Read the results database at ``db_path`` and write the report files into ``out``."""
    from pathrobust import __version__

    db = ResultsDB.open_existing(db_path)
    report = build_report(db.runs(), suites=suites, include_published=include_published)
    out = Path(out)
    (out / PLOTS_DIR).mkdir(parents=True, exist_ok=True)
    figures = render_plots(report) if plots else []
    plot_paths = []
    for plot in figures:
        path = out / PLOTS_DIR / f"{plot.name}.png"
        _write(path, plot.png)
        plot_paths.append(path)
    generator = f"pathrobust {__version__}"
    files = ReportFiles(report, out / "leaderboard.md", out / "leaderboard.csv", out / "leaderboard.json",
                        out / "leaderboard.html", plot_paths)
    _write(files.markdown, render_markdown(report))
    _write(files.csv, render_csv(report))
    _write(files.json, render_json(report, {"generator": generator, "database": str(Path(db_path))}))
    _write(files.html, render_html(report, figures, generator))
    return files
