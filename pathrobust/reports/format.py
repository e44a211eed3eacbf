"""Cell formatting shared by the Markdown and HTML writers."""

from __future__ import annotations

from pathrobust.reports.tables import Report, Row

DASH = "—"
DIGITS = 4  # measured scores; published rows keep their source's precision


def num(value: float | None, digits: int = DIGITS) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def num_std(value: float | None, std: float | None, digits: int = DIGITS) -> str:
    if value is None:
        return DASH
    return num(value, digits) + ("" if std is None else f" ± {std:.{min(digits, 3)}f}")


def params(n: int | None) -> str:
    if not n:
        return DASH
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def rate(value: float | None) -> str:
    return DASH if value is None else (f"{value:.0f}" if value >= 100 else f"{value:.1f}")


def text(value: object) -> str:
    return DASH if value in (None, "") else str(value)


def ci(row: Row, digits: int = DIGITS) -> str:
    if not row.ci:
        return DASH
    return f"[{num(row.ci[0], digits)}, {num(row.ci[1], digits)}]"


def short(value: str, n: int = 8) -> str:
    return value[:n] if value else DASH


SYNTHETIC_NOTE = ("Rows marked synthetic were measured on pathrobust's synthetic data (real H&E pixels, "
                  "simulated stainings, scanners and labels): they rank models on that data only and are not "
                  "comparable with published results on the real benchmarks.")


def data(row: Row) -> str:
    """The Data cell: the fingerprint's first 8 hex digits, marked when synthetic."""
    fp = short(row.data_fingerprint)
    return f"synthetic {fp}" if row.synthetic else fp


def role_column(report: Report, role: str) -> bool:
    """Accuracy needs one accuracy suite; a robustness column only adds something with two or more
    robustness suites (with one it repeats that suite's column)."""
    return len(report.role_suites(role)) >= (1 if role == "accuracy" else 2)


def role_note(report: Report, role: str) -> str:
    names = [report.role_name(s, role) for s in report.role_suites(role)]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    have = "both" if len(names) == 2 else "all of them"
    return (f"{role.capitalize()} = mean of the {listed} scores (shown only for rows that have {have})."
            if len(names) > 1 else f"{role.capitalize()} = the {listed} score.")
