"""``leaderboard.md``: the overall table, one leaderboard per suite, published rows apart."""

from __future__ import annotations

from pathrobust.reports import format as fmt
from pathrobust.reports.tables import OverallRow, Report, Row, SuiteBoard


def md_escape(value: object) -> str:
    """Text for a Markdown table cell: no raw HTML (renderers pass it through), no cell breaks."""
    s = str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    s = s.replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`")
    return " ".join(s.split())


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return lines


def model_cell(r: Row | OverallRow) -> str:
    """The model name, marked when measured on synthetic data or with a protocol variant."""
    text = md_escape(r.model)
    if getattr(r, "variant", ""):
        text += f" [variant: {md_escape(r.variant)}]"
    if r.synthetic:
        text += " *(synthetic data)*"
    return text


def overall_cells(r: OverallRow, report: Report) -> list[str]:
    cells = ([fmt.text(r.rank), model_cell(r), md_escape(fmt.text(r.pooling)), md_escape(fmt.text(r.precision)),
              fmt.text(r.input_size)] + [fmt.num(r.scores.get(s)) for s in report.suites])
    if fmt.role_column(report, "accuracy"):
        cells.append(fmt.num(r.accuracy))
    if fmt.role_column(report, "robustness"):
        cells.append(fmt.num(r.robustness))
    return cells + [fmt.num(r.mean_rank, 2), fmt.params(r.params), fmt.rate(r.tiles_per_s)]


def overall_header(report: Report) -> list[str]:
    header = ["Rank", "Model", "Pooling", "Precision", "Input"] + [report.titles[s] for s in report.suites]
    for role in ("accuracy", "robustness"):
        if fmt.role_column(report, role):
            header.append(f"{role.capitalize()} ({', '.join(report.role_name(s, role) for s in report.role_suites(role))})")
    return header + ["Mean rank", "Params", "Tiles/s"]


def _measured_cells(board: SuiteBoard, r: Row) -> list[str]:
    cells = [fmt.text(r.rank), model_cell(r), md_escape(fmt.text(r.pooling)), md_escape(fmt.text(r.precision)),
             fmt.text(r.input_size), fmt.num_std(r.score, r.stds.get("_score"))]
    cells += [fmt.num_std(r.values.get(c.key), r.stds.get(c.key)) for c in board.columns]
    if board.ci:
        cells.append(fmt.ci(r))
    cells += [fmt.params(r.params), fmt.rate(r.tiles_per_s), md_escape(fmt.text(r.protocol)),
              md_escape(fmt.data(r)), md_escape(fmt.text(r.run_id))]
    return cells


def _measured_header(board: SuiteBoard) -> list[str]:
    header = ["Rank", "Model", "Pooling", "Precision", "Input", board.score_label] + [c.label for c in board.columns]
    if board.ci:
        header.append("95% CI")
    return header + ["Params", "Tiles/s", "Protocol options", "Data", "Run"]


def _published_cells(board: SuiteBoard, r: Row) -> list[str]:
    d = board.published_digits
    return ([fmt.text(r.rank), md_escape(r.model), md_escape(fmt.text(r.pooling)), fmt.num(r.score, d)]
            + [fmt.num(r.values.get(c.key), d) for c in board.published_columns]
            + [fmt.params(r.params), md_escape(r.source)])


def _board(board: SuiteBoard) -> list[str]:
    lines = [f"## {md_escape(board.title)}", "", f"Ranked by {md_escape(board.score_label)}: {md_escape(board.rule)}.", ""]
    if board.rows:
        lines += _table(_measured_header(board), [_measured_cells(board, r) for r in board.rows])
    else:
        lines.append("No runs recorded for this suite.")
    if board.published:
        lines += ["", f"### Published — {md_escape(board.title)}", "",
                  f"Published figures, not measured by pathrobust and not ranked with the rows above. "
                  f"Source: {md_escape(board.published_source)}. Protocol: {md_escape(board.published_protocol)}."
                  + (f" Published {md_escape(board.score_label)}: {md_escape(board.published_score_note)}."
                     if board.published_score_note else ""), ""]
        header = (["Published rank", "Model", "Pooling", board.score_label] + [c.label for c in board.published_columns]
                  + ["Params", "Source"])
        lines += _table(header, [_published_cells(board, r) for r in board.published])
    return lines + [""]


def render_markdown(report: Report) -> str:
    lines = ["# pathrobust leaderboard", "",
             "Measured rows come from the results database; rows differing in pooling, precision, input size, "
             "protocol options or data are distinct. Published rows are marked as such and kept in their own tables.",
             ""]
    if report.synthetic:
        lines += [f"**{fmt.SYNTHETIC_NOTE}**", ""]
    lines += ["## Overall", "", "One row per (model, pooling, precision, input size); ranked by mean rank over the "
              "suites it ran." + "".join(" " + fmt.role_note(report, role) for role in ("accuracy", "robustness")
                                         if fmt.role_column(report, role)), ""]
    if report.overall:
        lines += _table(overall_header(report), [overall_cells(r, report) for r in report.overall])
    else:
        lines.append("No runs recorded.")
    lines.append("")
    for board in report.boards:
        lines += _board(board)
    return "\n".join(lines).rstrip() + "\n"
