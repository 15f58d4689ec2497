"""Task ``tokens``: token classification (NER, POS...): a list of words and a list of tags per row.

Columns (JSONL or Parquet lists): the words in ``--text-column`` (default ``tokens`` or ``words``), the
tags in ``--label-column`` (default ``ner_tags``, ``tags`` or ``labels``), one tag per word. Tags are
names (IOB2 such as ``B-PER``) or integer ids; the tag set is read from the training file.

Encoded example: ``input_ids`` (T,), ``attention_mask`` (T,), ``labels`` (T,): each word's tag id on its
first sub-word, -100 on the other sub-words and the special tokens (needs a fast tokenizer).
Metrics: entity-level ``f1``, ``precision``, ``recall`` (seqeval's default rules, words cut off by
truncation count as predicted ``O``) and per-word ``token_accuracy``.
"""

from __future__ import annotations

import torch

from .collate import IGNORE_INDEX, Collator, ExampleDataset, eval_batches
from .columns import check_known, label_set, label_value, pick_column, row_numbers
from .errors import DataError, short, where
from .metrics import entity_f1

WORD_COLUMNS = ("tokens", "words")
TAG_COLUMNS = ("ner_tags", "tags", "labels", "label")


def _rows(table, source: str, word_col: str, tag_col: str) -> tuple[list[list[str]], list[list]]:
    words, tags = [], []
    for w, t, row in zip(table[word_col], table[tag_col], row_numbers(table)):
        if not isinstance(w, list) or not w or not all(isinstance(x, str) for x in w):
            raise DataError(
                f"{where(source, row, word_col)}: {short(w)}; each row needs a non-empty list of words "
                '(strings), e.g. ["EU", "rejects", "German", "call"]'
            )
        if not isinstance(t, list):
            raise DataError(
                f"{where(source, row, tag_col)}: {short(t)} is not a list; each row needs one tag per word, "
                'e.g. ["B-ORG", "O", "B-MISC", "O"]'
            )
        if len(t) != len(w):
            raise DataError(
                f"{where(source, row, tag_col)}: {len(t)} tags for {len(w)} words in column {word_col!r}; "
                "give exactly one tag per word"
            )
        tags.append([label_value(x, source, row, tag_col) for x in t])
        words.append(w)
    return words, tags


def encode(
    table,
    tokenizer,
    source: str,
    text_column: str | None = None,
    label_column: str | None = None,
    labels: list | None = None,
    max_length: int = 128,
) -> tuple[ExampleDataset, list]:
    """Tokenize every row's words and align the tags; returns the dataset and the tag list (index = id)."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("task 'tokens' needs a fast tokenizer (word ids of sub-words); this model's is not")
    word_col = pick_column(table, source, text_column, WORD_COLUMNS, "words", "--text-column")
    tag_col = pick_column(table, source, label_column, TAG_COLUMNS, "tags", "--label-column")
    words, tags = _rows(table, source, word_col, tag_col)
    flat = [t for row in tags for t in row]
    flat_rows = [r for r, row in zip(row_numbers(table), tags) for _ in row]
    if labels is None:
        labels = label_set(flat, source, tag_col, flat_rows)
    else:
        check_known(flat, labels, source, tag_col, flat_rows)
    ids = {label: i for i, label in enumerate(labels)}
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
    examples = []
    for b, row_tags in enumerate(tags):
        aligned, previous = [], None
        for word in enc.word_ids(b):
            aligned.append(ids[row_tags[word]] if word is not None and word != previous else IGNORE_INDEX)
            previous = word
        example = {k: enc[k][b] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        example["labels"] = aligned
        examples.append(example)
    meta = [{"tags": [str(t) for t in row]} for row in tags]
    return ExampleDataset(examples, [len(w) for w in words], meta), labels


@torch.no_grad()
def predict(model, dataset: ExampleDataset, collator: Collator, labels: list, batch_size: int = 64) -> list[list[str]]:
    """The predicted tag of every word of every example (dataset order); words cut by truncation are "O"."""
    device = next(model.parameters()).device
    preds: list[list[str]] = [[] for _ in range(len(dataset))]
    for indices, batch in eval_batches(dataset, collator, batch_size):
        gold = batch.pop("labels")
        out = model(**{k: v.to(device) for k, v in batch.items()}).logits.argmax(-1).cpu()
        for b, i in enumerate(indices):
            keep = gold[b] != IGNORE_INDEX
            predicted = [str(labels[t]) for t in out[b][keep].tolist()]
            n_words = len(dataset.meta[i]["tags"])
            preds[i] = predicted + ["O"] * (n_words - len(predicted))
    return preds


def evaluate(model, dataset: ExampleDataset, collator: Collator, labels: list, batch_size: int = 64) -> dict:
    """``{"f1", "precision", "recall", "token_accuracy", "eval_rows"}`` of ``model`` on ``dataset``."""
    preds = predict(model, dataset, collator, labels, batch_size)
    refs = [m["tags"] for m in dataset.meta]
    scores = entity_f1(preds, refs)
    words = sum(len(r) for r in refs)
    scores["token_accuracy"] = sum(p == r for pr, rr in zip(preds, refs) for p, r in zip(pr, rr)) / words
    scores["eval_rows"] = len(refs)
    return scores


__all__ = ["WORD_COLUMNS", "TAG_COLUMNS", "encode", "predict", "evaluate"]
