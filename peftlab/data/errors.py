"""The one error type of the data layer: malformed or unreadable user data."""

from __future__ import annotations

from ..util.errors import ConfigError


class DataError(ConfigError):
    """A data file is missing, unreadable or malformed.

    The message names the file, the row (1-based, header excluded) or column, the value found and
    what is valid, in one line, e.g. ``reviews.csv: row 17, column 'label': empty value; every row
    needs a label``.
    """


def where(source: str, row: int | None = None, column: str | None = None) -> str:
    """``"file: row 3, column 'label'"`` for an error message (``row`` is 0-based here)."""
    parts = [str(source)]
    detail = []
    if row is not None:
        detail.append(f"row {row + 1}")
    if column is not None:
        detail.append(f"column {column!r}")
    return parts[0] + (": " + ", ".join(detail) if detail else "")


def short(value, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
