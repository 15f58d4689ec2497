"""Sweep files: a YAML grid over model × task × method × method parameters × seeds × training parameters.

```yaml
name: quick
models: [minilm-l6]                 # packaged short names, local paths or hub ids
tasks:                              # names, or {name, models, train} to narrow or override
  - sst2
seeds: [0]
train: {max_steps: 300, batch_size: 32, lr: 1.0e-3, max_length: 64, eval_every: 100, dev_limit: 500}
methods:
  - {method: full, train: {lr: 5.0e-5}}
  - {method: lora, params: {r: [4, 8], alpha: 16}}   # a list is a grid axis
```

Your own data: ``data: reviews.csv`` (or ``{file: reviews.csv, eval_file: test.csv, text_column: review,
label_column: stars}``) with ``tasks: [classify]`` (or ``tokens``, ``sft``): see :mod:`peftlab.bench.user_data`.

Every key is checked against a schema first (:mod:`peftlab.bench.sweep_schema`): an error names the key
and its valid form; numbers YAML reads as strings (``lr: 1e-3``) are read as numbers; ``name`` is a plain
folder name (``runs/<name>``).

Lists in ``params`` and ``train`` are grid axes, except for parameters whose value is itself a
list (``target_modules``, ``modules_to_save``...): give those as a list of lists to sweep them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Any

import yaml

from ..util.errors import ConfigError
from .providers import PROVIDERS
from .sweep_schema import safe_stem, validate
from .tasks import TASKS
from .user_data import USER_TASKS, check_task

SWEEP_KEYS = {"name", "models", "tasks", "methods", "seeds", "train", "data", "device", "order", "pack"}
#: run order: every seed of a method before the next method (default), or every method of a seed first
ORDERS = ("method-major", "seed-major")
TASK_KEYS = {"name", "models", "train"}
METHOD_KEYS = {"method", "params", "train", "label", "models", "tasks"}
TRAIN_KEYS = {
    "max_steps",
    "epochs",
    "batch_size",
    "lr",
    "max_length",
    "eval_every",
    "dev_limit",
    "train_limit",
    "test_limit",
    "eval_batch_size",
    "warmup_ratio",
    "weight_decay",
    "device",
    "progress",
    "group_by_length",
    "optimizer",
    "gradient_checkpointing",
    "precision",  # fp32 | bf16 | fp16 (CUDA)
    "grad_accum",  # micro-batches per optimizer step (batch_size stays the global batch)
    "processes",  # > 1: torchrun (CPU) or accelerate launch (GPUs), see peftlab.bench.multiprocess
    "distributed",  # ddp | fsdp
}
LIST_VALUED = {"target_modules", "modules_to_save", "layers", "skip_modules"}
TRAIN_DEFAULTS = {"batch_size": 32, "lr": 1e-3, "max_length": 64, "max_steps": 300}


def _unknown(found: set, valid: set, where: str) -> None:
    extra = sorted(found - valid)
    if extra:
        raise ConfigError(f"unknown key(s) {extra} in {where}; valid keys: {', '.join(sorted(valid))}")


def _axes(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Expand list values into a grid (list-valued parameters only when given as a list of lists)."""
    keys, choices = [], []
    for key, value in values.items():
        if isinstance(value, list) and (key not in LIST_VALUED or (value and isinstance(value[0], list))):
            keys.append(key)
            choices.append(value)
        else:
            keys.append(key)
            choices.append([value])
    return [dict(zip(keys, combo)) for combo in itertools.product(*choices)] or [{}]


def run_id(spec: dict) -> str:
    """A stable id from everything that defines the run (resume skips ids already in results.jsonl).

    Hashes model, task, method, params, train and seed, plus the ``label`` when it is not the method's
    name (two entries that differ only by label are two runs) and the ``data`` source when one is given
    (``--data hf`` never reuses a local-data result). Those two join the hash only when set, so the
    ids of runs recorded before they were added stay the same.
    """
    fields = {k: spec[k] for k in ("model", "task", "method", "params", "train", "seed")}
    if spec.get("label") not in (None, spec["method"]):
        fields["label"] = spec["label"]
    if spec.get("data"):
        data = spec["data"]
        fields["data"] = json.dumps(data, sort_keys=True) if isinstance(data, dict) else str(data)
    blob = json.dumps(fields, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def expand(sweep: dict) -> list[dict]:
    """Validate a sweep dict and expand it into run specs."""
    if not isinstance(sweep, dict):
        raise ConfigError(f"a sweep is a mapping with keys {sorted(SWEEP_KEYS)}, got {type(sweep).__name__}")
    _unknown(set(sweep), SWEEP_KEYS, "the sweep")
    sweep = validate(sweep, TRAIN_KEYS, TASK_KEYS, METHOD_KEYS)
    base_train = {**TRAIN_DEFAULTS, **(sweep.get("train") or {})}
    _unknown(set(base_train), TRAIN_KEYS, "train")
    specs = []
    for task_entry in sweep["tasks"]:
        task = {"name": task_entry} if isinstance(task_entry, str) else dict(task_entry)
        _unknown(set(task), TASK_KEYS, f"task {task.get('name')!r}")
        if isinstance(sweep.get("data"), dict):  # a user data file: classify, tokens or sft
            check_task(task["name"], sweep["data"])
        elif task["name"] not in TASKS:
            raise ConfigError(
                f"unknown task {task['name']!r}; valid tasks: {', '.join(TASKS)}, or {', '.join(USER_TASKS)} with a "
                "data file (--data FILE / data: FILE)"
            )
        _unknown(set(task.get("train") or {}), TRAIN_KEYS, f"train of task {task['name']!r}")
        for method_entry in sweep["methods"]:
            method = {"method": method_entry} if isinstance(method_entry, str) else dict(method_entry)
            _unknown(set(method), METHOD_KEYS, f"method {method.get('method')!r}")
            if method.get("method") not in PROVIDERS:
                raise ConfigError(
                    f"unknown method {method.get('method')!r}; valid methods: {', '.join(PROVIDERS)}"
                )
            _unknown(set(method.get("train") or {}), TRAIN_KEYS, f"train of method {method['method']!r}")
            if method.get("tasks") and task["name"] not in method["tasks"]:
                continue
            models = task.get("models") or sweep["models"]
            if method.get("models"):
                models = [m for m in models if m in method["models"]]
            train = {**base_train, **(task.get("train") or {}), **(method.get("train") or {})}
            if sweep.get("device"):
                train.setdefault("device", sweep["device"])
            for model, params, train_point, seed in itertools.product(
                models, _axes(method.get("params") or {}), _axes(train), sweep.get("seeds") or [0]
            ):
                spec = {
                    "sweep": sweep.get("name", "sweep"),
                    "model": model,
                    "task": task["name"],
                    "method": method["method"],
                    "label": method.get("label") or method["method"],
                    "params": params,
                    "train": train_point,
                    "seed": seed,
                    # the effective source ($PEFTLAB_DATA included), so it is part of the run id
                    "data": sweep.get("data") or os.environ.get("PEFTLAB_DATA") or None,
                }
                spec["run_id"] = run_id(spec)
                specs.append(spec)
    order = sweep.get("order", "method-major")
    if order not in ORDERS:
        raise ConfigError(f"order: {order!r} is not one of {', '.join(ORDERS)}")
    if order == "seed-major":  # every method's seed 0 first: a sweep cut short still compares all methods
        specs.sort(key=lambda s: s["seed"])  # stable: the methods keep their order within a seed
    return specs


def load_sweep(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} not found")
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"sweep file {path} must hold a mapping with keys {sorted(SWEEP_KEYS)}")
    data.setdefault("name", safe_stem(path.stem))
    return data


def read_yaml(path: str | Path):
    """Parse a YAML file; a syntax error is a one-line :class:`ConfigError` naming ``file:line:column``."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context = getattr(exc, "context", None)
        raise ConfigError(
            f"{where}: invalid YAML: {problem}" + (f" ({context})" if context else "")
        ) from None
