"""``leaderboard.csv`` (one line per row of every table) and ``leaderboard.json`` (the whole report)."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from typing import Any

from pathrobust.reports.tables import OverallRow, Report, Row

ROW_FIELDS = ["table", "kind", "rank", "model", "synthetic", "variant", "pooling", "precision", "input_size", "params",
              "score"]
TAIL_FIELDS = ["ci_low", "ci_high", "tiles_per_s", "wall_s", "options", "data_fingerprint", "spec_hash",
               "weights_sha256", "run_id", "run_dir", "created_at", "source"]


def _row_dict(table: str, r: Row) -> dict[str, Any]:
    out: dict[str, Any] = {"table": table, "kind": r.kind, "rank": r.rank, "model": r.model,
                           "synthetic": r.synthetic, "variant": r.variant, "pooling": r.pooling,
                           "precision": r.precision, "input_size": r.input_size, "params": r.params, "score": r.score}
    for key, value in r.values.items():
        out[f"{table}:{key}"] = value
    for key, value in r.stds.items():
        out[f"{table}:{'score' if key == '_score' else key}_std"] = value
    out.update({"ci_low": r.ci[0] if r.ci else None, "ci_high": r.ci[1] if r.ci else None,
                "tiles_per_s": r.tiles_per_s, "wall_s": r.wall_s,
                "options": json.dumps(r.options, sort_keys=True) if r.options else "",
                "data_fingerprint": r.data_fingerprint, "spec_hash": r.spec_hash, "weights_sha256": r.weights_sha256,
                "run_id": r.run_id, "run_dir": r.run_dir, "created_at": r.created_at, "source": r.source})
    return out


def _overall_dict(table: str, r: OverallRow) -> dict[str, Any]:
    out: dict[str, Any] = {"table": table, "kind": r.kind, "rank": r.rank, "model": r.model,
                           "synthetic": r.synthetic, "variant": "", "pooling": r.pooling,
                           "precision": r.precision, "input_size": r.input_size, "params": r.params,
                           "score": None}
    out.update({f"overall:{s}": v for s, v in r.scores.items()})
    out.update({"overall:accuracy": r.accuracy, "overall:robustness": r.robustness, "overall:mean_rank": r.mean_rank,
                "tiles_per_s": r.tiles_per_s})
    return out


def report_rows(report: Report) -> list[dict[str, Any]]:
    """Every table row as a flat dict; ``table`` says which table (``overall`` or a suite name)."""
    rows = [_overall_dict("overall", r) for r in report.overall]
    rows += [_overall_dict("overall", r) for r in report.published_overall]
    for board in report.boards:
        rows += [_row_dict(board.suite, r) for r in board.rows]
        rows += [_row_dict(board.suite, r) for r in board.published]
    return rows


def render_csv(report: Report) -> str:
    rows = report_rows(report)
    middle: list[str] = []
    for row in rows:
        middle += [k for k in row if k not in ROW_FIELDS and k not in TAIL_FIELDS and k not in middle]
    fields = ROW_FIELDS + middle + TAIL_FIELDS
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else csv_safe(v)) for k, v in row.items()})
    return buf.getvalue()


def csv_safe(value: Any) -> Any:
    """A cell a spreadsheet shows as text: user strings starting with = + - @ (or a tab/CR)
    would run as formulas (``=HYPERLINK(...)``), so they get a leading apostrophe. Numbers
    pass as they are."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def render_json(report: Report, extra: dict[str, Any] | None = None) -> str:
    from pathrobust.reports.format import SYNTHETIC_NOTE

    data = {**(extra or {}), **asdict(report)}
    for board in data["boards"]:
        board.pop("spec", None)  # the suite's declaration, not a result
    if report.synthetic:
        data["synthetic_note"] = SYNTHETIC_NOTE
    return json.dumps(data, indent=2, sort_keys=False, default=str, allow_nan=False) + "\n"
