"""One entry point: ``prepare(task, tokenizer, data, ...)`` -> :class:`TaskData` (datasets, collator, metrics).

    data = peftlab.data.prepare("classify", tokenizer, "reviews.csv", eval_split=0.1)
    model, _ = peftlab.load_model("minilm-l6", kind=data.kind, **data.model_kwargs())
    # transformers.Trainer:  Trainer(model, args, train_dataset=data.train, data_collator=data.collator)
    # peftlab's loop:        peftlab.training.loop.train(model, data.batches(batch_size=32), steps, lr)
    print(data.evaluate(model))

Tasks: ``classify`` (:mod:`.classify`), ``tokens`` (:mod:`.tokens`), ``sft`` (:mod:`.sft`), ``lm`` (:mod:`.lm`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import classify, lm, sft, tokens
from .collate import Collator, ExampleDataset, batches
from .errors import DataError
from .readers import load_splits, numbered

TASKS = ("classify", "tokens", "sft", "lm")
MODEL_KINDS = {"classify": "seq-cls", "tokens": "token-cls", "sft": "causal-lm", "lm": "causal-lm"}
DEFAULT_MAX_LENGTH = {"classify": 128, "tokens": 128, "sft": 512, "lm": 512}
#: the metric each task selects on (higher is better; for sft without exact match and lm: minus the loss)
METRICS = {"classify": "accuracy", "tokens": "f1", "sft": "exact_match", "lm": "loss"}


@dataclass
class TaskData:
    """Encoded training (and eval) data of one task, with its collator and metrics."""

    task: str
    tokenizer: object
    train: ExampleDataset
    eval: ExampleDataset | None
    collator: Collator
    labels: list | None = None
    exact_match: bool | None = None
    sources: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """The model head :func:`peftlab.load_model` needs: seq-cls, token-cls or causal-lm."""
        return MODEL_KINDS[self.task]

    def model_kwargs(self) -> dict:
        """``num_labels``, ``id2label``, ``label2id`` for classification heads; {} for causal LMs."""
        if self.labels is None:
            return {}
        names = [str(label) for label in self.labels]
        return {
            "num_labels": len(names),
            "id2label": dict(enumerate(names)),
            "label2id": {n: i for i, n in enumerate(names)},
        }

    def batches(self, batch_size: int, seed: int = 0, group_by_length: bool = True, skip: int = 0) -> Iterator[dict]:
        """Endless shuffled training batches for :func:`peftlab.training.loop.train` (see :func:`.collate.batches`)."""
        return batches(self.train, self.collator, batch_size, seed, group_by_length, skip)

    def evaluate(self, model, dataset: ExampleDataset | None = None, batch_size: int = 32) -> dict:
        """The task's metrics of ``model`` on ``dataset`` (default: the eval set)."""
        dataset = dataset if dataset is not None else self.eval
        if dataset is None:
            raise DataError("no eval data: give an eval file (--eval-data) or a fraction (--eval-split)")
        was_training = model.training
        model.eval()
        try:
            if self.task == "classify":
                return classify.evaluate(model, dataset, self.collator, batch_size)
            if self.task == "tokens":
                return tokens.evaluate(model, dataset, self.collator, self.labels, batch_size)
            if self.task == "sft":
                return sft.evaluate(model, self.tokenizer, dataset, self.collator, max(1, batch_size // 4), self.exact_match)
            return lm.evaluate(model, dataset, self.collator, max(1, batch_size // 4))
        finally:
            model.train(was_training)

    def score(self, metrics: dict) -> float:
        """The selection metric of ``metrics`` (higher is better)."""
        if self.task in ("classify", "tokens"):
            return metrics[METRICS[self.task]]
        if "exact_match" in metrics:
            return metrics["exact_match"]
        return -metrics.get("response_loss", metrics.get("loss"))


def _table(data, name: str):
    """A datasets.Dataset from a list of dicts or a Dataset (for Python callers), numbered."""
    try:
        import datasets
    except ImportError as err:
        raise DataError("peftlab.data needs the datasets package: pip install datasets") from err
    if isinstance(data, list):
        if not data or not all(isinstance(r, dict) for r in data):
            raise DataError(f"{name}: a list of rows must be a non-empty list of dicts (column -> value)")
        data = datasets.Dataset.from_list(data)
    if not hasattr(data, "column_names"):
        raise DataError(f"{name}: expected a file path, a datasets.Dataset or a list of dicts, got {type(data).__name__}")
    return numbered(data)


def prepare(
    task: str,
    tokenizer,
    data,
    eval_data=None,
    eval_split: float | None = None,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    max_length: int | None = None,
    seed: int = 0,
    packing: bool = False,
    chat_template: bool = False,
    exact_match: bool | None = None,
) -> TaskData:
    """Read and encode the training (and eval) data of ``task``.

    Args:
        data: a file (CSV, TSV, JSONL, Parquet), a ``datasets.Dataset`` or a list of row dicts.
        eval_data / eval_split: a separate eval set, or the fraction of ``data`` held out (seeded by ``seed``).
        text_column / label_column: override the default columns (see each task's module).
        max_length: tokens per example (default 128 for classify/tokens, 512 for sft/lm).
        packing: sft / lm only: pack training examples into blocks of ``max_length``.
        chat_template: sft only: render prompt/response pairs with the tokenizer's chat template.
        exact_match: sft only: None = when the references are short; True / False = always / never.
    """
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    if packing and task not in ("sft", "lm"):
        raise DataError(f"packing applies to the sft and lm tasks, not {task!r}")
    if chat_template and task != "sft":
        raise DataError(f"chat_template applies to the sft task, not {task!r}")
    max_length = max_length or DEFAULT_MAX_LENGTH[task]
    if isinstance(data, (str, Path)):
        train_table, eval_table = load_splits(data, eval_data, eval_split, seed)
        sources = {"train": str(data), "eval": str(eval_data if eval_data is not None else data)}
    else:
        train_table = _table(data, "data")
        eval_table = _table(eval_data, "eval_data") if eval_data is not None else None
        if eval_split is not None:
            raise DataError("eval_split needs a data file; give eval_data for in-memory rows")
        sources = {"train": "data", "eval": "eval_data"}
    src_train, src_eval = sources["train"], sources["eval"]
    labels = None
    if task in ("classify", "tokens"):
        module = classify if task == "classify" else tokens
        train, labels = module.encode(train_table, tokenizer, src_train, text_column, label_column, None, max_length)
        evalset = (
            module.encode(eval_table, tokenizer, src_eval, text_column, label_column, labels, max_length)[0]
            if eval_table is not None
            else None
        )
    elif task == "sft":
        train = sft.encode(train_table, tokenizer, src_train, max_length, chat_template, packing)
        evalset = sft.encode(eval_table, tokenizer, src_eval, max_length, chat_template) if eval_table is not None else None
    else:
        train = lm.encode(train_table, tokenizer, src_train, text_column, max_length, packing)
        evalset = lm.encode(eval_table, tokenizer, src_eval, text_column, max_length) if eval_table is not None else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("the tokenizer has neither a pad nor an EOS token to pad batches with")
    return TaskData(task, tokenizer, train, evalset, Collator(pad), labels, exact_match, sources)


__all__ = ["TASKS", "MODEL_KINDS", "DEFAULT_MAX_LENGTH", "METRICS", "TaskData", "prepare"]
