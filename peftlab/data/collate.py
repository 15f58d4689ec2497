"""Encoded examples, the padding collator, and length-grouped batches for peftlab's loop.

An example is a dict of token-level lists (``input_ids``: (T,), ``attention_mask``: (T,), optionally
``token_type_ids``: (T,)) and ``labels``: an int (sequence classification) or a list (T,) with ``-100``
on positions that carry no loss. :class:`Collator` turns a list of B examples into tensors
(B, T_max), right-padded; it is a ``transformers.Trainer`` ``data_collator`` as it is
(``Trainer(..., train_dataset=ds, data_collator=collator)``), and :func:`batches` feeds
:func:`peftlab.training.loop.train`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100


class ExampleDataset(torch.utils.data.Dataset):
    """A list of encoded examples (a map-style torch dataset), with a length per example for grouping
    and, optionally, per-example metadata the evaluation needs (references, words, prompts)."""

    def __init__(self, examples: list[dict], lengths: list[int] | None = None, meta: list[dict] | None = None):
        self.examples = examples
        self.lengths = lengths if lengths is not None else [len(e["input_ids"]) for e in examples]
        self.meta = meta

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


@dataclass
class Collator:
    """Pads a list of examples to the longest one: (B, T_max) tensors.

    ``input_ids`` pad with ``pad_token_id``; ``attention_mask``, ``token_type_ids`` and ``position_ids`` with
    0; list ``labels`` with -100; int ``labels`` become a (B,) tensor. Keys other than these are
    dropped, so Trainer's extra columns never reach the model. ``pad_to_multiple_of`` rounds T_max up.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    padding_side: str = "right"
    keys: tuple[str, ...] = field(
        default=("input_ids", "attention_mask", "token_type_ids", "position_ids", "labels")
    )

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
        pads = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX}
        out: dict[str, torch.Tensor] = {}
        for key in self.keys:
            if key not in features[0]:
                continue
            values = [f[key] for f in features]
            if key == "labels" and not isinstance(values[0], (list, tuple)):
                out[key] = torch.tensor(values)
                continue
            pad = pads.get(key, 0)
            rows = []
            for v in values:
                fill = [pad] * (width - len(v))
                rows.append(list(v) + fill if self.padding_side == "right" else fill + list(v))
            out[key] = torch.tensor(rows)
        return out


def batch_order(
    lengths: Sequence[int], batch_size: int, seed: int | None, group_by_length: bool = True
) -> list[list[int]]:
    """The example indices of each batch of one epoch.

    ``seed=None``: file order. Otherwise shuffled with ``random.Random(seed)``; with ``group_by_length``
    the shuffled indices are cut into mega-batches of 50 batches, each sorted by decreasing length, and the
    batches are shuffled again (transformers' ``group_by_length``; the same order as
    :mod:`peftlab.bench.tasks` gives the same rows, so the two train identically).
    """
    order = list(range(len(lengths)))
    if seed is not None:
        rng = random.Random(seed)
        rng.shuffle(order)
        if group_by_length:
            mega = 50 * batch_size
            order = [
                j for i in range(0, len(order), mega) for j in sorted(order[i : i + mega], key=lambda k: -lengths[k])
            ]
            groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
            rng.shuffle(groups)
            order = [j for g in groups for j in g]
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def batches(
    dataset: ExampleDataset,
    collate: Callable[[list[dict]], dict],
    batch_size: int,
    seed: int = 0,
    group_by_length: bool = True,
    skip: int = 0,
) -> Iterator[dict]:
    """Endless training batches for :func:`peftlab.training.loop.train`: epoch e is ordered by :func:`batch_order`
    with seed ``seed * 1000 + e``; the first ``skip`` batches (a resumed run's) are skipped unbuilt."""
    epoch, seen = 0, 0
    while True:
        for indices in batch_order(dataset.lengths, batch_size, seed * 1000 + epoch, group_by_length):
            if seen < skip:
                seen += 1
                continue
            yield collate([dataset[i] for i in indices])
        epoch += 1


def eval_batches(
    dataset: ExampleDataset, collate: Callable[[list[dict]], dict], batch_size: int
) -> Iterator[tuple[list[int], dict]]:
    """``(indices, batch)`` over ``dataset`` once, sorted by length (less padding); metrics map back by index."""
    order = sorted(range(len(dataset)), key=lambda i: dataset.lengths[i])
    for i in range(0, len(order), batch_size):
        chunk = order[i : i + batch_size]
        yield chunk, collate([dataset[j] for j in chunk])


__all__ = ["IGNORE_INDEX", "ExampleDataset", "Collator", "batch_order", "batches", "eval_batches"]
