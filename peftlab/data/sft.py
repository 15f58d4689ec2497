r"""Task ``sft``: supervised fine-tuning of a causal LM with the loss on the response tokens only.

Rows are either

* ``prompt`` and ``response`` columns (``completion`` is accepted for ``response``): the example is
  ``[BOS] prompt ␣response EOS`` (a space is put between the two when neither side has one; with
  ``chat_template=True`` the pair is rendered as a user and an assistant turn instead), or
* a ``messages`` column: a list of ``{"role": "system"|"user"|"assistant"|"tool", "content": str}``
  rendered with the tokenizer's chat template; every assistant turn (with its end-of-turn tokens)
  carries loss, the rest does not.

Encoded example: ``input_ids`` (T,), ``attention_mask`` (T,), ``labels`` (T,) = ``input_ids`` on response
tokens and -100 on prompt tokens (the model shifts labels by one, so token t+1 is predicted from ≤ t).
The loss is therefore

    L = (1 / |R|) Σ_{t ∈ R} −log p(x_t | x_{<t}),   R = the response positions of the batch.

Prompts longer than ``max_length`` lose their beginning (the response and the end of the prompt stay).
``packing=True`` concatenates training examples and cuts blocks of ``max_length`` tokens (fewer pad
tokens; examples in a block attend to each other, as in transformers' ``group_texts``).

Metrics: ``response_loss`` (token-weighted mean over the eval set), ``perplexity`` = exp(response_loss),
and, when every reference response is at most ``EXACT_MATCH_MAX_TOKENS`` tokens, ``exact_match``: the
share of rows whose greedy generation (stopped at EOS) equals the reference, whitespace-normalised.
"""

from __future__ import annotations

import math

import torch

from .collate import IGNORE_INDEX, Collator, ExampleDataset, eval_batches
from .columns import pick_column, row_numbers, texts, user_columns
from .errors import DataError, short, where

EXACT_MATCH_MAX_TOKENS = 8
ROLES = ("system", "user", "assistant", "tool")


def _bos(tokenizer) -> list[int]:
    """[BOS] when the tokenizer adds one to plain text, else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a")["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def _eos(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError("task 'sft' needs a tokenizer with an EOS token (the response ends with it)")
    return tokenizer.eos_token_id


def join_prompt(prompt_ids: list[int], response_ids: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of prompt + response, the prompt cut from the left to fit ``max_length``."""
    response_ids = response_ids[: max_length - 1]
    prompt_ids = prompt_ids[-(max_length - len(response_ids)) :] if prompt_ids else []
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


def _check_messages(value, source: str, row: int, column: str) -> list[dict]:
    shape = 'a list of {"role": "user"|"assistant"|"system"|"tool", "content": "..."}'
    if not isinstance(value, list) or not value:
        raise DataError(f"{where(source, row, column)}: {short(value)}; each row needs {shape}")
    for turn in value:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise DataError(f"{where(source, row, column)}: turn {short(turn)}; each turn is one of {shape}")
    if not any(t["role"] == "assistant" for t in value):
        raise DataError(f"{where(source, row, column)}: no assistant turn, so nothing to learn; roles valid: {', '.join(ROLES)}")
    return [{"role": t["role"], "content": t["content"]} for t in value]


def render_chat(tokenizer, messages: list[dict], source: str, row: int) -> tuple[list[int], list[int], dict]:
    """``(input_ids, labels, meta)`` of one conversation; labels on assistant turns only.

    The spans are found by rendering growing prefixes of the conversation: the assistant turn i spans from
    the end of ``render(messages[:i], add_generation_prompt=True)`` to the end of ``render(messages[:i+1])``.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; give prompt/response columns instead of messages")
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("chat messages need a fast tokenizer (character offsets of tokens)")

    def render(part, generation=False) -> str:
        return tokenizer.apply_chat_template(part, tokenize=False, add_generation_prompt=generation)

    full = render(messages)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        start, end = render(messages[:i], True) if i else "", render(messages[: i + 1])
        if not (full.startswith(end) and end.startswith(start)):
            raise DataError(
                f"{where(source, row, 'messages')}: this tokenizer's chat template does not render the conversation "
                "prefix by prefix, so assistant turns can't be located; use prompt/response columns"
            )
        spans.append((len(start), len(end)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [
        tok if any(s <= off[0] < e for s, e in spans) and off[1] > off[0] else IGNORE_INDEX
        for tok, off in zip(ids, enc["offset_mapping"])
    ]
    meta = {}
    if messages[-1]["role"] == "assistant":
        prompt = tokenizer(render(messages[:-1], True), add_special_tokens=False)["input_ids"]
        meta = {"prompt_ids": prompt, "reference": messages[-1]["content"]}
    return ids, labels, meta


def encode(
    table,
    tokenizer,
    source: str,
    max_length: int = 512,
    chat_template: bool = False,
    packing: bool = False,
) -> ExampleDataset:
    """Encode ``prompt``/``response`` rows or ``messages`` rows (module docstring)."""
    columns = user_columns(table)
    rows = row_numbers(table)
    encoded = []  # (input_ids, labels, meta)
    if "messages" in columns and "prompt" not in columns:
        for value, row in zip(table["messages"], rows):
            ids, labels, meta = render_chat(tokenizer, _check_messages(value, source, row, "messages"), source, row)
            encoded.append((ids[:max_length], labels[:max_length], meta))
    else:
        if "prompt" not in columns:
            raise DataError(
                f"{source}: task 'sft' needs 'prompt' and 'response' columns or a 'messages' column; columns "
                f"found: {', '.join(columns)}"
            )
        response_col = pick_column(table, source, None, ("response", "completion"), "response", "a 'response' column")
        prompts = texts(table, "prompt", source)
        responses = texts(table, response_col, source, allow_empty=False)
        bos, eos = _bos(tokenizer), _eos(tokenizer)
        for prompt, response, row in zip(prompts, responses, rows):
            if chat_template:
                chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
                ids, labels, meta = render_chat(tokenizer, chat, source, row)
                encoded.append((ids[:max_length], labels[:max_length], meta))
                continue
            if prompt and not prompt[-1].isspace() and not response[0].isspace():
                response = " " + response
            p_ids = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
            r_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [eos]
            ids, labels = join_prompt(p_ids, r_ids, max_length)
            encoded.append((ids, labels, {"prompt_ids": p_ids[-(max_length - 1) :], "reference": response.strip()}))
    for (_, labels, _), row in zip(encoded, rows):
        if all(x == IGNORE_INDEX for x in labels):
            raise DataError(
                f"{where(source, row)}: no response token within max_length={max_length} tokens; raise --max-length"
            )
    if packing:
        return pack([(ids, labels) for ids, labels, _ in encoded], max_length)
    examples = [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels} for ids, labels, _ in encoded]
    return ExampleDataset(examples, meta=[m for _, _, m in encoded])


def pack(pairs: list[tuple[list[int], list[int]]], block: int) -> ExampleDataset:
    """Concatenate ``(input_ids, labels)`` pairs and cut blocks of ``block`` tokens (the last may be shorter)."""
    ids = [t for p, _ in pairs for t in p]
    labels = [t for _, lab in pairs for t in lab]
    examples = []
    for i in range(0, len(ids), block):
        chunk = ids[i : i + block]
        examples.append({"input_ids": chunk, "attention_mask": [1] * len(chunk), "labels": labels[i : i + block]})
    return ExampleDataset(examples)


@torch.no_grad()
def response_loss(model, dataset: ExampleDataset, collator: Collator, batch_size: int = 8) -> tuple[float, int]:
    """(token-weighted mean cross-entropy over label tokens, number of label tokens) on ``dataset``."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for _, batch in eval_batches(dataset, collator, batch_size):
        labels = batch.pop("labels").to(device)
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits[:, :-1].float()
        target = labels[:, 1:]
        total += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="sum"))
        count += int((target != IGNORE_INDEX).sum())
    return total / max(count, 1), count


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy continuations of token-id prompts (left-padded batches), cut at the first EOS, decoded."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos(tokenizer)
    stops = {_eos(tokenizer)}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [""] * len(prompts)
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in chunk], device=device)
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
        )[:, width:].tolist()
        for i, new in zip(chunk, out):
            cut = next((k for k, t in enumerate(new) if t in stops), len(new))
            answers[i] = tokenizer.decode(new[:cut], skip_special_tokens=True)
    return answers


def exact_matches(model, tokenizer, metas: list[dict], longest: int, batch_size: int = 32) -> tuple[list[int], list[str]]:
    """(1/0 per example: the greedy answer equals the reference, whitespace-normalised; the answers).

    ``metas``: the examples' ``{"prompt_ids", "reference"}``; ``longest``: the longest reference in tokens
    (generation stops at EOS or after ``longest + 2`` new tokens).
    """
    answers = generate_answers(model, tokenizer, [m["prompt_ids"] for m in metas], longest + 2, batch_size)
    norm = [" ".join(a.split()) for a in answers]
    return [int(a == " ".join(m["reference"].split())) for a, m in zip(norm, metas)], norm


def evaluate(
    model,
    tokenizer,
    dataset: ExampleDataset,
    collator: Collator,
    batch_size: int = 8,
    exact_match: bool | None = None,
) -> dict:
    """``response_loss``, ``perplexity``, ``response_tokens``, and ``exact_match`` (module docstring).

    ``exact_match``: None = when every reference has at most EXACT_MATCH_MAX_TOKENS tokens; True = always.
    """
    was_training = model.training
    model.eval()
    try:
        loss, count = response_loss(model, dataset, collator, batch_size)
        scores = {"response_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "response_tokens": count}
        metas = [m for m in (dataset.meta or []) if m]
        if metas and exact_match is not False:
            ref_tokens = [len(tokenizer(m["reference"], add_special_tokens=False)["input_ids"]) for m in metas]
            longest = max(ref_tokens)
            scores["reference_max_tokens"] = longest
            if exact_match or longest <= EXACT_MATCH_MAX_TOKENS:
                hits, norm = exact_matches(model, tokenizer, metas, longest, 4 * batch_size)
                scores["exact_match"] = sum(hits) / len(hits)
                scores["examples"] = [{"reference": m["reference"], "generated": a} for m, a in zip(metas[:5], norm)]
        scores["eval_rows"] = len(dataset)
        return scores
    finally:
        model.train(was_training)


__all__ = ["EXACT_MATCH_MAX_TOKENS", "encode", "render_chat", "join_prompt", "pack", "evaluate", "exact_matches", "response_loss"]
