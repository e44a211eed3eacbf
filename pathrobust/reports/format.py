"""Cell formatting shared by the Markdown and HTML writers."""

from __future__ import annotations

from pathrobust.reports.tables import Row

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
