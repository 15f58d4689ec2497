"""peftlab.data: your own data files as training batches, for ``transformers.Trainer`` or peftlab's loop.

    import peftlab, peftlab.data
    model, tokenizer = peftlab.load_model("minilm-l6", kind="seq-cls", num_labels=2)
    data = peftlab.data.prepare("classify", tokenizer, "reviews.csv", eval_split=0.1)

Modules: :mod:`.readers` (CSV / TSV / JSONL / Parquet through ``datasets``), :mod:`.collate` (padding
collator, length-grouped batches), one module per task (:mod:`.classify`, :mod:`.tokens`, :mod:`.sft`,
:mod:`.lm`), :mod:`.task` (``prepare`` and :class:`TaskData`). Malformed data raises :class:`DataError`
(a :class:`peftlab.ConfigError`) naming the file, row, column and value.
"""

from .collate import IGNORE_INDEX, Collator, ExampleDataset, batch_order, batches
from .errors import DataError
from .readers import load_splits, read_table
from .task import DEFAULT_MAX_LENGTH, MODEL_KINDS, TASKS, TaskData, prepare

__all__ = [
    "TASKS",
    "MODEL_KINDS",
    "DEFAULT_MAX_LENGTH",
    "IGNORE_INDEX",
    "DataError",
    "ExampleDataset",
    "Collator",
    "TaskData",
    "prepare",
    "read_table",
    "load_splits",
    "batches",
    "batch_order",
]
