"""peftlab.data readers: every format round-trips; malformed files raise one DataError naming what is wrong."""

from __future__ import annotations

import csv
import json

import pytest

pytest.importorskip("datasets")

import peftlab  # noqa: E402
from peftlab.data import DataError, load_splits, read_table  # noqa: E402
from peftlab.data.columns import ROW  # noqa: E402

ROWS = [
    {"text": 'a "quoted", comma text', "label": 1},
    {"text": "NA", "label": 0},  # stays text, never NaN
    {"text": "null", "label": 1},
    {"text": "ünïcødé — dash", "label": 0},
]


def write(path, rows, fmt):
    if fmt == "csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif fmt == "tsv":
        with open(path, "w") as f:
            f.write("\t".join(rows[0]) + "\n")
            for r in rows:
                f.write("\t".join(str(v) for v in r.values()) + "\n")
    elif fmt == "jsonl":
        with open(path, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_each_format_round_trips(tmp_path, fmt):
    path = write(tmp_path / f"rows.{fmt}", ROWS, fmt)
    table = read_table(path)
    assert table.column_names == ["text", "label"]
    assert [dict(r) for r in table] == ROWS


def test_jsonl_keeps_nested_lists(tmp_path):
    rows = [{"tokens": ["EU", "rejects"], "ner_tags": ["B-ORG", "O"]}, {"tokens": ["x"], "ner_tags": ["O"]}]
    table = read_table(write(tmp_path / "t.jsonl", rows, "jsonl"))
    assert [dict(r) for r in table] == rows


def test_tsv_quotes_are_text(tmp_path):
    """GLUE's TSV convention: a leading quote is a character, not a quoted field."""
    path = tmp_path / "q.tsv"
    path.write_text('sentence\tlabel\n"odd quote start\t1\nplain\t0\n')
    assert read_table(path)["sentence"] == ['"odd quote start', "plain"]


def test_eval_split_is_seeded_and_disjoint(tmp_path):
    rows = [{"text": f"row {i}", "label": i % 2} for i in range(50)]
    path = write(tmp_path / "d.csv", rows, "csv")
    train, evalset = load_splits(path, eval_split=0.2, seed=3)
    assert (len(train), len(evalset)) == (40, 10)
    assert set(train[ROW]).isdisjoint(evalset[ROW]) and set(train[ROW]) | set(evalset[ROW]) == set(range(50))
    again = load_splits(path, eval_split=0.2, seed=3)[1]
    other = load_splits(path, eval_split=0.2, seed=4)[1]
    assert again[ROW] == evalset[ROW] and other[ROW] != evalset[ROW]
    for r in evalset:  # the numbering points at the file's rows
        assert r["text"] == f"row {r[ROW]}"


def test_separate_eval_file(tmp_path):
    train = write(tmp_path / "a.csv", ROWS, "csv")
    other = write(tmp_path / "b.jsonl", ROWS[:2], "jsonl")
    t, e = load_splits(train, eval_data=other)
    assert (len(t), len(e)) == (4, 2)


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": \n', ["bad.jsonl", "line 2"]),
        ("list.jsonl", '{"text": "a", "label": 1}\n[1, 2]\n', ["line 2", "JSON object"]),
        ("ragged.csv", "text,label\na,1\nb,0,extra,more\n", ["ragged.csv", "CSV"]),
        ("empty.csv", "text,label\n", ["no rows"]),
        ("data.xlsx", "x", ["unknown data format", ".csv"]),
    ],
)
def test_unreadable_files_raise_one_line(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as err:
        read_table(path)
    message = str(err.value)
    assert "\n" not in message
    for part in expected:
        assert part in message
    assert isinstance(err.value, peftlab.ConfigError)


def test_missing_file_and_bad_split(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_table(tmp_path / "nope.csv")
    path = write(tmp_path / "d.csv", ROWS, "csv")
    with pytest.raises(DataError, match="between 0 and 1"):
        load_splits(path, eval_split=1.5)
    with pytest.raises(DataError, match="not both"):
        load_splits(path, eval_data=path, eval_split=0.5)
