"""``leaderboard.html``: one self-contained page (inline CSS, JS and PNG images, no network).

Every user-supplied string (model names, options, paths, sources) goes through
:func:`html.escape`; a Content-Security-Policy forbids loading anything from elsewhere.
"""

from __future__ import annotations

import base64
from html import escape

from pathrobust.reports import format as fmt
from pathrobust.reports.markdown import overall_header
from pathrobust.reports.plots import Plot
from pathrobust.reports.tables import Report, Row, SuiteBoard

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5rem; color: #1c1e21; }
header { display: flex; gap: 2rem; align-items: baseline; flex-wrap: wrap; }
h1 { font-size: 1.5rem; margin: 0 0 .5rem; } h2 { margin-top: 2rem; } h3 { color: #555; }
.note { color: #555; max-width: 70rem; }
.warning { background: #fff4d1; border: 1px solid #e8d28a; padding: .5rem .75rem; max-width: 70rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-variant-numeric: tabular-nums; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: .2rem .35rem; text-align: right; white-space: nowrap; }
th { white-space: normal; min-width: 3.2rem; max-width: 7rem; vertical-align: bottom; }
td.text, th.text { text-align: left; }
td.wrap { white-space: normal; min-width: 6rem; max-width: 14rem; overflow-wrap: anywhere; }
td.small { white-space: normal; max-width: 8rem; overflow-wrap: anywhere; font-size: 12px; color: #444; }
.scroll { overflow-x: auto; max-width: 100%; }
th { background: #f6f8fa; cursor: pointer; user-select: none; position: sticky; top: 0; }
th[aria-sort="ascending"]::after { content: " \\25B2"; } th[aria-sort="descending"]::after { content: " \\25BC"; }
tbody tr:nth-child(even) { background: #fafbfc; }
table.published { color: #555; }
.badge { display: inline-block; font-size: .75rem; padding: 0 .35rem; border-radius: .6rem; background: #fff4d1; color: #8a6d00; }
.badge.synthetic { background: #e7f0ff; color: #1f4f99; } .badge.variant { background: #f0e7ff; color: #5b2a99; }
figure { display: inline-block; margin: .5rem 1rem 1rem 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; } figcaption { color: #555; }
details { margin: .25rem 0 1rem; } summary { cursor: pointer; color: #555; }
.hidden { display: none !important; }
"""

SCRIPT = """
(function () {
  function cellKey(td) {
    var v = td.getAttribute('data-sort');
    if (v === null) v = td.textContent.trim();
    if (v === '' || v === '\\u2014') return null;
    var n = Number(v);
    return isNaN(n) ? v.toLowerCase() : n;
  }
  function sortTable(table, col, th) {
    var body = table.tBodies[0];
    var dir = th.getAttribute('aria-sort') === 'descending' ? 'ascending' : 'descending';
    if (th.getAttribute('aria-sort') === null && th.classList.contains('text')) dir = 'ascending';
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) { h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', dir);
    var rows = Array.prototype.slice.call(body.rows);
    var sign = dir === 'ascending' ? 1 : -1;
    rows.sort(function (a, b) {
      var x = cellKey(a.cells[col]), y = cellKey(b.cells[col]);
      if (x === null && y === null) return 0;
      if (x === null) return 1;            /* empty cells last either way */
      if (y === null) return -1;
      if (typeof x !== typeof y) { x = String(x); y = String(y); }
      return (x < y ? -1 : x > y ? 1 : 0) * sign;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  document.querySelectorAll('table.sortable').forEach(function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      th.addEventListener('click', function () { sortTable(table, col, th); });
    });
  });
  var filter = document.getElementById('suite-filter');
  filter.addEventListener('change', function () {
    var suite = filter.value;
    document.querySelectorAll('[data-suites]').forEach(function (el) {
      var suites = el.getAttribute('data-suites').split(' ').filter(Boolean);
      var show = suite === 'all' || suites.length === 0 || suites.indexOf(suite) >= 0;
      el.classList.toggle('hidden', !show);
    });
  });
})();
"""


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _td(text: str, sort: float | int | str | None = None, cls: str = "") -> str:
    attrs = f' class="{cls}"' if cls else ""
    if sort is not None:
        attrs += f' data-sort="{_e(sort)}"'
    return f"<td{attrs}>{_e(text)}</td>"


def _text(value: object) -> str:
    return _td(fmt.text(value), cls="text")


def _wrap(value: object) -> str:
    """A text cell that may wrap (long user strings: options, sources)."""
    return _td(fmt.text(value), cls="text wrap")


def _small(value: object) -> str:
    return _td(fmt.text(value), cls="text small")


def _model(r) -> str:
    """The model cell: the name (sort key and text), then badges for synthetic data / variants."""
    badges = ""
    if getattr(r, "variant", ""):
        badges += f' <span class="badge variant" title="protocol variant">variant: {_e(r.variant)}</span>'
    if getattr(r, "synthetic", False):
        badges += ' <span class="badge synthetic" title="measured on synthetic data">synthetic</span>'
    if getattr(r, "kind", "") == "published":
        badges += ' <span class="badge">published</span>'
    return f'<td class="text wrap" data-sort="{_e(r.model.lower())}">{_e(r.model)}{badges}</td>'


def _table(header: list[str], text_cols: set[int], rows: list[str], cls: str = "", table_id: str = "") -> str:
    ths = "".join(f'<th class="text" scope="col">{_e(h)}</th>' if i in text_cols else f'<th scope="col">{_e(h)}</th>'
                  for i, h in enumerate(header))
    ident = f' id="{_e(table_id)}"' if table_id else ""
    return (f'<div class="scroll"><table class="sortable {cls}"{ident}><thead><tr>{ths}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def _overall(report: Report) -> str:
    rows = []
    for r in report.overall:
        cells = [_td(fmt.text(r.rank), r.rank), _model(r), _text(r.pooling), _text(r.precision),
                 _td(fmt.text(r.input_size), r.input_size)]
        cells += [_td(fmt.num(r.scores.get(s)), r.scores.get(s)) for s in report.suites]
        if fmt.role_column(report, "accuracy"):
            cells.append(_td(fmt.num(r.accuracy), r.accuracy))
        if fmt.role_column(report, "robustness"):
            cells.append(_td(fmt.num(r.robustness), r.robustness))
        cells += [_td(fmt.num(r.mean_rank, 2), r.mean_rank), _td(fmt.params(r.params), r.params),
                  _td(fmt.rate(r.tiles_per_s), r.tiles_per_s)]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    body = (_table(overall_header(report), {1, 2, 3}, rows, table_id="overall-table") if rows
            else '<p class="note">No runs recorded.</p>')
    notes = "".join(" " + fmt.role_note(report, role) for role in ("accuracy", "robustness")
                    if fmt.role_column(report, role))
    return (f'<section id="overall" data-suites="{_e(" ".join(report.suites))}"><h2>Overall</h2>'
            '<p class="note">One row per (model, pooling, precision, input size), ranked by mean rank over the suites '
            f"it ran.{_e(notes)}</p>{body}</section>")


def _measured_row(board: SuiteBoard, r: Row) -> str:
    cells = [_td(fmt.text(r.rank), r.rank), _model(r), _text(r.pooling), _text(r.precision),
             _td(fmt.text(r.input_size), r.input_size), _td(fmt.num_std(r.score, r.stds.get("_score")), r.score)]
    cells += [_td(fmt.num_std(r.values.get(c.key), r.stds.get(c.key)), r.values.get(c.key)) for c in board.columns]
    if board.ci:
        cells.append(_td(fmt.ci(r), r.ci[0] if r.ci else None))
    cells += [_td(fmt.params(r.params), r.params), _td(fmt.rate(r.tiles_per_s), r.tiles_per_s),
              _small(r.protocol), _td(fmt.data(r), cls="text"), _small(r.run_id)]
    title = f' title="{_e(r.run_dir)}"' if r.run_dir else ""
    return f"<tr{title}>{''.join(cells)}</tr>"


def _published_row(board: SuiteBoard, r: Row) -> str:
    d = board.published_digits
    cells = [_td(fmt.text(r.rank), r.rank), _model(r), _text(r.pooling), _td(fmt.num(r.score, d), r.score)]
    cells += [_td(fmt.num(r.values.get(c.key), d), r.values.get(c.key)) for c in board.published_columns]
    cells += [_td(fmt.params(r.params), r.params), _wrap(r.source)]
    return f'<tr class="published">{"".join(cells)}</tr>'


def _artefacts(board: SuiteBoard) -> str:
    """Files the suite declares for each run (e.g. its own heatmaps), from the shown runs."""
    if board.spec is None or not board.spec.artefacts:
        return ""
    from pathlib import Path

    figures = []
    for r in board.rows:
        for artefact in board.spec.artefacts:
            path = Path(r.run_dir) / artefact.file if r.run_dir else None
            if path is None or not path.is_file() or path.suffix.lower() != ".png":
                continue
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            figures.append(f'<figure><img alt="{_e(artefact.title)}" src="data:image/png;base64,{data}">'
                           f"<figcaption>{_e(r.model)} ({_e(fmt.text(r.pooling))}): {_e(artefact.title)}"
                           "</figcaption></figure>")
    if not figures:
        return ""
    return f'<details><summary>Per-run figures ({len(figures)})</summary>{"".join(figures)}</details>'


def _board(board: SuiteBoard) -> str:
    parts = [f'<section id="suite-{_e(board.suite)}" data-suites="{_e(board.suite)}">',
             f"<h2>{_e(board.title)}</h2>",
             f'<p class="note">Ranked by {_e(board.score_label)}: {_e(board.rule)}.</p>']
    if board.rows:
        header = ["Rank", "Model", "Pooling", "Precision", "Input", board.score_label] + [c.label for c in board.columns]
        if board.ci:
            header.append("95% CI")
        header += ["Params", "Tiles/s", "Protocol options", "Data", "Run"]
        n = len(header)
        parts.append(_table(header, {1, 2, 3, n - 3, n - 2, n - 1}, [_measured_row(board, r) for r in board.rows],
                            cls="measured", table_id=f"table-{board.suite}"))
        parts.append(_artefacts(board))
    else:
        parts.append('<p class="note">No runs recorded for this suite.</p>')
    if board.published:
        note = (f"Published figures, not measured by pathrobust and not ranked with the rows above. "
                f"Source: {board.published_source}. Protocol: {board.published_protocol}."
                + (f" Published {board.score_label}: {board.published_score_note}." if board.published_score_note else ""))
        header = (["Published rank", "Model", "Pooling", board.score_label] + [c.label for c in board.published_columns]
                  + ["Params", "Source"])
        parts.append(f'<h3>Published — {_e(board.title)}</h3><p class="note">{_e(note)}</p>')
        parts.append(_table(header, {1, 2, len(header) - 1}, [_published_row(board, r) for r in board.published],
                            cls="published", table_id=f"published-{board.suite}"))
    parts.append("</section>")
    return "".join(parts)


def _plots(plots: list[Plot]) -> str:
    if not plots:
        return ""
    figs = []
    for p in plots:
        data = base64.b64encode(p.png).decode("ascii")
        figs.append(f'<figure class="plot" id="plot-{_e(p.name)}" data-suites="{_e(" ".join(p.suites))}">'
                    f'<img alt="{_e(p.title)}" src="data:image/png;base64,{data}"><figcaption>{_e(p.title)}</figcaption></figure>')
    return f'<section id="plots" data-suites=""><h2>Plots</h2>{"".join(figs)}</section>'


def render_html(report: Report, plots: list[Plot], generator: str = "pathrobust") -> str:
    options = "".join(f'<option value="{_e(s)}">{_e(report.titles[s])}</option>' for s in report.suites)
    warning = f'<p class="warning">{_e(fmt.SYNTHETIC_NOTE)}</p>' if report.synthetic else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>pathrobust leaderboard</title><style>{CSS}</style></head><body>"
        '<header><h1>pathrobust leaderboard</h1><label>Suite: <select id="suite-filter">'
        f'<option value="all">All suites</option>{options}</select></label></header>'
        '<p class="note">Measured rows come from the results database; rows differing in pooling, precision, '
        "input size, protocol options or data are distinct. Rows marked <span class=\"badge\">published</span> are "
        "figures reported by others, in their own tables. Click a column header to sort.</p>"
        + warning + _overall(report) + "".join(_board(b) for b in report.boards) + _plots(plots)
        + f'<footer class="note">Generated by {_e(generator)}.</footer>'
        f"<script>{SCRIPT}</script></body></html>\n"
    )
