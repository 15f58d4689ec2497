"""Reading user data files (CSV, TSV, JSONL, Parquet) through Hugging Face ``datasets``.

``read_table(path)`` returns a ``datasets.Dataset`` (N rows × the file's columns), read in file order.
``load_splits(data, eval_data=None, eval_split=None)`` returns ``(train, eval)``: the eval set is a
separate file, a seeded fraction held out of ``data``, or ``None``. Both carry a ``__row__`` column (the 0-based row in
its file) that error messages use.

* CSV (``.csv``): comma separated with a header row; quoted fields may hold commas and newlines.
* TSV (``.tsv``, ``.tab``): tab separated with a header row, no quoting (GLUE's convention: a ``"`` is a
  character of the text).
* JSONL (``.jsonl``, ``.json`` with one object per line, or a JSON list): nested values (a ``tokens``
  list, a chat ``messages`` list) stay lists.
* Parquet (``.parquet``).

Empty cells and strings such as ``NA`` or ``null`` stay text (no NaN conversion). ``datasets`` is imported
inside the functions, so ``import peftlab`` does not need it (``pip install datasets``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .errors import DataError

FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
}


def file_format(path: str | Path) -> str:
    """``csv`` | ``tsv`` | ``json`` | ``parquet`` from the file name (``.gz`` etc. ignored)."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    for suffix in reversed(suffixes):
        if suffix in FORMATS:
            return FORMATS[suffix]
    raise DataError(
        f"{path}: unknown data format {''.join(suffixes) or '(no extension)'!r}; "
        f"valid: {', '.join(sorted(FORMATS))} (optionally compressed, e.g. .csv.gz)"
    )


def _datasets():
    try:
        import datasets
    except ImportError as err:
        raise DataError("reading data files needs the datasets package: pip install datasets") from err
    return datasets


def _first_bad_json_line(path: Path) -> str | None:
    """``"line 3: Expecting ',' ..."`` for the first line of a JSONL file that is not a JSON object."""
    if path.suffix.lower() not in (".jsonl", ".ndjson", ".json"):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(1).strip()
            f.seek(0)
            if head == "[":  # one JSON document
                try:
                    json.load(f)
                except json.JSONDecodeError as exc:
                    return f"line {exc.lineno}: {exc.msg}"
                return None
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    return f"line {number}: {exc.msg} (column {exc.colno})"
                if not isinstance(value, dict):
                    return f"line {number}: a {type(value).__name__}, not a JSON object {{\"column\": value, ...}}"
    except (OSError, UnicodeDecodeError) as exc:
        return str(exc)
    return None


def _cause(exc: BaseException) -> str:
    """The innermost message of a (chained) datasets / pyarrow / pandas error, one line."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


def read_table(path: str | Path, keep_in_memory: bool = True):
    """The rows of one data file as a ``datasets.Dataset`` (file order kept).

    Raises:
        DataError: the file is missing, of an unknown format, unreadable or malformed (naming the line
            for JSONL), or holds no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} not found" + (" (it is a folder)" if path.is_dir() else ""))
    fmt = file_format(path)
    datasets = _datasets()
    builder, kwargs = fmt, {}
    if fmt in ("csv", "tsv"):
        builder = "csv"
        kwargs = {"keep_default_na": False}
        if fmt == "tsv":
            kwargs.update(sep="\t", quoting=csv.QUOTE_NONE)
    quiet = datasets.utils.logging.get_verbosity()
    bars = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(
            builder, data_files=str(path.resolve()), split="train", keep_in_memory=keep_in_memory, **kwargs
        )
    except Exception as exc:  # noqa: BLE001 - datasets wraps pandas / pyarrow errors in its own types
        line = _first_bad_json_line(path) if fmt == "json" else None
        detail = line or _cause(exc)
        if "corresponds to no data" in detail:  # datasets' words for a file without rows
            raise DataError(f"{path}: no rows (a header only, or an empty file)") from None
        raise DataError(f"{path}: cannot read it as {fmt.upper()}: {detail}") from None
    finally:
        datasets.utils.logging.set_verbosity(quiet)
        if bars:
            datasets.enable_progress_bars()
    if len(table) == 0:
        raise DataError(f"{path}: no rows (a header only, or an empty file)")
    return table


def load_splits(
    data: str | Path,
    eval_data: str | Path | None = None,
    eval_split: float | None = None,
    seed: int = 0,
):
    """``(train, eval)`` ``datasets.Dataset`` s: ``eval`` from ``eval_data``, or ``eval_split`` (a fraction in
    (0, 1)) of ``data`` held out with a seeded shuffle, or ``None`` when neither is given."""
    if eval_data is not None and eval_split is not None:
        raise DataError("give either an eval file (--eval-data) or an eval fraction (--eval-split), not both")
    train = numbered(read_table(data))
    if eval_data is not None:
        return train, numbered(read_table(eval_data))
    if eval_split is None:
        return train, None
    if not (isinstance(eval_split, (int, float)) and 0 < eval_split < 1):
        raise DataError(f"--eval-split must be a fraction between 0 and 1 (exclusive), got {eval_split!r}")
    n_eval = int(round(eval_split * len(train)))
    if n_eval < 1 or n_eval >= len(train):
        raise DataError(
            f"{data}: --eval-split {eval_split} of {len(train)} rows leaves {n_eval} eval and "
            f"{len(train) - n_eval} train rows; both need at least one"
        )
    parts = train.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def numbered(table):
    """``table`` with a ``__row__`` column (0-based file row), so errors name file rows after a shuffle."""
    from .columns import ROW

    return table if ROW in table.column_names else table.add_column(ROW, list(range(len(table))))


__all__ = ["FORMATS", "file_format", "read_table", "load_splits"]
