"""Report plots (matplotlib, no pyplot state): PNG bytes for the HTML page and the report folder.

Generic plots (robustness vs accuracy from the suites' roles, score vs size, score vs
throughput) and the plots each suite declares in its ``[leaderboard]`` table (scatter of two
metrics, grouped bars, grid heatmaps from a per-item table of its runs). Rows measured on
synthetic data are never drawn on the axes of published (real-benchmark) results: they get
their own panel. Points are numbered, with the names in a key beside the axes, so labels
never overlap.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from pathrobust.reports.tables import OverallRow, Report, Row, SuiteBoard
from pathrobust.suites.base import BarPlot, GridPlot, ScatterPlot

MAX_GRIDS = 6
MEASURED = {"marker": "o", "s": 40, "color": "#1f6feb", "zorder": 3}
SYNTHETIC = {"marker": "D", "s": 36, "color": "#2a9d8f", "zorder": 3}
PUBLISHED = {"marker": "s", "s": 30, "facecolors": "none", "edgecolors": "#777777", "zorder": 2}


@dataclass(frozen=True)
class Plot:
    name: str  # file stem
    title: str
    png: bytes
    suites: list[str] = field(default_factory=list)  # the suites it belongs to ([] = all)


Point = tuple[float, float, str]


def _tex_safe(text: str) -> str:
    """Matplotlib parses ``$...$`` as mathtext; user names are plain text."""
    return text.replace("\\", "\\\\").replace("$", r"\$")


def label(row: Row | OverallRow) -> str:
    extras = [x for x in (row.pooling, row.precision) if x]
    return _tex_safe(row.model + (f" ({', '.join(extras)})" if extras else ""))


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _numbered(ax, groups: list[tuple[str, dict, list[Point], str]]) -> None:
    """Scatter each group's points with a number beside each; the key (number -> name) sits
    right of the axes, so labels never overlap however close the points are."""
    key, n = [], 0
    for name, style, points, colour in groups:
        if not points:
            continue
        ax.scatter([p[0] for p in points], [p[1] for p in points], label=name, **style)
        for x, y, text in points:
            n += 1
            ax.annotate(str(n), (x, y), xytext=(4, 3), textcoords="offset points", fontsize=7, color=colour)
            key.append(f"{n}  {text}" + ("" if name == "measured" else f"  ({name})"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    if key:
        ax.text(1.03, 1.0, "\n".join(key), transform=ax.transAxes, fontsize=7, va="top", ha="left",
                family="monospace")


def _panels(real: list[Point], synthetic: list[Point], published: list[Point]) -> list[tuple[str, list]]:
    """Axes to draw: measured rows on the real benchmarks share axes with published results;
    synthetic rows get their own; published results alone only when nothing real is measured."""
    panels = []
    if real:
        panels.append(("measured and published", [("measured", MEASURED, real, "#111111"),
                                                  ("published", PUBLISHED, published, "#777777")]))
    if synthetic:
        panels.append(("measured on synthetic data", [("measured", SYNTHETIC, synthetic, "#111111")]))
    if published and not real and synthetic:
        panels.append(("published (real benchmarks)", [("published", PUBLISHED, published, "#777777")]))
    return panels


def _scatter_figure(real: list[Point], synthetic: list[Point], published: list[Point], xlabel: str, ylabel: str,
                    title: str, xlog: bool = False) -> Figure | None:
    if not real and not synthetic:
        return None
    panels = _panels(real, synthetic, published)
    fig = Figure(figsize=(7.5 * len(panels), 5))
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (subtitle, groups) in zip(axes, panels):
        _numbered(ax, groups)
        if xlog:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(subtitle, fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _split(rows: list[Row], value: Callable[[Row], tuple[float | None, float | None]]) -> tuple[list[Point], list[Point]]:
    real, synthetic = [], []
    for r in rows:
        x, y = value(r)
        if x is None or y is None:
            continue
        (synthetic if r.synthetic else real).append((x, y, label(r)))
    return real, synthetic


# -- generic plots -----------------------------------------------------------------------------
def robustness_vs_accuracy(report: Report) -> Figure | None:
    acc, rob = report.role_suites("accuracy"), report.role_suites("robustness")
    if not acc or not rob:
        return None
    real, synthetic = _split(report.overall, lambda r: (r.accuracy, r.robustness))
    published = [(r.accuracy, r.robustness, label(r)) for r in report.published_overall
                 if r.accuracy is not None and r.robustness is not None]
    def names(suites: list[str], role: str) -> str:
        return " and ".join(report.role_name(s, role) for s in suites)
    return _scatter_figure(real, synthetic, published, f"accuracy: {'mean of ' if len(acc) > 1 else ''}"
                           f"{names(acc, 'accuracy')}", f"robustness: {'mean of ' if len(rob) > 1 else ''}"
                           f"{names(rob, 'robustness')}", "Robustness vs accuracy")


def _per_suite(report: Report, x_of: Callable[[Row], float | None], xlabel: str, title: str,
               with_published: bool) -> Figure | None:
    panels = []
    for board in report.boards:
        for subtitle, rows, style in (("", [r for r in board.rows if not r.synthetic], MEASURED),
                                      (" · synthetic data", [r for r in board.rows if r.synthetic], SYNTHETIC)):
            measured = [(x_of(r), r.score, label(r)) for r in rows if x_of(r) and r.score is not None]
            if not measured:
                continue
            published = [(x_of(r), r.score, label(r)) for r in board.published
                         if with_published and not subtitle and x_of(r) and r.score is not None]
            panels.append((board, subtitle, measured, published, style))
    if not panels:
        return None
    fig = Figure(figsize=(6.5 * len(panels), 4.5))
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (board, subtitle, measured, published, style) in zip(axes, panels):
        _numbered(ax, [("measured", style, measured, "#111111"), ("published", PUBLISHED, published, "#777777")])
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(_tex_safe(board.score_label))
        ax.set_title(_tex_safe(board.title + subtitle), fontsize=10)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def score_vs_params(report: Report) -> Figure | None:
    return _per_suite(report, lambda r: r.params, "parameters", "Score vs model size", with_published=True)


def throughput_vs_score(report: Report) -> Figure | None:
    return _per_suite(report, lambda r: r.tiles_per_s, "tiles / s", "Score vs throughput", with_published=False)


# -- plots a suite declares --------------------------------------------------------------------
def _metric_value(values: dict, metric: str | list[str]) -> float | None:
    names = [metric] if isinstance(metric, str) else metric
    vals = [values.get(m) for m in names]
    return None if not vals or any(v is None for v in vals) else sum(vals) / len(vals)


def declared_scatter(board: SuiteBoard, spec: ScatterPlot) -> Figure | None:
    def value(r: Row) -> tuple[float | None, float | None]:
        values = {**r.metrics, **r.values}
        return _metric_value(values, spec.x), _metric_value(values, spec.y)
    real, synthetic = _split(board.rows, value)
    published = [(x, y, label(r)) for r in board.published for x, y in [value(r)] if x is not None and y is not None]
    return _scatter_figure(real, synthetic, published, spec.xlabel, spec.ylabel, _tex_safe(spec.title))


def declared_bars(board: SuiteBoard, spec: BarPlot) -> Figure | None:
    rows = [r for r in board.rows if any(m in r.metrics for panel in spec.panels for m in panel.metrics)]
    if not rows:
        return None
    fig = Figure(figsize=(max(7, 1.6 * len(rows) + 3), 3.3 * len(spec.panels)))
    axes = np.atleast_1d(fig.subplots(len(spec.panels), 1))
    x = np.arange(len(rows))
    for ax, panel in zip(axes, spec.panels):
        width = 0.8 / len(panel.metrics)
        for k, (metric, name) in enumerate(zip(panel.metrics, panel.labels)):
            values = [r.metrics.get(metric) for r in rows]
            errors = [r.metrics.get(panel.errors[k]) if panel.errors else None for r in rows]
            ax.bar(x + (k - (len(panel.metrics) - 1) / 2) * width, [v if v is not None else np.nan for v in values],
                   width, yerr=[(e / 2 if e is not None else 0.0) for e in errors] if panel.errors else None,
                   capsize=2, label=name)
        ax.set_ylabel(panel.ylabel)
        ax.set_xticks(x, [label(r) + (" [synthetic]" if r.synthetic else "") for r in rows], rotation=20, ha="right",
                      fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title(_tex_safe(spec.title))
    axes[0].legend(fontsize=8, ncol=len(spec.panels[0].metrics))
    fig.tight_layout()
    return fig


def _read_table(run_dir: str, name: str, needed: set[str]):
    import pandas as pd

    path = Path(run_dir) / name if run_dir else None
    if path is None or not path.is_file():
        return None
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError):
        return None
    return table if needed <= set(table.columns) else None


def grid_means(table, spec: GridPlot) -> tuple[list[str], list[str], np.ndarray]:
    """Mean ``spec.value`` per (row key, column key): each table row counts for every key pair."""
    import pandas as pd

    parts = [table[[r, c, spec.value]].set_axis(["r", "c", "v"], axis=1) for r, c in zip(spec.rows, spec.cols)]
    means = pd.concat(parts).groupby(["r", "c"])["v"].mean()
    row_keys = sorted(means.index.get_level_values(0).unique())
    col_keys = sorted(means.index.get_level_values(1).unique())
    grid = np.full((len(row_keys), len(col_keys)), np.nan)
    for (r, c), v in means.items():
        grid[row_keys.index(r), col_keys.index(c)] = v
    return row_keys, col_keys, grid


def declared_grid(board: SuiteBoard, spec: GridPlot) -> Figure | None:
    needed = {spec.value, *spec.rows, *spec.cols}
    panels = []
    for row in board.rows:
        table = _read_table(row.run_dir, spec.table, needed)
        if table is not None and len(table):
            panels.append((row, grid_means(table, spec)))
        if len(panels) == MAX_GRIDS:
            break
    if not panels:
        return None
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.2 * cols, 4.2 * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, cols)).ravel()
    for ax, (row, (row_keys, col_keys, grid)) in zip(axes, panels):
        im = ax.imshow(grid, vmin=spec.vmin, vmax=spec.vmax, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(col_keys)), col_keys, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(row_keys)), row_keys, fontsize=7)
        ax.set_title(label(row) + (" [synthetic]" if row.synthetic else ""), fontsize=8)
        ax.set_xlabel(spec.col_label, fontsize=7)
        ax.set_ylabel(spec.row_label, fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(_tex_safe(spec.title))
    fig.tight_layout()
    return fig


def render_plots(report: Report) -> list[Plot]:
    """Every plot the report's data supports, as PNG bytes (declared ones after the overview)."""
    roles = [s for s in report.suites if report.roles.get(s)]
    made: list[tuple[str, str, Figure | None, list[str]]] = [
        ("robustness_vs_accuracy", "Robustness vs accuracy", robustness_vs_accuracy(report), roles)]
    for board in report.boards:
        if board.spec is None:
            continue
        made += [(p.name, p.title, declared_scatter(board, p), [board.suite]) for p in board.spec.scatter]
        made += [(p.name, p.title, declared_bars(board, p), [board.suite]) for p in board.spec.bars]
        made += [(p.name, p.title, declared_grid(board, p), [board.suite]) for p in board.spec.grids]
    made += [("score_vs_params", "Score vs parameters", score_vs_params(report), []),
             ("throughput_vs_score", "Score vs throughput", throughput_vs_score(report), [])]
    return [Plot(name, title, _png(fig), suites) for name, title, fig, suites in made if fig is not None]
