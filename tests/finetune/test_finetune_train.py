"""finetune(): real training from files lowers the loss and raises the metric; the outputs load back."""

from __future__ import annotations

import csv
import json

import pytest

pytest.importorskip("datasets")

import peftlab  # noqa: E402
from peftlab.finetune import finetune  # noqa: E402


def sst2_csv(path, split, n, sst2_dir, offset=0):
    with open(sst2_dir / f"{split}.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[offset : offset + n]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "label"])
        w.writerows((r["sentence"], r["label"]) for r in rows)
    return path


def test_classify_csv_trains_minilm(tmp_path, sst2_dir):
    """MiniLM-L6 + LoRA on 1,280 SST-2 rows from a CSV: test accuracy well above chance (the majority class
    is 51% of these test rows), and the saved adapter reproduces it on a fresh model."""
    train = sst2_csv(tmp_path / "train.csv", "train", 1280, sst2_dir)
    test = sst2_csv(tmp_path / "test.csv", "test", 160, sst2_dir)
    out = tmp_path / "out"
    m = finetune("minilm-l6", train, "classify", "lora", out, eval_data=test, max_steps=40, batch_size=32,
                 lr=3e-3, max_length=48, progress=False)  # fmt: skip
    assert m["eval"]["accuracy"] >= 0.70, m["eval"]
    assert m["final_train_loss"] < m["first_train_loss"] - 0.1
    assert m["labels"] == [0, 1] and m["steps"] == 40 and m["eval_rows"] == 160
    assert 0 < m["trainable_params"] < m["total_params"] / 100 and m["peak_memory_mb"] > 0
    assert json.loads((out / "metrics.json").read_text())["eval"] == m["eval"]
    assert (out / "peft" / "adapter_config.json").is_file() and not (out / "checkpoint").exists()

    import peftlab.data as D

    model, tok = peftlab.load_model("minilm-l6", kind="seq-cls", num_labels=2)
    peftlab.load_adapter(model, out / "adapter")
    data = D.prepare("classify", tok, train, test, max_length=48)
    assert data.evaluate(model)["accuracy"] == m["eval"]["accuracy"]


def test_tokens_jsonl_trains(tmp_path, tiny_bert_dir):
    """Token classification from JSONL on a tiny BERT (full fine-tuning): the loss falls and the per-word
    accuracy beats the majority tag; entity F1 is reported."""
    import random

    rng = random.Random(0)
    names, fillers = ["alice", "bob", "carol", "dave"], ["went", "to", "the", "market", "today", "with", "a", "dog"]
    rows = []
    for _ in range(160):
        words = rng.sample(fillers, 4)
        at = rng.randrange(5)
        words.insert(at, rng.choice(names))
        rows.append({"tokens": words, "ner_tags": ["B-PER" if i == at else "O" for i in range(5)]})
    (tmp_path / "ner.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = finetune(tiny_bert_dir, tmp_path / "ner.jsonl", "tokens", "full", tmp_path / "out", eval_split=0.25,
                 max_steps=60, batch_size=16, lr=5e-3, progress=False)  # fmt: skip
    assert m["labels"] == ["O", "B-PER"] and m["kind"] == "token-cls"
    assert m["final_train_loss"] < 0.5 * m["first_train_loss"]
    assert m["eval"]["token_accuracy"] > 0.9 and m["eval"]["f1"] > 0.5, m["eval"]
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()
    assert any("full fine-tuning" in n for n in m["notes"])


def test_sft_jsonl_learns_the_answers(tmp_path, tiny_llama_dir):
    """SFT from JSONL on a tiny Llama (full fine-tuning): the response loss falls and the greedy answers
    become exact matches (each answer follows from the prompt's last word)."""
    import random

    rng = random.Random(0)
    answer = {"good": "positive", "great": "positive", "bad": "negative", "awful": "negative"}
    fillers = ["the", "film", "plot", "was", "rather", "quite"]
    rows = [{"prompt": " ".join(rng.sample(fillers, 3)) + f" verdict {w}", "response": answer[w]} for w in list(answer) * 30]
    rng.shuffle(rows)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:100]))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[100:]))
    import peftlab.data as D

    model, tok = peftlab.load_model(tiny_llama_dir)
    before = D.prepare("sft", tok, tmp_path / "train.jsonl", tmp_path / "eval.jsonl").evaluate(model)
    m = finetune(tiny_llama_dir, tmp_path / "train.jsonl", "sft", "full", tmp_path / "out", eval_data=tmp_path / "eval.jsonl",
                 max_steps=40, batch_size=16, lr=1e-2, progress=False)  # fmt: skip
    after = m["eval"]
    assert after["response_loss"] < 0.2 * before["response_loss"], (before, after)
    assert before["exact_match"] == 0.0 and after["exact_match"] >= 0.9, (before, after)
    assert after["reference_max_tokens"] == 1 and after["response_tokens"] == 2 * 20  # the word and EOS


def test_lm_text_lowers_perplexity(tmp_path, tiny_llama_dir):
    text = "the quick brown fox jumps over the lazy dog. "
    (tmp_path / "t.csv").write_text("text\n" + "".join(f'"{text * 3}"\n' for _ in range(40)))
    m = finetune(tiny_llama_dir, tmp_path / "t.csv", "lm", "full", tmp_path / "out", eval_split=0.1,
                 max_steps=30, batch_size=8, lr=1e-2, progress=False)  # fmt: skip
    assert m["final_train_loss"] < 0.5 * m["first_train_loss"]
    assert m["eval"]["perplexity"] < 20 and m["kind"] == "causal-lm"
