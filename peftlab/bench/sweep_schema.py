"""The sweep file's schema: every key's type and valid form, checked before anything runs.

Every error names the key (``methods[1].train.lr``) and shows its valid form. Numbers that YAML reads as
strings (``lr: 1e-3``: YAML 1.1 needs a dot, ``1.0e-3``) are read as numbers. Sweep names become folder
names (``runs/<name>``), so they are plain names: no separator, no ``..``. ``data:`` is a data folder,
``hf`` / ``hf:<dataset id>``, or your own data file (a path, or a mapping ``{file, eval_file | eval_split,
text_column, label_column}``, checked by :func:`peftlab.bench.user_data.normalize`).
"""

from __future__ import annotations

import math
import re
from typing import Any

from ..util.errors import ConfigError

#: a sweep name: a plain folder name
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
_NUMBER_RE = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")

INT_KEYS = {"max_steps", "epochs", "batch_size", "max_length", "eval_every", "dev_limit", "train_limit",
            "test_limit", "eval_batch_size", "grad_accum", "processes"}
FLOAT_KEYS = {"lr", "warmup_ratio", "weight_decay"}
BOOL_KEYS = {"progress", "group_by_length", "gradient_checkpointing"}
CHOICES = {"precision": ("fp32", "bf16", "fp16"), "distributed": ("ddp", "fsdp")}
EXAMPLES = {
    "models": "models: [minilm-l6]",
    "tasks": "tasks: [sst2]",
    "methods": "methods: [lora, {method: lora, params: {r: [4, 8]}}]",
    "seeds": "seeds: [0, 1, 2]",
    "train": "train: {max_steps: 300, lr: 1.0e-3}",
    "params": "params: {r: [4, 8], alpha: 16}",
}


def sweep_name(name: Any, where: str = "name") -> str:
    """A sweep or run name that is a plain folder name (``runs/<name>`` never leaves ``runs/``)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"{where}: {name!r} is not a valid sweep name; use 1-64 letters, digits, '_', '-' and '.', starting "
            f"with a letter or digit, no '/' and no '..' (e.g. name: quick-lora)"
        )
    return name


def safe_stem(stem: str) -> str:
    """A sweep name made from a file name: characters outside the allowed set become '-'."""
    name = re.sub(r"[^A-Za-z0-9_.\-]", "-", stem).replace("..", "-").lstrip("-_.")[:64]
    return name or "sweep"


def number(value: Any) -> Any:
    """A string that is a number (``"1e-3"``) as that number; anything else unchanged."""
    if isinstance(value, str) and _NUMBER_RE.fullmatch(value.strip()):
        text = value.strip()
        return int(text) if re.fullmatch(r"[+-]?\d+", text) else float(text)
    return value


def _list_of_strings(value: Any, key: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{key}: must be a non-empty list of names, got {value!r}; e.g. {EXAMPLES.get(key, key + ': [a, b]')}")
    return value


def _mapping(value: Any, key: str, example: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: must be a mapping, got {value!r} ({type(value).__name__}); e.g. {example}")
    return value


def _train_value(key: str, name: str, value: Any) -> Any:
    value = number(value)
    if value is None:  # null: the default
        return value
    if name in INT_KEYS:
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name.endswith("limit") else 1):
            raise ConfigError(f"{key}: must be a whole number{' ≥ 1' if not name.endswith('limit') else ' ≥ 0'}, got {value!r}")
    elif name in FLOAT_KEYS:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"{key}: must be a finite number ≥ 0 (e.g. {name}: 1.0e-3), got {value!r}")
    elif name in BOOL_KEYS:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
    elif name in CHOICES:
        if value not in CHOICES[name]:
            raise ConfigError(f"{key}: must be one of {', '.join(CHOICES[name])}, got {value!r}")
    elif not isinstance(value, str):
        raise ConfigError(f"{key}: must be a string, got {value!r}")
    return value


def train_block(value: Any, key: str, valid: set[str]) -> dict:
    """A ``train:`` mapping with every value checked; a list is a grid axis of such values."""
    block = _mapping(value, key, EXAMPLES["train"])
    extra = sorted(set(block) - valid, key=str)
    if extra:
        raise ConfigError(f"unknown key(s) {extra} in {key}; valid keys: {', '.join(sorted(valid))}")
    out = {}
    for name, v in block.items():
        if isinstance(v, list):
            if not v:
                raise ConfigError(f"{key}.{name}: an empty list (a grid axis needs at least one value)")
            out[name] = [_train_value(f"{key}.{name}[{i}]", name, x) for i, x in enumerate(v)]
        else:
            out[name] = _train_value(f"{key}.{name}", name, v)
    return out


def params_block(value: Any, key: str) -> dict:
    block = _mapping(value, key, EXAMPLES["params"])
    bad = [k for k in block if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{key}: parameter names are strings, got {bad!r}; e.g. {EXAMPLES['params']}")
    return {k: [number(x) for x in v] if isinstance(v, list) else number(v) for k, v in block.items()}


def validate(sweep: dict, train_keys: set[str], task_keys: set[str], method_keys: set[str]) -> dict:
    """A checked copy of ``sweep`` (numbers in strings read as numbers); raises ConfigError naming the key."""
    out = dict(sweep)
    if "name" in out:
        sweep_name(out["name"])
    for key in ("models", "tasks", "methods"):
        if not out.get(key):
            raise ConfigError(f"the sweep needs a non-empty '{key}' list; e.g. {EXAMPLES[key]}")
    out["models"] = _list_of_strings(out["models"], "models")
    if "seeds" in out and out["seeds"] is not None:
        seeds = out["seeds"]
        seeds = [number(s) for s in seeds] if isinstance(seeds, list) else seeds
        if not isinstance(seeds, list) or not seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds
        ):
            raise ConfigError(f"seeds: must be a non-empty list of whole numbers ≥ 0, got {out['seeds']!r}; e.g. {EXAMPLES['seeds']}")
        out["seeds"] = seeds
    if out.get("pack") is not None:
        pack = number(out["pack"])
        if isinstance(pack, bool) or not isinstance(pack, int) or pack < 1:
            raise ConfigError(f"pack: must be a whole number ≥ 1 (runs trained together in one process), got "
                              f"{out['pack']!r}; e.g. pack: 4")
        out["pack"] = pack
    out["train"] = train_block(out.get("train"), "train", train_keys)
    if out.get("device") is not None and not isinstance(out["device"], str):
        raise ConfigError(f"device: must be a string, got {out['device']!r}")
    if out.get("data") is not None:  # a folder / hf source, or a data file (peftlab.bench.user_data)
        from .user_data import normalize

        out["data"] = normalize(out["data"])
    if not isinstance(out["tasks"], list):
        raise ConfigError(f"tasks: must be a list, got {out['tasks']!r}; e.g. {EXAMPLES['tasks']}")
    tasks = []
    for i, entry in enumerate(out["tasks"]):
        where = f"tasks[{i}]"
        if isinstance(entry, str):
            tasks.append(entry)
            continue
        entry = dict(_mapping(entry, where, "{name: sst2, train: {max_steps: 100}}"))
        extra = sorted(set(entry) - task_keys, key=str)
        if extra:
            raise ConfigError(f"unknown key(s) {extra} in {where}; valid keys: {', '.join(sorted(task_keys))}")
        if not isinstance(entry.get("name"), str):
            raise ConfigError(f"{where}.name: must be a task name (a string), got {entry.get('name')!r}")
        if entry.get("models") is not None:
            _list_of_strings(entry["models"], f"{where}.models")
        entry["train"] = train_block(entry.get("train"), f"{where}.train", train_keys)
        tasks.append(entry)
    out["tasks"] = tasks
    if not isinstance(out["methods"], list):
        raise ConfigError(f"methods: must be a list, got {out['methods']!r}; e.g. {EXAMPLES['methods']}")
    methods = []
    for i, entry in enumerate(out["methods"]):
        where = f"methods[{i}]"
        if isinstance(entry, str):
            methods.append(entry)
            continue
        entry = dict(_mapping(entry, where, "{method: lora, params: {r: 8}}"))
        extra = sorted(set(entry) - method_keys, key=str)
        if extra:
            raise ConfigError(f"unknown key(s) {extra} in {where}; valid keys: {', '.join(sorted(method_keys))}")
        if not isinstance(entry.get("method"), str):
            raise ConfigError(f"{where}.method: must be a method name (a string), got {entry.get('method')!r}")
        if entry.get("label") is not None and (not isinstance(entry["label"], str) or not entry["label"]):
            raise ConfigError(f"{where}.label: must be a non-empty string, got {entry['label']!r}")
        for key in ("models", "tasks"):
            if entry.get(key) is not None:
                _list_of_strings(entry[key], f"{where}.{key}")
        entry["params"] = params_block(entry.get("params"), f"{where}.params")
        entry["train"] = train_block(entry.get("train"), f"{where}.train", train_keys)
        methods.append(entry)
    out["methods"] = methods
    return out
