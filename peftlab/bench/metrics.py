"""Task metrics: accuracy and seqeval-style entity-level F1 over IOB2 tags."""

from __future__ import annotations

from collections.abc import Sequence


def accuracy(predictions: Sequence, references: Sequence) -> float:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("accuracy of an empty set is undefined")
    return sum(p == r for p, r in zip(predictions, references)) / len(references)


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """Entity spans ``(type, start, end_exclusive)`` of one IOB2 sequence.

    Follows seqeval's default (conlleval) rules: an ``I-X`` that does not continue an ``X``
    chunk starts a new one; ``O`` and any ``B-`` end the current chunk.
    """
    spans: set[tuple[str, int, int]] = set()
    kind, start = None, 0
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, label = tag.partition("-")
        ends = prefix in ("O", "B") or (prefix == "I" and label != kind)
        if kind is not None and ends:
            spans.add((kind, start, i))
            kind = None
        if prefix == "B" or (prefix == "I" and kind is None):
            kind, start = label, i
    return spans


def entity_f1(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro precision, recall and F1 over entity spans of a corpus (as seqeval's classification report)."""
    tp = n_pred = n_ref = 0
    for pred, ref in zip(predictions, references):
        if len(pred) != len(ref):
            raise ValueError(f"a prediction of length {len(pred)} for a reference of length {len(ref)}")
        p, r = entities(pred), entities(ref)
        tp += len(p & r)
        n_pred += len(p)
        n_ref += len(r)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_ref if n_ref else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}
