"""The harness on your own data file: ``peftlab bench --data FILE --task classify|tokens|sft``.

The file is read and encoded by :mod:`peftlab.data` (CSV, TSV, JSONL, Parquet; the same tasks and column
options as ``peftlab train``), and every method of the sweep is trained and scored on the same splits, so
the report (tables, paired-bootstrap intervals, plots) reads as for the built-in SST-2 and CoNLL tasks.

In a sweep file, ``data:`` is the file, or a mapping (every key but ``file`` optional)::

    data: {file: reviews.csv, eval_file: reviews-test.csv, text_column: review, label_column: stars}
    tasks: [classify]

Splits (the same for every method and seed):

* **test**: ``eval_file`` (``--eval-data``), else a seeded ``eval_split`` (``--eval-split``, default 0.1) of
  ``file``: the rows every method is scored on, with per-example columns for the paired bootstrap;
* **dev**: a seeded 10% of the remaining training rows (at least one): the dev metric of the learning
  curves and of the best-checkpoint choice (``eval_every``), never the test rows;
* **train**: the rest.

Metrics (higher is better, one per task): ``classify`` accuracy (macro-F1 also recorded), ``tokens``
entity F1, ``sft`` exact match of the greedy answer against the reference response (the references
must be short, at most :data:`peftlab.data.sft.EXACT_MATCH_MAX_TOKENS` tokens; for long responses, whose
only score is a loss, use ``peftlab train``). ``lm`` has no such score and is refused with that reason.

Rows of a split are tuples ``(example, length, meta)`` of the encoded :class:`peftlab.data.ExampleDataset`,
so the worker's sampling (``train_limit``) and multi-process sharding treat them as any task's rows.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import torch

from ..data.collate import ExampleDataset, batch_order
from ..data.readers import FORMATS, file_format
from ..util.errors import ConfigError
from .metrics import entities

#: the tasks the harness runs on a user file: (model head, selection metric)
USER_TASKS = {
    "classify": ("seq-cls", "accuracy"),
    "tokens": ("token-cls", "f1"),
    "sft": ("causal-lm", "exact_match"),
}
DATA_KEYS = ("file", "eval_file", "eval_split", "text_column", "label_column")
DEFAULT_EVAL_SPLIT = 0.1
DEV_SHARE = 0.1
EXAMPLE = "data: {file: reviews.csv, eval_split: 0.1, text_column: text, label_column: label}"


def looks_like_file(value: str) -> bool:
    """True for a data file (an existing file, or a name with a data-file extension); False for a folder or ``hf``."""
    if value == "hf" or value.startswith("hf:") or Path(value).is_dir():
        return False
    if Path(value).is_file():
        return True
    return any(s.lower() in FORMATS for s in Path(value).suffixes)


def normalize(data, where: str = "data") -> dict | str | None:
    """A sweep's ``data`` value checked: a folder / ``hf`` source stays a string; a data file (a string or a
    mapping, see the module docstring) becomes ``{file, eval_file, eval_split, text_column, label_column}``
    with absolute paths (so the run id and the worker see the same file). Raises ConfigError naming the key."""
    if data is None:
        return None
    if isinstance(data, str):
        if not looks_like_file(data):
            return data
        data = {"file": data}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where}: must be a data folder, hf / hf:<dataset id>, a data file or a mapping, got {data!r}; e.g. {EXAMPLE}"
        )
    extra = sorted(set(data) - set(DATA_KEYS), key=str)
    if extra:
        raise ConfigError(
            f"unknown key(s) {extra} in {where}; valid keys: {', '.join(DATA_KEYS)}; e.g. {EXAMPLE}"
        )
    out = {}
    for key in ("file", "eval_file"):
        value = data.get(key)
        if value is None:
            if key == "file":
                raise ConfigError(f"{where}.file: the training data file is required; e.g. {EXAMPLE}")
            continue
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}.{key}: must be a file path, got {value!r}")
        path = Path(value).expanduser()
        try:
            file_format(path)
        except ConfigError as exc:
            raise ConfigError(f"{where}.{key}: {exc}") from None
        if not path.is_file():
            raise ConfigError(
                f"{where}.{key}: data file {value} not found"
                + (" (it is a folder)" if path.is_dir() else "")
                + f"; valid: a {', '.join(sorted(FORMATS))} file"
            )
        out[key] = str(path.resolve())
    split = data.get("eval_split")
    if split is not None:
        if "eval_file" in out:
            raise ConfigError(f"{where}: give eval_file (--eval-data) or eval_split (--eval-split), not both")
        if isinstance(split, bool) or not isinstance(split, (int, float)) or not 0 < split < 1:
            raise ConfigError(
                f"{where}.eval_split: must be a fraction between 0 and 1 (e.g. 0.1), got {split!r}"
            )
    if "eval_file" not in out:
        out["eval_split"] = float(split if split is not None else DEFAULT_EVAL_SPLIT)
    for key in ("text_column", "label_column"):
        value = data.get(key)
        if value is not None:
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{where}.{key}: must be a column name, got {value!r}")
            out[key] = value
    return out


def check_task(task: str, data: dict) -> None:
    """A task the harness can run on a user file; else a ConfigError saying which are valid and why."""
    if task in USER_TASKS:
        return
    if task == "lm":
        raise ConfigError(
            "task 'lm' on a data file has only a loss, no per-example score to compare methods with intervals; "
            f"bench --data FILE runs {', '.join(USER_TASKS)} (use peftlab train --task lm for a language model)"
        )
    raise ConfigError(
        f"task {task!r} with the data file {Path(data['file']).name}: valid tasks for a data file: "
        f"{', '.join(USER_TASKS)} (built-in tasks such as sst2 read a data folder, not a file)"
    )


def _hold_out(rows: list, share: float, seed: int, source: str, what: str) -> tuple[list, list]:
    n_out = max(1, round(share * len(rows)))
    if len(rows) - n_out < 1:
        raise ConfigError(
            f"{source}: {len(rows)} training rows leave none to train on after the {what} split"
        )
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_out])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


class UserTask:
    """One task on a user file, with the interface of :class:`peftlab.bench.tasks.Task` (load, chance,
    model_kwargs, batches, evaluate). ``prepare`` (called by ``load``) reads and encodes the file once with
    the run's tokenizer."""

    def __init__(self, name: str, data: dict, model: str, max_length: int):
        check_task(name, data)
        self.name, self.data, self.model, self.max_length = name, data, model, max_length
        self.kind, self.metric = USER_TASKS[name]
        self.splits: dict[str, list] | None = None
        self.prepared = None

    # ---- data ----

    def tokenizer(self):
        import transformers

        from ..util.models import resolve_model_path

        tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_model_path(self.model))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def prepare(self, tokenizer=None) -> None:
        """Read and encode the file into train / dev / test rows (module docstring)."""
        if self.splits is not None:
            return
        from ..data import prepare
        from ..data.sft import EXACT_MATCH_MAX_TOKENS

        tokenizer = tokenizer or self.tokenizer()
        d = self.data
        prepared = prepare(
            self.name,
            tokenizer,
            d["file"],
            eval_data=d.get("eval_file"),
            eval_split=d.get("eval_split") if d.get("eval_file") is None else None,
            text_column=d.get("text_column"),
            label_column=d.get("label_column"),
            max_length=self.max_length,
            seed=0,
        )

        def rows(dataset: ExampleDataset) -> list:
            meta = dataset.meta or [{}] * len(dataset)
            return list(zip(dataset.examples, dataset.lengths, meta))

        test = rows(prepared.eval)
        if self.name == "sft":
            missing = sum(not m.get("reference") for _, _, m in test)
            if missing:
                raise ConfigError(
                    f"{prepared.sources['eval']}: {missing} eval row(s) have no final response to score; "
                    "every eval conversation must end with an assistant turn"
                )
            longest = max(
                len(tokenizer(m["reference"], add_special_tokens=False)["input_ids"]) for _, _, m in test
            )
            if longest > EXACT_MATCH_MAX_TOKENS:
                raise ConfigError(
                    f"{prepared.sources['eval']}: bench --task sft scores the exact match of short responses "
                    f"(at most {EXACT_MATCH_MAX_TOKENS} tokens); the longest reference has {longest}. For long "
                    "responses use peftlab train --task sft (response loss and perplexity)"
                )
        train, dev = _hold_out(rows(prepared.train), DEV_SHARE, 0, d["file"], "dev")
        self.splits = {"train": train, "dev": dev, "test": test}
        self.prepared = prepared

    def load(self, folder=None, split: str = "train", limit: int | None = None, seed: int = 0) -> list:
        """Rows of ``split`` (train / dev / test); ``limit`` samples that many (seeded), as Task.load does."""
        self.prepare()
        rows = self.splits[split]
        if limit and limit < len(rows):
            rows = random.Random(seed).sample(rows, limit)
        return rows

    def chance(self, rows: list) -> float:
        """A constant guess's metric: the majority label's (or reference answer's) share; 0 for entity F1."""
        if self.name == "tokens" or not rows:
            return 0.0
        values = (
            [e["labels"] for e, _, _ in rows]
            if self.name == "classify"
            else [m["reference"] for _, _, m in rows]
        )
        return max(values.count(v) for v in set(values)) / len(values)

    def model_kwargs(self) -> dict:
        self.prepare()
        return self.prepared.model_kwargs()

    # ---- batching ----

    @staticmethod
    def dataset(rows: list) -> ExampleDataset:
        return ExampleDataset([e for e, _, _ in rows], [n for _, n, _ in rows], [m for _, _, m in rows])

    def batches(
        self,
        tokenizer,
        rows: list,
        batch_size: int,
        max_length: int,
        seed: int | None,
        group_by_length: bool = True,
    ) -> Iterator[dict]:
        """One epoch of batches (shuffled and length-grouped when ``seed`` is given, as the built-in tasks)."""
        dataset = self.dataset(rows)
        for indices in batch_order(dataset.lengths, batch_size, seed, group_by_length):
            yield self.prepared.collator([dataset[i] for i in indices])

    # ---- scoring ----

    @torch.no_grad()
    def evaluate(
        self, model, tokenizer, rows: list, batch_size: int, max_length: int, examples: dict | None = None
    ) -> dict[str, float]:
        """The task's metrics on ``rows``; ``examples`` gets the per-example columns of the paired bootstrap
        (``correct`` for accuracy and exact match, ``tp``/``n_pred``/``n_ref`` for entity F1)."""
        from ..data import classify, sft
        from ..data import tokens as token_task

        dataset, collator = self.dataset(rows), self.prepared.collator
        was_training = model.training
        model.eval()
        try:
            if self.name == "classify":
                preds = classify.predict(model, dataset, collator, batch_size)
                refs = [e["labels"] for e in dataset.examples]
                correct = [int(p == r) for p, r in zip(preds, refs)]
                columns = {"prediction": preds, "correct": correct}
                scores = {"accuracy": sum(correct) / len(correct), "macro_f1": classify.macro_f1(preds, refs)}
            elif self.name == "tokens":
                preds = token_task.predict(model, dataset, collator, self.prepared.labels, batch_size)
                spans = [(entities(p), entities(m["tags"])) for p, m in zip(preds, dataset.meta)]
                columns = {
                    "tp": [len(p & r) for p, r in spans],
                    "n_pred": [len(p) for p, _ in spans],
                    "n_ref": [len(r) for _, r in spans],
                }
                tp, n_pred, n_ref = (sum(columns[c]) for c in ("tp", "n_pred", "n_ref"))
                precision, recall = tp / n_pred if n_pred else 0.0, tp / n_ref if n_ref else 0.0
                f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
                scores = {"precision": precision, "recall": recall, "f1": f1}
            else:
                tok = self.prepared.tokenizer
                longest = max(
                    len(tok(m["reference"], add_special_tokens=False)["input_ids"]) for m in dataset.meta
                )
                correct, _ = sft.exact_matches(model, tok, dataset.meta, longest, batch_size)
                columns = {"correct": correct}
                scores = {"exact_match": sum(correct) / len(correct)}
        finally:
            model.train(was_training)
        if examples is not None:
            examples.update(columns)
        return scores


def check_specs(specs: list[dict]) -> None:
    """Read and encode every (task, data file, model) of a sweep once, before any run starts, so a missing file,
    a wrong column or a bad value stops the sweep with one line naming it (instead of failing every run)."""
    seen = set()
    for spec in specs:
        data = spec.get("data")
        if not isinstance(data, dict):
            continue
        key = (spec["task"], tuple(sorted(data.items())), spec["model"], spec["train"]["max_length"])
        if key not in seen:
            seen.add(key)
            UserTask(spec["task"], data, spec["model"], spec["train"]["max_length"]).prepare()


__all__ = ["USER_TASKS", "check_specs", "DATA_KEYS", "UserTask", "normalize", "check_task", "looks_like_file"]
