"""Task ``classify``: a text (or a text pair) and a label per row; the label set is read from the data.

Columns: the text in ``--text-column`` (default: the first of ``text``, ``sentence``, ``sentence1``,
``review``, ``content``, ``question``); a pair with ``--text-column a,b`` (default: ``sentence1`` +
``sentence2`` when both exist); the label in ``--label-column`` (default ``label``). Labels are class
names or integer ids; their sorted set (from the training file) gives the class ids 0..C-1.

Encoded example: ``input_ids`` (T,), ``attention_mask`` (T,), [``token_type_ids`` (T,)], ``labels``: int.
Grouping length: the words of the text (the same proxy as :mod:`peftlab.bench.tasks`).
Metrics: ``accuracy`` and ``macro_f1`` (mean over classes in the references or predictions of the
per-class F1).
"""

from __future__ import annotations

import torch

from .collate import Collator, ExampleDataset, eval_batches
from .columns import check_known, label_set, label_value, pick_column, row_numbers, texts
from .errors import DataError
from .metrics import macro_f1

TEXT_COLUMNS = ("text", "sentence", "sentence1", "review", "content", "question")
LABEL_COLUMNS = ("label", "labels")


def text_columns(table, source: str, text_column: str | None) -> list[str]:
    """One text column, or two for pairs (``"a,b"`` or the sentence1/sentence2 default)."""
    if text_column and "," in text_column:
        names = [c.strip() for c in text_column.split(",")]
        if len(names) != 2 or not all(names):
            raise DataError(f"--text-column {text_column!r}: give one column, or two as 'first,second' for pairs")
        return [pick_column(table, source, n, (), "text", "--text-column") for n in names]
    if text_column is None and {"sentence1", "sentence2"} <= set(table.column_names):
        return ["sentence1", "sentence2"]
    return [pick_column(table, source, text_column, TEXT_COLUMNS, "text", "--text-column")]


def read_labels(table, source: str, column: str) -> list:
    rows = row_numbers(table)
    return [label_value(v, source, r, column) for v, r in zip(table[column], rows)]


def encode(
    table,
    tokenizer,
    source: str,
    text_column: str | None = None,
    label_column: str | None = None,
    labels: list | None = None,
    max_length: int = 128,
) -> tuple[ExampleDataset, list]:
    """Tokenize every row; ``labels`` (the training label set) given for an eval table, else read here.

    Returns the dataset and the label list (index = class id).
    """
    cols = text_columns(table, source, text_column)
    label_col = pick_column(table, source, label_column, LABEL_COLUMNS, "label", "--label-column")
    first = texts(table, cols[0], source)
    second = texts(table, cols[1], source) if len(cols) == 2 else None
    values = read_labels(table, source, label_col)
    rows = row_numbers(table)
    if labels is None:
        labels = label_set(values, source, label_col, rows)
        if len(labels) < 2:
            raise DataError(
                f"{source}: column {label_col!r} holds one label ({labels[0]!r}) in every row; "
                "classification needs at least two"
            )
    else:
        check_known(values, labels, source, label_col, rows)
    ids = {label: i for i, label in enumerate(labels)}
    enc = tokenizer(first, second, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    examples = [{**{k: enc[k][i] for k in keys}, "labels": ids[values[i]]} for i in range(len(first))]
    lengths = [len(t.split()) + (len(second[i].split()) if second else 0) for i, t in enumerate(first)]
    return ExampleDataset(examples, lengths, [{"label": values[i]} for i in range(len(first))]), labels


@torch.no_grad()
def predict(model, dataset: ExampleDataset, collator: Collator, batch_size: int = 64) -> list[int]:
    """The predicted class id of every example (dataset order)."""
    device = next(model.parameters()).device
    preds = [0] * len(dataset)
    for indices, batch in eval_batches(dataset, collator, batch_size):
        batch.pop("labels", None)
        out = model(**{k: v.to(device) for k, v in batch.items()}).logits.argmax(-1).tolist()
        for i, p in zip(indices, out):
            preds[i] = p
    return preds


def evaluate(model, dataset: ExampleDataset, collator: Collator, batch_size: int = 64) -> dict:
    """``{"accuracy", "macro_f1", "eval_rows"}`` of ``model`` on ``dataset``."""
    preds = predict(model, dataset, collator, batch_size)
    refs = [e["labels"] for e in dataset.examples]
    accuracy = sum(p == r for p, r in zip(preds, refs)) / len(refs)
    return {"accuracy": accuracy, "macro_f1": macro_f1(preds, refs), "eval_rows": len(refs)}


__all__ = ["TEXT_COLUMNS", "LABEL_COLUMNS", "encode", "evaluate", "predict", "macro_f1"]
