"""Task metrics: accuracy and seqeval-style entity-level F1 over IOB2 tags."""

from __future__ import annotations

from collections.abc import Sequence

from ..data.metrics import entities, entity_f1  # noqa: F401  (one copy: the data layer owns it)


def accuracy(predictions: Sequence, references: Sequence) -> float:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("accuracy of an empty set is undefined")
    return sum(p == r for p, r in zip(predictions, references)) / len(references)


