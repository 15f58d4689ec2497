"""Task ``lm``: causal language modelling on raw text (continued pre-training, domain adaptation).

Column: ``--text-column`` (default ``text``, else ``content``). Each row is tokenized and ended with EOS;
a row longer than ``max_length`` is cut into several examples, so no text is lost. ``packing=True``
concatenates all rows and cuts blocks of ``max_length`` tokens instead (transformers' ``group_texts``).

Encoded example: ``input_ids`` (T,), ``attention_mask`` (T,), ``labels`` (T,) = ``input_ids`` (the model
shifts them). Metrics: ``loss`` (token-weighted mean next-token cross-entropy) and ``perplexity``.
"""

from __future__ import annotations

import math

from .collate import Collator, ExampleDataset
from .columns import pick_column, texts
from .sft import pack, response_loss

TEXT_COLUMNS = ("text", "content")


def encode(
    table, tokenizer, source: str, text_column: str | None = None, max_length: int = 512, packing: bool = False
) -> ExampleDataset:
    """Tokenize every row (+ EOS); chunks of at most ``max_length`` tokens, or packed blocks."""
    column = pick_column(table, source, text_column, TEXT_COLUMNS, "text", "--text-column")
    rows = texts(table, column, source, allow_empty=False)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = [x + eos for x in tokenizer(rows, add_special_tokens=True)["input_ids"]]
    if packing:
        return pack([(x, x) for x in ids], max_length)
    examples = []
    for x in ids:
        for i in range(0, len(x), max_length):
            chunk = x[i : i + max_length]
            if len(chunk) > 1:  # a single token has no next-token target
                examples.append({"input_ids": chunk, "attention_mask": [1] * len(chunk), "labels": list(chunk)})
    return ExampleDataset(examples)


def evaluate(model, dataset: ExampleDataset, collator: Collator, batch_size: int = 8) -> dict:
    """``{"loss", "perplexity", "tokens", "eval_rows"}`` of ``model`` on ``dataset``."""
    was_training = model.training
    model.eval()
    try:
        loss, count = response_loss(model, dataset, collator, batch_size)
    finally:
        model.train(was_training)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count, "eval_rows": len(dataset)}


__all__ = ["TEXT_COLUMNS", "encode", "evaluate"]
