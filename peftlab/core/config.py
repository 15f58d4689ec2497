"""Base configuration shared by every PEFT method.

Each method defines a dataclass that subclasses :class:`PeftConfig` and sets a unique ``method`` name;
its :class:`~peftlab.core.registry.Method` entry carries the class. Configs round-trip
through JSON (``to_dict`` / ``PeftConfig.from_dict``) and validate in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..util.errors import ConfigError
from .registry import config_class, method_names

ADAPTER_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
ADAPTER_NAME_MAX = 64
RESERVED_NAMES = ("__base__", "base_layer", "weight", "bias")
_REGEX_CHARS = set("^$*+?()[]{}|\\")


def _attribute_names() -> frozenset[str]:
    """Names an adapter may not take: attributes of the dicts and modules its tensors live in."""
    from torch import nn

    names: set[str] = set()
    for cls in (nn.Module, nn.ModuleDict, nn.ParameterDict):
        names.update(dir(cls))
    names.update(("training", "forward", "keys", "items", "values", "update", "pop", "clear", "slots", "active"))
    names.update(("weights", "disabled", "merged_stack", "router", "base_layer"))
    return frozenset(n for n in names if not n.startswith("__"))


_ATTRIBUTE_NAMES: frozenset[str] | None = None


def check_adapter_name(name: Any) -> str:
    """A valid adapter name: 1-64 letters, digits, ``_`` and ``-``, not starting with a digit, not reserved,
    and not an attribute of the modules that hold adapter tensors (``forward``, ``keys``, ``training``...)."""
    global _ATTRIBUTE_NAMES
    if _ATTRIBUTE_NAMES is None:
        _ATTRIBUTE_NAMES = _attribute_names()
    rule = (
        f"use 1-{ADAPTER_NAME_MAX} letters, digits, '_' and '-', starting with a letter or '_' "
        f"(e.g. 'sst2_lora')"
    )
    if not isinstance(name, str):
        raise ConfigError(f"invalid adapter name {name!r} ({type(name).__name__}): a name is a string; {rule}")
    if not name or len(name) > ADAPTER_NAME_MAX:
        raise ConfigError(f"invalid adapter name {name[:80]!r}: {len(name)} characters; {rule}")
    if not ADAPTER_NAME_RE.fullmatch(name):
        raise ConfigError(f"invalid adapter name {name!r}: {rule} (no '.', '/', spaces or other characters)")
    if name in RESERVED_NAMES or name.startswith("__"):
        raise ConfigError(
            f"invalid adapter name {name!r}: reserved ({', '.join(RESERVED_NAMES)} and '__' names); {rule}"
        )
    if name in _ATTRIBUTE_NAMES:
        raise ConfigError(
            f"invalid adapter name {name!r}: it is an attribute name of the modules that hold adapter tensors "
            f"(like forward, keys, training, to, state_dict); choose another name, e.g. {name + '_adapter'!r}"
        )
    return name


def check_int(owner: str, name: str, value: Any, low: int | None = None, allow_none: bool = False) -> None:
    """``value`` is an int (not a bool) ≥ ``low``; else a ConfigError naming the field and what is valid."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        bound = f" ≥ {low}" if low is not None else ""
        raise ConfigError(f"{owner} {name} must be an integer{bound}, got {value!r} ({type(value).__name__})")


def check_number(
    owner: str,
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """``value`` is a finite real number (not a bool, not a string) in the given interval."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ConfigError(
            f"{owner} {name} must be a finite number in {interval}, got {value!r} ({type(value).__name__})"
        )


def check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{owner} {name} must be True or False, got {value!r} ({type(value).__name__})")


def _check_regex(what: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(
            f"{what} {pattern!r} is not a valid regular expression ({exc}); give a module name such as 'q_proj' "
            f"or a regex such as r'.*\\.q_proj' (escape '(', '[', '.' with a backslash)"
        ) from None


@dataclass
class PeftConfig:
    """Fields every method has.

    Args:
        target_modules: which modules get an adapter. A list of names (each matches a module
            path exactly or as a dotted suffix, e.g. ``"query"`` matches
            ``bert.encoder.layer.0.attention.self.query``), a regex string matched in full
            against module paths, ``"all-linear"``, or ``None`` for the architecture default.
        modules_to_save: modules (suffix match) kept fully trainable and saved with the
            adapter, e.g. a freshly initialised classifier head.
        adapter_name: the adapter's name; wrapping twice with the same name is an error.
    """

    method: ClassVar[str] = ""

    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    adapter_name: str = "default"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules) if isinstance(self.target_modules, set) else list(
                self.target_modules
            )
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            if not (_REGEX_CHARS & set(self.target_modules)):  # a plain name, not a regex
                self.target_modules = [self.target_modules]
        if isinstance(self.target_modules, list):
            bad = [t for t in self.target_modules if not isinstance(t, str) or not t]
            if bad:
                raise ConfigError(
                    f"target_modules entries must be non-empty module names (strings), got {bad!r}; e.g. "
                    f"['q_proj', 'v_proj'], a regex string, 'all-linear' or None"
                )
        if self.target_modules is not None and not isinstance(self.target_modules, (str, list)):
            raise ConfigError(
                f"target_modules must be a list of names, a regex string, 'all-linear' or None; "
                f"got {type(self.target_modules).__name__}"
            )
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ConfigError("target_modules is an empty list; give at least one module name or None")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if self.modules_to_save is not None:
            if not isinstance(self.modules_to_save, list) or not all(isinstance(m, str) and m for m in self.modules_to_save):
                raise ConfigError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
        check_adapter_name(self.adapter_name)
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            _check_regex("target_modules", self.target_modules)
        for f in dataclasses.fields(self):  # per-module overrides keyed by name or regex (rank_pattern...)
            value = getattr(self, f.name, None)
            if f.name.endswith("_pattern") and isinstance(value, dict):
                for key in value:
                    if not isinstance(key, str) or not key:
                        raise ConfigError(f"{f.name} keys must be module names or regexes (strings), got {key!r}")
                    _check_regex(f"{f.name} key", key)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with a ``method`` key."""
        out = {"method": self.method}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            out[f.name] = getattr(self, f.name)
        return out

    @staticmethod
    def from_dict(data: dict[str, Any]) -> PeftConfig:
        """Rebuild a config from :meth:`to_dict` output; unknown keys are an error that names them."""
        if not isinstance(data, dict):
            raise ConfigError(f"an adapter config is a JSON object with a 'method' key, got {type(data).__name__}")
        data = dict(data)
        method = data.pop("method", None)
        if method is None:
            raise ConfigError(f"adapter config has no 'method' key; valid methods: {', '.join(method_names())}")
        cls = config_class(method)
        names = {f.name for f in dataclasses.fields(cls) if f.init and f.name != "extra"}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"unknown keys for method {method!r}: {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}"
            )
        try:
            return cls(**data)
        except ConfigError:
            raise
        except (TypeError, AttributeError, ValueError, KeyError) as exc:  # a value of the wrong type, hand-edited
            raise ConfigError(
                f"adapter config for method {method!r} has a value of the wrong type ({type(exc).__name__}: {exc}); "
                f"valid keys: {', '.join(sorted(names))}"
            ) from None

    def replace(self, **changes: Any) -> PeftConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
