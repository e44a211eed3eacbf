"""User-facing errors.

Anything caused by bad input (a missing file, a wrong option, weights that do not fit)
raises :class:`UserError` with a one-line message naming the file or option and what is
wrong. The CLI prints that line and exits with status 2; no traceback unless ``--debug``.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: ``str(err)`` is shown to the user as-is, on one line."""

    exit_code = 2
