"""Benchmark tasks: data from a local folder or the Hugging Face hub, batching and scoring.

Data source (``--data`` or $PEFTLAB_DATA, default ../shared/data): a folder holding ``sst2/*.tsv`` and
``conll2003/*.txt``, or ``hf`` for the hub datasets (``nyu-mll/glue`` config ``sst2``, ``eriktks/conll2003``;
needs ``pip install datasets`` and a connection), or ``hf:<dataset id>`` for another hub dataset with the same
columns (``sentence``/``label``; ``tokens``/``ner_tags``). From the hub, SST-2's dev split is a seeded 10% of
GLUE train and its test split is GLUE validation (the 872 sentences), as in the local folder.

* ``sst2``: sentence classification, scored by accuracy.
* ``conll2003``: token classification (IOB2 NER), scored by entity-level F1; labels sit on the
  first sub-word of each word, the others get -100.
* ``sst2-gen``: SST-2 as instruction-style generation for causal LMs: the loss is on the label
  word only; scored by the accuracy of the greedily generated label.

Training batches are grouped by length (as transformers' ``group_by_length``): the shuffled rows are cut
into mega-batches of 50 batches, each sorted by length, and the batches are shuffled again. SST-2's
training phrases average 13 tokens with a long tail (66), so random batches would be about 3× padding;
grouped ones are nearly pad-free. Evaluation sorts by length too (the metrics do not depend on order).
"""

from __future__ import annotations

import csv
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..util.errors import ConfigError
from .metrics import accuracy, entities, entity_f1

CONLL_TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
GEN_LABELS = {0: "negative", 1: "positive"}
GEN_PROMPT = "Review: {sentence}\nIs this review positive or negative?\nAnswer:"


HUB_IDS = {"sst2": ("nyu-mll/glue", "sst2"), "conll2003": ("eriktks/conll2003", None)}


def _hub_or_path(value: str) -> Path | str:
    return value if value == "hf" or value.startswith("hf:") else Path(value)


def data_dir(override: str | None = None) -> Path | str:
    """The data source: an explicit override, $PEFTLAB_DATA, or ../shared/data beside the repo.

    Returns a folder, or the string ``hf`` / ``hf:<dataset id>`` for the Hugging Face hub.
    """
    if override:
        return _hub_or_path(override)
    if os.environ.get("PEFTLAB_DATA"):
        return _hub_or_path(os.environ["PEFTLAB_DATA"])
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return Path.cwd().parent / "shared" / "data"


def _check_file(path: Path) -> Path:
    if not path.is_file():
        raise ConfigError(
            f"data file {path} not found; set --data or PEFTLAB_DATA to the folder holding sst2/ and conll2003/"
        )
    return path


def read_sst2(folder: Path, split: str) -> list[tuple[str, int]]:
    with open(_check_file(folder / "sst2" / f"{split}.tsv"), newline="") as f:
        return [
            (r["sentence"], int(r["label"]))
            for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        ]


def read_conll(folder: Path, split: str) -> list[tuple[list[str], list[str]]]:
    sentences, words, tags = [], [], []
    for line in open(_check_file(folder / "conll2003" / f"{split}.txt")):
        line = line.strip()
        if not line or line.startswith("-DOCSTART-"):
            if words:
                sentences.append((words, tags))
            words, tags = [], []
            continue
        parts = line.split()
        words.append(parts[0])
        tags.append(parts[-1])
    if words:
        sentences.append((words, tags))
    return sentences


def _load_hub_split(dataset_id: str, config: str | None, split: str):
    """``datasets.load_dataset(dataset_id, config, split=split)``, with a clear error when unavailable."""
    try:
        import datasets
    except ImportError as err:
        raise ConfigError("hub data (--data hf) needs the datasets package: pip install datasets") from err
    return datasets.load_dataset(dataset_id, config, split=split)


def read_hub(task: str, source: str, split: str) -> list:
    """Rows of ``task``'s ``split`` (train/dev/test) from the hub, in the local readers' format."""
    if task not in HUB_IDS:
        raise ConfigError(f"no hub data for task {task!r}; hub tasks: {sorted(HUB_IDS)}")
    dataset_id, config = HUB_IDS[task]
    if source.startswith("hf:"):
        dataset_id, config = source[3:], None
    if task == "sst2":
        if split == "test":
            table = _load_hub_split(dataset_id, config, "validation")
            return [(r["sentence"], int(r["label"])) for r in table]
        rows = [(r["sentence"], int(r["label"])) for r in _load_hub_split(dataset_id, config, "train")]
        order = list(range(len(rows)))
        random.Random(0).shuffle(order)
        n_dev = len(rows) // 10
        picked = order[:n_dev] if split == "dev" else order[n_dev:]
        return [rows[i] for i in sorted(picked)]
    table = _load_hub_split(dataset_id, config, {"dev": "validation"}.get(split, split))
    names = table.features["ner_tags"].feature.names
    return [(list(r["tokens"]), [names[t] for t in r["ner_tags"]]) for r in table]


@dataclass
class Task:
    """One benchmark task. ``kind`` is the model head it needs (see peftlab.util.models.load_model)."""

    name: str
    kind: str
    metric: str

    def load(self, folder: Path | str, split: str, limit: int | None = None, seed: int = 0) -> list:
        """Rows of ``split`` (train/dev/test) from a data folder or ``hf``/``hf:<id>`` (module docstring)."""
        data_task = "conll2003" if self.name == "conll2003" else "sst2"
        if isinstance(folder, str):
            rows = read_hub(data_task, folder, split)
        elif data_task == "conll2003":
            rows = read_conll(folder, split)
        else:
            rows = read_sst2(folder, split)
        if limit and limit < len(rows):
            rows = random.Random(seed).sample(rows, limit)
        return rows

    def chance(self, rows: list) -> float:
        """The metric of a constant guess: the majority label's share (accuracy), 0 for entity F1."""
        if self.name == "conll2003" or not rows:
            return 0.0
        labels = [row[1] for row in rows]
        return max(labels.count(y) for y in set(labels)) / len(labels)

    def model_kwargs(self) -> dict:
        if self.name == "sst2":
            return {"num_labels": 2}
        if self.name == "conll2003":
            return {
                "num_labels": len(CONLL_TAGS),
                "id2label": dict(enumerate(CONLL_TAGS)),
                "label2id": {t: i for i, t in enumerate(CONLL_TAGS)},
            }
        return {}

    # ---- batching ----

    @staticmethod
    def length(row) -> int:
        """A cheap length proxy for grouping: words in the sentence."""
        first = row[0]
        return len(first) if isinstance(first, list) else len(first.split())

    def batches(
        self,
        tokenizer,
        rows: list,
        batch_size: int,
        max_length: int,
        seed: int | None,
        group_by_length: bool = True,
    ) -> Iterator[dict]:
        """Batches of ``batch_size`` rows; shuffled when ``seed`` is given, else in order."""
        order = list(range(len(rows)))
        if seed is not None:
            rng = random.Random(seed)
            rng.shuffle(order)
            if group_by_length:
                mega = 50 * batch_size
                order = [
                    j
                    for i in range(0, len(order), mega)
                    for j in sorted(order[i : i + mega], key=lambda k: -self.length(rows[k]))
                ]
                groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
                rng.shuffle(groups)
                order = [j for g in groups for j in g]
        for i in range(0, len(order), batch_size):
            chunk = [rows[j] for j in order[i : i + batch_size]]
            yield self.collate(tokenizer, chunk, max_length)

    def collate(self, tokenizer, rows: list, max_length: int) -> dict:
        if self.name == "sst2":
            enc = tokenizer(
                [s for s, _ in rows],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            enc["labels"] = torch.tensor([y for _, y in rows])
            return dict(enc)
        if self.name == "conll2003":
            enc = tokenizer(
                [w for w, _ in rows],
                is_split_into_words=True,
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            labels = torch.full(enc["input_ids"].shape, -100)
            for b, (_, tags) in enumerate(rows):
                previous = None
                for t, word in enumerate(enc.word_ids(b)):
                    if word is not None and word != previous:
                        labels[b, t] = CONLL_TAGS.index(tags[word])
                    previous = word
            enc["labels"] = labels
            return dict(enc)
        return self.collate_gen(tokenizer, rows, max_length)

    def collate_gen(self, tokenizer, rows: list, max_length: int) -> dict:
        """Prompt + " label" + eos, right-padded; labels -100 everywhere but the answer tokens."""
        ids, labels = [], []
        for sentence, y in rows:
            prompt = tokenizer(GEN_PROMPT.format(sentence=sentence.strip()), add_special_tokens=False)[
                "input_ids"
            ]
            answer = tokenizer(" " + GEN_LABELS[y], add_special_tokens=False)["input_ids"] + [
                tokenizer.eos_token_id
            ]
            prompt = prompt[: max(1, max_length - len(answer))]
            ids.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
        width = max(len(x) for x in ids)
        pad = tokenizer.pad_token_id
        return {
            "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            "labels": torch.tensor([x + [-100] * (width - len(x)) for x in labels]),
        }

    # ---- scoring ----

    @torch.no_grad()
    def evaluate(
        self, model, tokenizer, rows: list, batch_size: int, max_length: int, examples: dict | None = None
    ) -> dict[str, float]:
        """The task's metrics on ``rows``.

        ``examples``, when given, is filled with per-example columns in the order of ``rows`` (what a
        paired bootstrap over examples needs, see :mod:`peftlab.bench.stats`): ``correct`` (0/1) and
        ``prediction`` for accuracy tasks; ``tp``, ``n_pred``, ``n_ref`` (entity counts per sentence)
        for entity F1.
        """
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        order = sorted(range(len(rows)), key=lambda i: self.length(rows[i]))
        original = rows
        rows = [original[i] for i in order]  # less padding; accuracy and entity F1 ignore order

        def keep(**columns) -> None:  # sorted order -> the order of the rows given
            if examples is not None:
                for name, values in columns.items():
                    column = [None] * len(values)
                    for position, value in zip(order, values):
                        column[position] = value
                    examples[name] = column

        try:
            if self.name == "sst2":
                preds = []
                for batch in self.batches(tokenizer, rows, batch_size, max_length, None):
                    batch.pop("labels")
                    preds += model(**{k: v.to(device) for k, v in batch.items()}).logits.argmax(-1).tolist()
                keep(prediction=preds, correct=[int(p == y) for p, (_, y) in zip(preds, rows)])
                return {"accuracy": accuracy(preds, [y for _, y in rows])}
            if self.name == "conll2003":
                preds, refs = [], []
                for i in range(0, len(rows), batch_size):
                    chunk = rows[i : i + batch_size]
                    batch = self.collate(tokenizer, chunk, max_length)
                    labels = batch.pop("labels")
                    out = model(**{k: v.to(device) for k, v in batch.items()}).logits.argmax(-1).cpu()
                    for b, (_, tags) in enumerate(chunk):
                        keep = labels[b] != -100
                        predicted = [CONLL_TAGS[t] for t in out[b][keep].tolist()]
                        # words cut by truncation count as predicted "O"
                        preds.append(predicted + ["O"] * (len(tags) - len(predicted)))
                        refs.append(tags)
                spans = [(entities(p), entities(r)) for p, r in zip(preds, refs)]
                keep(
                    tp=[len(p & r) for p, r in spans],
                    n_pred=[len(p) for p, _ in spans],
                    n_ref=[len(r) for _, r in spans],
                )
                return entity_f1(preds, refs)
            correct = self.evaluate_gen(model, tokenizer, rows, batch_size, max_length)
            keep(correct=correct)
            return {"accuracy": sum(correct) / len(correct)}
        finally:
            model.train(was_training)

    def evaluate_gen(self, model, tokenizer, rows: list, batch_size: int, max_length: int) -> list[int]:
        """1 for each row whose greedily generated label is right, else 0."""
        correct = []
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            for i in range(0, len(rows), batch_size):
                chunk = rows[i : i + batch_size]
                prompts = [GEN_PROMPT.format(sentence=s.strip()) for s, _ in chunk]
                enc = tokenizer(
                    prompts,
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    add_special_tokens=False,
                )
                enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
                out = model.generate(
                    **enc, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
                texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
                correct += [
                    int(t.strip().lower().startswith(GEN_LABELS[y])) for t, (_, y) in zip(texts, chunk)
                ]
        finally:
            tokenizer.padding_side = side
        return correct


TASKS = {
    "sst2": Task("sst2", "seq-cls", "accuracy"),
    "conll2003": Task("conll2003", "token-cls", "f1"),
    "sst2-gen": Task("sst2-gen", "causal-lm", "accuracy"),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]
