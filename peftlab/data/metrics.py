"""Metrics of the user-data tasks: macro-F1 over classes and entity-level F1 over IOB2 tags.

``entities`` / ``entity_f1`` follow seqeval's default (conlleval) rules, as :mod:`peftlab.bench.metrics`
does; they live here so the data layer imports nothing above itself (the bench can import these).
"""

from __future__ import annotations

from collections.abc import Sequence


def macro_f1(predictions: Sequence, references: Sequence) -> float:
    """Mean per-class F1 over the classes present in ``references`` or ``predictions``."""
    scores = []
    for c in sorted(set(references) | set(predictions)):
        tp = sum(p == c and r == c for p, r in zip(predictions, references))
        fp = sum(p == c and r != c for p, r in zip(predictions, references))
        fn = sum(p != c and r == c for p, r in zip(predictions, references))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores)


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """Entity spans ``(type, start, end_exclusive)`` of one IOB2 sequence: an ``I-X`` that does not continue
    an ``X`` chunk starts a new one; ``O`` and any ``B-`` end the current chunk."""
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
    """Micro precision, recall and F1 over the entity spans of a corpus."""
    tp = n_pred = n_ref = 0
    for pred, ref in zip(predictions, references):
        p, r = entities(pred), entities(ref)
        tp += len(p & r)
        n_pred += len(p)
        n_ref += len(r)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_ref if n_ref else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


__all__ = ["macro_f1", "entities", "entity_f1"]
