"""The sft and lm tasks: prompt tokens carry label -100 and no loss; chat templates; packing."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("datasets")

import peftlab.data as D  # noqa: E402
from peftlab.data import IGNORE_INDEX  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


@pytest.fixture(scope="module")
def tiny_lm(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
        intermediate_size=64, vocab_size=len(tokenizer), max_position_embeddings=256,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


ROWS = [
    {"prompt": "Review: a gorgeous, witty film\nSentiment?", "response": "positive"},
    {"prompt": "Review: dull and far too long, a waste of an evening\nSentiment?", "response": "negative"},
    {"prompt": "Translate to French: cat", "response": "le chat est sur la table"},
]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompt_tokens_carry_no_loss(tmp_path, tokenizer, tiny_lm):
    data = D.prepare("sft", tokenizer, jsonl(tmp_path / "s.jsonl", ROWS))
    batch = data.collator([data.train[i] for i in range(3)])
    for i, row in enumerate(ROWS):
        labels, ids = batch["labels"][i], batch["input_ids"][i]
        prompt_len = len(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
        assert (labels[:prompt_len] == IGNORE_INDEX).all()
        n = int(batch["attention_mask"][i].sum())
        assert labels[prompt_len:n].tolist() == ids[prompt_len:n].tolist()
        assert ids[n - 1] == tokenizer.eos_token_id  # the response ends with EOS, which is learned
        assert tokenizer.decode(ids[prompt_len : n - 1]).strip() == row["response"]
    out = tiny_lm(**batch)
    logits, target = out.logits[:, :-1], batch["labels"][:, 1:]
    response = target != IGNORE_INDEX
    only_response = torch.nn.functional.cross_entropy(logits[response], target[response])
    everything = torch.nn.functional.cross_entropy(logits[batch["attention_mask"][:, 1:].bool()], batch["input_ids"][:, 1:][batch["attention_mask"][:, 1:].bool()])
    assert torch.allclose(out.loss, only_response, atol=1e-6)
    assert not torch.allclose(out.loss, everything, atol=1e-3)  # the prompt would change it
    # peftlab's own (fused) loss, which the training loop uses, agrees
    from peftlab.training.loop import default_loss

    assert torch.allclose(default_loss(tiny_lm, batch), only_response, atol=1e-5)


def test_long_prompts_lose_their_beginning(tmp_path, tokenizer):
    rows = [{"prompt": "word " * 200 + "Sentiment?", "response": "positive"}]
    ex = D.prepare("sft", tokenizer, jsonl(tmp_path / "l.jsonl", rows), max_length=32).train[0]
    assert len(ex["input_ids"]) == 32
    assert tokenizer.decode([t for t in ex["labels"] if t != IGNORE_INDEX]).strip() == "positive" + tokenizer.eos_token
    assert tokenizer.decode(ex["input_ids"]).endswith("Sentiment? positive" + tokenizer.eos_token)


def test_chat_messages_learn_assistant_turns_only(tmp_path, tokenizer):
    rows = [{"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]}]  # fmt: skip
    data = D.prepare("sft", tokenizer, jsonl(tmp_path / "c.jsonl", rows))
    ex = data.train[0]
    full = tokenizer.apply_chat_template(rows[0]["messages"], tokenize=False)
    assert tokenizer.decode(ex["input_ids"]) == full
    learned = [t if lab != IGNORE_INDEX else None for t, lab in zip(ex["input_ids"], ex["labels"])]
    spans, current = [], []
    for t in learned + [None]:
        if t is None and current:
            spans.append(tokenizer.decode(current))
            current = []
        elif t is not None:
            current.append(t)
    assert [s.strip() for s in spans] == ["Paris.<|im_end|>", "Rome.<|im_end|>"]
    assert data.eval is None
    meta = data.train.meta[0]  # exact match generates from the conversation before the last reply
    assert meta["reference"] == "Rome." and tokenizer.decode(meta["prompt_ids"]).endswith("<|im_start|>assistant\n")


def test_prompt_response_through_chat_template(tmp_path, tokenizer):
    data = D.prepare("sft", tokenizer, jsonl(tmp_path / "s.jsonl", ROWS[:1]), chat_template=True)
    ex = data.train[0]
    assert "<|im_start|>user" in tokenizer.decode(ex["input_ids"])
    assert tokenizer.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX]).strip() == "positive<|im_end|>"


def test_packing_keeps_every_token_and_label(tmp_path, tokenizer):
    plain = D.prepare("sft", tokenizer, jsonl(tmp_path / "s.jsonl", ROWS * 4), max_length=64)
    packed = D.prepare("sft", tokenizer, jsonl(tmp_path / "s.jsonl", ROWS * 4), max_length=64, packing=True)
    flat = lambda ds, key: [t for e in ds.examples for t in e[key]]  # noqa: E731
    assert flat(packed.train, "input_ids") == flat(plain.train, "input_ids")
    assert flat(packed.train, "labels") == flat(plain.train, "labels")
    assert all(len(e["input_ids"]) == 64 for e in packed.train.examples[:-1]) and len(packed.train) < len(plain.train)


def test_lm_rows_longer_than_max_length_are_split(tmp_path, tokenizer):
    rows = [{"text": "one two three " * 40}, {"text": "short"}]
    data = D.prepare("lm", tokenizer, jsonl(tmp_path / "t.jsonl", rows), max_length=50)
    n_tokens = len(tokenizer(rows[0]["text"])["input_ids"]) + 1 + len(tokenizer("short")["input_ids"]) + 1
    assert sum(len(e["input_ids"]) for e in data.train.examples) == n_tokens
    assert max(len(e["input_ids"]) for e in data.train.examples) == 50
    assert all(e["labels"] == e["input_ids"] for e in data.train.examples)
