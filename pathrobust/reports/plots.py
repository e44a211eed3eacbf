"""Report plots (matplotlib, no pyplot state): PNG bytes for the HTML page and the report folder.

Each plot function returns ``None`` when the report holds nothing to draw for it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from pathrobust.reports.tables import ACCURACY_SUITES, ROBUSTNESS_SUITE, OverallRow, Report, Row, SuiteBoard

PAIR_METRICS_FILE = "metrics.csv"  # the plism run dir's per-pair table
GROUPS = (("all", "all pairs"), ("inter_scanner", "inter-scanner"), ("inter_staining", "inter-staining"),
          ("both", "both differ"))
MAX_HEATMAPS = 6
MEASURED = {"marker": "o", "s": 40, "color": "#1f6feb", "zorder": 3}
PUBLISHED = {"marker": "s", "s": 30, "facecolors": "none", "edgecolors": "#777777", "zorder": 2}


@dataclass(frozen=True)
class Plot:
    name: str  # file stem
    title: str
    png: bytes


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


def _annotate(ax, x: float, y: float, text: str, color: str = "#222222") -> None:
    ax.annotate(text, (x, y), xytext=(4, 3), textcoords="offset points", fontsize=7, color=color)


def _scatter(ax, points: list[tuple[float, float, str]], style: dict, name: str, text_color: str) -> None:
    if not points:
        return
    ax.scatter([p[0] for p in points], [p[1] for p in points], label=name, **style)
    for x, y, text in points:
        _annotate(ax, x, y, text, text_color)


def _board(report: Report, suite: str) -> SuiteBoard | None:
    return next((b for b in report.boards if b.suite == suite), None)


def _top10_mean(values: dict) -> float | None:
    tops = [values.get(k) for k in ("top10_inter_scanner_median", "top10_inter_staining_median", "top10_both_median")]
    return None if any(v is None for v in tops) else sum(tops) / 3


def cosine_vs_top10(report: Report) -> Figure | None:
    board = _board(report, ROBUSTNESS_SUITE)
    if board is None:
        return None
    def pts(rows):
        return [(r.values["cosine_all_median"], _top10_mean(r.values), label(r)) for r in rows
                if r.values.get("cosine_all_median") is not None and _top10_mean(r.values) is not None]
    return _measured_and_published(pts(board.rows), pts(board.published),
                                   "cosine similarity, median over all pairs",
                                   "top-10 accuracy, mean of the three group medians",
                                   "PLISM: representation stability vs retrieval")


def _measured_and_published(measured, published, xlabel: str, ylabel: str, title: str) -> Figure | None:
    """A scatter of measured points over the published ones (grey), or None with no measured point."""
    if not measured:
        return None
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    _scatter(ax, published, PUBLISHED, "published", "#777777")
    _scatter(ax, measured, MEASURED, "measured", "#111111")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def group_bars(report: Report) -> Figure | None:
    board = _board(report, ROBUSTNESS_SUITE)
    rows = [r for r in (board.rows if board else []) if any(f"top10_{g}_median" in r.metrics for g, _ in GROUPS)]
    if not rows:
        return None
    fig = Figure(figsize=(max(7, 1.6 * len(rows) + 3), 6.5))
    axes = fig.subplots(2, 1)
    width = 0.8 / len(GROUPS)
    x = np.arange(len(rows))
    for ax, metric, title in zip(axes, ("top10", "cosine"), ("top-10 accuracy", "cosine similarity")):
        for k, (group, group_label) in enumerate(GROUPS):
            med = [r.metrics.get(f"{metric}_{group}_median") for r in rows]
            iqr = [r.metrics.get(f"{metric}_{group}_iqr") for r in rows]
            ax.bar(x + (k - 1.5) * width, [m if m is not None else np.nan for m in med], width,
                   yerr=[(i / 2 if i is not None else 0.0) for i in iqr], capsize=2, label=group_label)
        ax.set_ylabel(f"{title}\n(median, bar = IQR)")
        ax.set_xticks(x, [label(r) for r in rows], rotation=20, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title("PLISM per pair group")
    axes[0].legend(fontsize=8, ncol=4)
    fig.tight_layout()
    return fig


def _read_pairs(run_dir: str):
    import pandas as pd

    path = Path(run_dir) / PAIR_METRICS_FILE if run_dir else None
    if path is None or not path.is_file():
        return None
    try:
        pairs = pd.read_csv(path)
    except (OSError, ValueError):
        return None
    needed = {"staining_a", "scanner_a", "staining_b", "scanner_b", "top_10_accuracy"}
    return pairs if needed <= set(pairs.columns) else None


def slide_grid(pairs, metric: str = "top_10_accuracy") -> tuple[list[str], list[str], np.ndarray]:
    """Mean ``metric`` over the pairs each slide is in, as a staining x scanner grid (NaN: no slide)."""
    import pandas as pd

    a = pairs[["staining_a", "scanner_a", metric]].set_axis(["staining", "scanner", "v"], axis=1)
    b = pairs[["staining_b", "scanner_b", metric]].set_axis(["staining", "scanner", "v"], axis=1)
    per_slide = pd.concat([a, b]).groupby(["staining", "scanner"])["v"].mean()
    stainings = sorted(per_slide.index.get_level_values(0).unique())
    scanners = sorted(per_slide.index.get_level_values(1).unique())
    grid = np.full((len(stainings), len(scanners)), np.nan)
    for (st, sc), v in per_slide.items():
        grid[stainings.index(st), scanners.index(sc)] = v
    return stainings, scanners, grid


def heatmaps(report: Report) -> Figure | None:
    board = _board(report, ROBUSTNESS_SUITE)
    panels = []
    for row in board.rows if board else []:
        pairs = _read_pairs(row.run_dir)
        if pairs is not None and len(pairs):
            panels.append((row, slide_grid(pairs)))
        if len(panels) == MAX_HEATMAPS:
            break
    if not panels:
        return None
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.2 * cols, 4.2 * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, cols)).ravel()
    for ax, (row, (stainings, scanners, grid)) in zip(axes, panels):
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(scanners)), scanners, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(stainings)), stainings, fontsize=7)
        ax.set_title(label(row), fontsize=8)
        ax.set_xlabel("scanner", fontsize=7)
        ax.set_ylabel("staining", fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("PLISM: mean top-10 accuracy of each slide's pairs (staining x scanner)")
    fig.tight_layout()
    return fig


def _per_suite(report: Report, x_of: Callable[[Row], float | None], xlabel: str, title: str,
               with_published: bool) -> Figure | None:
    panels = []
    for board in report.boards:
        measured = [(x_of(r), r.score, label(r)) for r in board.rows if x_of(r) and r.score is not None]
        published = [(x_of(r), r.score, label(r)) for r in board.published
                     if with_published and x_of(r) and r.score is not None]
        if measured:
            panels.append((board, measured, published))
    if not panels:
        return None
    fig = Figure(figsize=(5 * len(panels), 4.5))
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (board, measured, published) in zip(axes, panels):
        _scatter(ax, published, PUBLISHED, "published", "#777777")
        _scatter(ax, measured, MEASURED, "measured", "#111111")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(_tex_safe(board.score_label))
        ax.set_title(_tex_safe(board.title), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def score_vs_params(report: Report) -> Figure | None:
    return _per_suite(report, lambda r: r.params, "parameters", "Score vs model size", with_published=True)


def throughput_vs_score(report: Report) -> Figure | None:
    return _per_suite(report, lambda r: r.tiles_per_s, "tiles / s", "Score vs throughput", with_published=False)


def robustness_vs_accuracy(report: Report) -> Figure | None:
    def pts(rows):
        return [(r.accuracy, r.scores[ROBUSTNESS_SUITE], label(r)) for r in rows
                if r.accuracy is not None and r.scores.get(ROBUSTNESS_SUITE) is not None]
    return _measured_and_published(pts(report.overall), pts(report.published_overall),
                                   f"accuracy: mean of {' and '.join(s.upper() for s in ACCURACY_SUITES)} scores",
                                   "PLISM leaderboard (robustness)", "Robustness vs accuracy")


PLOTS: tuple[tuple[str, str, Callable[[Report], Figure | None]], ...] = (
    ("robustness_vs_accuracy", "Robustness vs accuracy", robustness_vs_accuracy),
    ("plism_cosine_vs_top10", "PLISM: cosine vs top-10", cosine_vs_top10),
    ("plism_groups", "PLISM per pair group", group_bars),
    ("plism_heatmaps", "PLISM staining x scanner", heatmaps),
    ("score_vs_params", "Score vs parameters", score_vs_params),
    ("throughput_vs_score", "Score vs throughput", throughput_vs_score),
)


def render_plots(report: Report) -> list[Plot]:
    """Every plot the report's data supports, as PNG bytes."""
    out = []
    for name, title, make in PLOTS:
        fig = make(report)
        if fig is not None:
            out.append(Plot(name, title, _png(fig)))
    return out


def plot_suites(name: str) -> list[str]:
    """Which suites a plot belongs to (for the page's suite filter)."""
    if name.startswith("plism"):
        return [ROBUSTNESS_SUITE]
    if name == "robustness_vs_accuracy":
        return [ROBUSTNESS_SUITE, *ACCURACY_SUITES]
    return []  # all suites

