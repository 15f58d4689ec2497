"""peftlab.data tasks on a real tokenizer: encodings, label sets, the bench-identical batch order, and
malformed rows named by file, row, column and value."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

pytest.importorskip("datasets")

import peftlab.data as D  # noqa: E402
from peftlab.data import DataError  # noqa: E402


@pytest.fixture(scope="module")
def bert_tokenizer():
    from transformers import AutoTokenizer

    import peftlab

    return AutoTokenizer.from_pretrained(peftlab.resolve_model_path("minilm-l6"))


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_classify_label_set_from_data(tmp_path, bert_tokenizer):
    rows = [{"review": f"text {i}", "stars": s} for i, s in enumerate(["good", "bad", "meh", "good", "bad"])]
    data = D.prepare("classify", bert_tokenizer, jsonl(tmp_path / "r.jsonl", rows), text_column="review", label_column="stars")
    assert data.labels == ["bad", "good", "meh"]
    assert [e["labels"] for e in data.train.examples] == [1, 0, 2, 1, 0]
    assert data.model_kwargs()["id2label"] == {0: "bad", 1: "good", 2: "meh"}
    assert data.kind == "seq-cls"


def test_classify_pairs(tmp_path, bert_tokenizer):
    rows = [{"sentence1": "a cat", "sentence2": "a dog", "label": 0}, {"sentence1": "x", "sentence2": "y", "label": 1}]
    data = D.prepare("classify", bert_tokenizer, jsonl(tmp_path / "p.jsonl", rows))
    ids = data.train.examples[0]["input_ids"]
    assert ids.count(bert_tokenizer.sep_token_id) == 2 and 1 in data.train.examples[0]["token_type_ids"]


def test_batches_equal_the_builtin_sst2_task(sst2_dir, tmp_path, bert_tokenizer):
    """A CSV of SST-2 gives the same batches, in the same order, as peftlab.bench's sst2 task."""
    import csv

    from peftlab.bench.tasks import get_task

    task = get_task("sst2")
    rows = task.load(sst2_dir.parent, "train")[:700]
    path = tmp_path / "sst2.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "label"])
        w.writerows(rows)
    data = D.prepare("classify", bert_tokenizer, path, max_length=48)
    ours = data.batches(32, seed=0)
    # the bench worker's epoch e uses seed 1000 * seed + e
    theirs = itertools.chain(task.batches(bert_tokenizer, rows, 32, 48, seed=0), task.batches(bert_tokenizer, rows, 32, 48, seed=1))
    for _ in range(25):  # past the first epoch (22 batches): the reshuffle matches too
        a, b = next(ours), next(theirs)
        assert set(a) == set(b)
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_tokens_align_tags_to_first_subwords(tmp_path, bert_tokenizer):
    rows = [{"tokens": ["Gutenbergstraße", "is", "in", "Mainz"], "ner_tags": ["B-LOC", "O", "O", "B-LOC"]}]
    data = D.prepare("tokens", bert_tokenizer, jsonl(tmp_path / "t.jsonl", rows))
    assert data.labels == ["O", "B-LOC"]
    ex = data.train.examples[0]
    enc = bert_tokenizer(rows[0]["tokens"], is_split_into_words=True)
    firsts = [i for i, w in enumerate(enc.word_ids()) if w is not None and (i == 0 or enc.word_ids()[i - 1] != w)]
    assert [i for i, lab in enumerate(ex["labels"]) if lab != -100] == firsts
    assert [ex["labels"][i] for i in firsts] == [1, 0, 0, 1]
    assert len(ex["input_ids"]) > 6  # the first word has several sub-words, which carry no label


def test_collator_pads_for_trainer_and_loop(tmp_path, bert_tokenizer):
    rows = [{"tokens": ["a"], "ner_tags": ["O"]}, {"tokens": ["a", "b", "c"], "ner_tags": ["O", "B-X", "I-X"]}]
    data = D.prepare("tokens", bert_tokenizer, jsonl(tmp_path / "t.jsonl", rows))
    batch = data.collator([data.train[0], data.train[1]])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 5)
    assert batch["labels"][0, 3:].tolist() == [-100, -100] and batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    assert batch["input_ids"][0, 3:].tolist() == [bert_tokenizer.pad_token_id] * 2


@pytest.mark.parametrize(
    "task, rows, kwargs, expected",
    [
        ("classify", [{"text": "a", "label": 1}, {"text": "b", "label": None}], {}, ["row 2", "'label'", "empty value"]),
        ("classify", [{"text": "a", "y": 1}], {}, ["no label column", "columns found: text, y", "--label-column"]),
        ("classify", [{"text": "a", "label": 1}], {"label_column": "stars"}, ["no column 'stars'", "columns found"]),
        ("classify", [{"text": "a", "label": 1}, {"text": 5, "label": 0}], {}, ["row 2", "'text'", "5 is a int"]),
        ("classify", [{"text": "a", "label": 1}, {"text": "b", "label": "x"}], {}, ["row 2", "mixes label types"]),
        ("classify", [{"text": "a", "label": 1}, {"text": "b", "label": 1}], {}, ["one label", "at least two"]),
        ("tokens", [{"tokens": ["a", "b"], "ner_tags": ["O"]}], {}, ["row 1", "'ner_tags'", "1 tags for 2 words"]),
        ("tokens", [{"tokens": "a b", "ner_tags": ["O"]}], {}, ["row 1", "'tokens'", "list of words"]),
        ("sft", [{"prompt": "a", "answer": "b"}], {}, ["no response column", "columns found: prompt, answer"]),
        ("sft", [{"prompt": "a", "response": ""}], {}, ["row 1", "'response'", "empty text"]),
        ("sft", [{"messages": [{"role": "bot", "content": "x"}]}], {}, ["row 1", "'messages'", "'role': 'bot'"]),
        ("sft", [{"text": "a"}], {}, ["'prompt' and 'response'", "'messages'"]),
        ("lm", [{"body": "a"}], {}, ["no text column", "--text-column"]),
    ],
)
def test_malformed_rows_name_the_column(tmp_path, bert_tokenizer, task, rows, kwargs, expected):
    with pytest.raises(DataError) as err:
        D.prepare(task, bert_tokenizer, jsonl(tmp_path / "bad.jsonl", rows), **kwargs)
    message = str(err.value)
    assert "\n" not in message and "bad.jsonl" in message
    for part in expected:
        assert part in message, message


def test_unseen_eval_label_is_named(tmp_path, bert_tokenizer):
    train = jsonl(tmp_path / "a.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}])
    evalset = jsonl(tmp_path / "b.jsonl", [{"text": "c", "label": "pos"}, {"text": "d", "label": "neutral"}])
    with pytest.raises(DataError, match=r"b.jsonl: row 2, column 'label': label 'neutral' does not occur.*'neg', 'pos'"):
        D.prepare("classify", bert_tokenizer, train, evalset)


def test_entity_metrics_score_spans():
    from peftlab.data.metrics import entities, entity_f1, macro_f1

    assert entities(["B-PER", "I-PER", "O", "I-LOC", "B-LOC"]) == {("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 5)}
    scores = entity_f1([["B-PER", "I-PER", "O"], ["O", "B-LOC"]], [["B-PER", "O", "O"], ["O", "B-LOC"]])
    assert scores == {"precision": 0.5, "recall": 0.5, "f1": 0.5}
    assert macro_f1([0, 0, 1, 1], [0, 1, 1, 1]) == pytest.approx((2 / 3 + 0.8) / 2)


@torch.no_grad()
def test_token_eval_maps_predictions_back_to_words(tmp_path, bert_tokenizer):
    """A model that predicts the gold tag on every first sub-word scores F1 1; truncated words count as O."""
    rows = [{"tokens": ["Angela", "Merkel", "visited", "Paris"], "ner_tags": ["B-PER", "I-PER", "O", "B-LOC"]},
            {"tokens": ["nothing", "here"], "ner_tags": ["O", "O"]}]  # fmt: skip
    data = D.prepare("tokens", bert_tokenizer, jsonl(tmp_path / "t.jsonl", rows), jsonl(tmp_path / "e.jsonl", rows))

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.gold = {tuple(e["input_ids"]): e["labels"] for e in data.eval.examples}

        def forward(self, input_ids, **_):
            logits = torch.zeros(*input_ids.shape, len(data.labels))
            for b, ids in enumerate(input_ids.tolist()):
                gold = next(v for k, v in self.gold.items() if list(k) == ids[: len(k)])
                for t, y in enumerate(gold):
                    logits[b, t, max(y, 0)] = 1.0
            return type("Out", (), {"logits": logits})()

    scores = data.evaluate(Oracle())
    assert scores["f1"] == 1.0 and scores["token_accuracy"] == 1.0
    short = D.prepare("tokens", bert_tokenizer, jsonl(tmp_path / "t.jsonl", rows), jsonl(tmp_path / "e.jsonl", rows), max_length=4)
    data = short  # the first sentence keeps two words: "visited" and "Paris" are scored as O
    scores = short.evaluate(Oracle())
    assert scores["recall"] == 0.5 and scores["precision"] == 1.0
