"""Generic injection: freeze the base, let a method add its layers, record what was done.

The record (:class:`AdapterState`) lives on the model as ``model.peftlab_adapters`` (a dict
keyed by adapter name), so the model object itself stays a plain ``transformers`` model that
``Trainer``, ``accelerate`` and ``generate`` use unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .config import PeftConfig
from .errors import TargetError, WrapError
from .layers import AdapterLayer
from .targeting import name_matches

STATE_ATTR = "peftlab_adapters"


@dataclass
class AdapterState:
    """What :func:`peftlab.wrap` did to a model for one adapter."""

    config: PeftConfig
    targets: list[str]
    shapes: dict[str, list[int]]
    saved_keys: list[str]
    modules_to_save: list[str] = field(default_factory=list)
    base_model_name: str | None = None
    orig_requires_grad: dict[str, bool] = field(default_factory=dict, repr=False)
    info: dict[str, Any] = field(default_factory=dict)


def adapters(model: nn.Module) -> dict[str, AdapterState]:
    """The adapters on ``model`` (empty dict when it is not wrapped)."""
    return getattr(model, STATE_ATTR, None) or {}


def get_state(model: nn.Module, adapter_name: str | None = None) -> AdapterState:
    """One adapter's state; with ``adapter_name=None`` the only (or last added) adapter."""
    states = adapters(model)
    if not states:
        raise WrapError(
            f"{type(model).__name__} is not wrapped by peftlab; call peftlab.wrap(model, config) first"
        )
    if adapter_name is None:
        return list(states.values())[-1]
    if adapter_name not in states:
        raise WrapError(f"no adapter named {adapter_name!r}; this model has: {', '.join(states)}")
    return states[adapter_name]


def get_submodule_parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    return parent, child


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, child = get_submodule_parent(model, path)
    setattr(parent, child, new)


def resolve_modules_to_save(model: nn.Module, names: list[str] | None) -> list[str]:
    """Paths of ``modules_to_save`` (suffix match); an unknown name is an error listing top modules."""
    if not names:
        return []
    paths: list[str] = []
    for name in names:
        hits = [p for p, _ in model.named_modules() if p and name_matches(p, name)]
        # keep only outermost matches (e.g. `classifier`, not `classifier.dense` when both match)
        hits = [p for p in hits if not any(p.startswith(h + ".") for h in hits)]
        if not hits:
            top = [n for n, _ in model.named_children()]
            raise TargetError(
                f"modules_to_save entry {name!r} not found; top-level modules: {', '.join(top)}"
            )
        paths.extend(hits)
    return paths


def wrapped_layers(model: nn.Module, adapter_name: str | None = None):
    """(path, layer) for every AdapterLayer (optionally of one adapter), outermost first."""
    for path, module in model.named_modules():
        if isinstance(module, AdapterLayer) and (adapter_name is None or module.adapter_name == adapter_name):
            yield path, module


def inject(model: nn.Module, config: PeftConfig, method) -> AdapterState:
    """Freeze ``model``, call the method's injection, make ``modules_to_save`` trainable, record it."""
    states = dict(adapters(model))
    if config.adapter_name in states:
        raise WrapError(
            f"this model already has an adapter named {config.adapter_name!r}; pass a different "
            f"adapter_name in the config, or unwrap first"
        )
    orig = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {n for n, _ in model.named_parameters()}
    previous_keys = {k for s in states.values() for k in s.saved_keys}
    for p in model.parameters():
        p.requires_grad_(False)

    to_save = resolve_modules_to_save(model, config.modules_to_save)
    record = method.inject(model, config, skip=to_save)
    model.train(model.training)  # new adapter modules take the model's mode (no dropout in an eval model)
    for path in to_save:
        for p in model.get_submodule(path).parameters():
            p.requires_grad_(True)

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    buffers = [
        f"{path}.{b}" if path else b
        for path, layer in wrapped_layers(model, config.adapter_name)
        for b, _ in layer.named_buffers(recurse=False)
        if b.startswith(layer.prefix)
    ]
    saved = [k for k in trainable + buffers + record.get("extra_keys", []) if k not in previous_keys]
    new_params = {n for n, _ in model.named_parameters()} - before
    state = AdapterState(
        config=config,
        targets=record["targets"],
        shapes=record.get("shapes", {}),
        saved_keys=list(dict.fromkeys(saved)),
        modules_to_save=to_save,
        base_model_name=getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        orig_requires_grad={n: orig.get(n, True) for n in orig if n not in new_params},
        info=record.get("info", {}),
    )
    states[config.adapter_name] = state
    setattr(model, STATE_ATTR, states)
    return state
