"""Column lookup and value checks shared by the tasks; every failure is a one-line :class:`DataError`.

Rows are numbered from 1 in the file's order (header excluded): :func:`row_numbers` reads the
``__row__`` column that :func:`peftlab.data.readers.load_splits` adds before a held-out split shuffles them.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import DataError, short, where

ROW = "__row__"


def row_numbers(table) -> list[int]:
    """0-based file row of each row of ``table``."""
    return list(table[ROW]) if ROW in table.column_names else list(range(len(table)))


def user_columns(table) -> list[str]:
    return [c for c in table.column_names if c != ROW]


def pick_column(
    table, source: str, given: str | None, defaults: Sequence[str], role: str, option: str
) -> str:
    """``given`` if it is a column, else the first of ``defaults`` present; otherwise a DataError listing the
    columns found and the option that names one (``role``: what the column holds, e.g. "label")."""
    found = user_columns(table)
    if given is not None:
        if given not in found:
            raise DataError(
                f"{source}: no column {given!r} ({option}); columns found: {', '.join(found)}"
            )
        return given
    for name in defaults:
        if name in found:
            return name
    raise DataError(
        f"{source}: no {role} column: none of {', '.join(repr(d) for d in defaults)} found; columns found: "
        f"{', '.join(found)}; name it with {option}"
    )


def texts(table, column: str, source: str, allow_empty: bool = True) -> list[str]:
    """The column's values, each a string (numbers are not text: a DataError names the row)."""
    values = table[column]
    rows = row_numbers(table)
    for i, value in enumerate(values):
        if value is None or not isinstance(value, str):
            what = "empty value" if value is None else f"{short(value)} is a {type(value).__name__}, not text"
            raise DataError(f"{where(source, rows[i], column)}: {what}; every row needs a text here")
        if not allow_empty and not value.strip():
            raise DataError(f"{where(source, rows[i], column)}: empty text; every row needs a non-empty text here")
    return list(values)


def label_value(value, source: str, row: int, column: str):
    """A class label: a non-empty string, an int, or a bool; an integral float becomes an int."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    shown = "empty value" if value is None or (isinstance(value, str)) else f"{short(value)} ({type(value).__name__})"
    raise DataError(
        f"{where(source, row, column)}: {shown}; a label is a class name or an integer class id"
    )


def label_set(values: Sequence, source: str, column: str, rows: Sequence[int]) -> list:
    """The sorted label set of ``values``: all integers (sorted numerically) or all names (sorted)."""
    kinds = {type(v) for v in values}
    if len(kinds) > 1:
        first = type(values[0])
        i = next(i for i, v in enumerate(values) if type(v) is not first)
        raise DataError(
            f"{where(source, rows[i], column)}: {short(values[i])} mixes label types ({first.__name__} above, "
            f"{type(values[i]).__name__} here); use all class names or all integer ids"
        )
    labels = sorted(set(values))
    if "O" in labels:  # IOB tag sets: "O" first, as tools list them
        labels.remove("O")
        labels.insert(0, "O")
    return labels


def check_known(values: Sequence, labels: Sequence, source: str, column: str, rows: Sequence[int]) -> None:
    """Every value of an eval set is a label seen in training."""
    known = set(labels)
    for i, v in enumerate(values):
        if v not in known:
            shown = ", ".join(map(repr, labels[:20])) + (" ..." if len(labels) > 20 else "")
            raise DataError(
                f"{where(source, rows[i], column)}: label {short(v)} does not occur in the training data; "
                f"training labels: {shown}"
            )


__all__ = ["ROW", "row_numbers", "user_columns", "pick_column", "texts", "label_value", "label_set", "check_known"]
