"""Merging and unmerging several adapters as one all-or-nothing step.

Everything is checked before any weight is written (unknown or already-merged adapters, adapters that cannot
be folded, NaN/inf in the result); if a step still fails half-way, the steps already done are undone in
reverse, so the model is left exactly as it was. Slots go through :class:`~peftlab.core.layer.AdapterLayer`;
methods that are not slots (prefix tuning) through their ``merge`` / ``unmerge`` / ``is_merged`` hooks.

The merged-state rule (one rule everywhere; see :func:`peftlab.set_active_adapters`): an adapter's merged
update lives in the base weights, so any call that changes whether or how strongly a merged adapter runs
(switching it off, reweighting it, disabling it, deleting it) first unmerges it, and
:func:`merged_weights` always tells what the base weights hold.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from torch import nn

from ..util.errors import MergeError
from .registry import get_method
from .state import adapter_layers, adapters, get_state, wrapped_layers


def is_merged(model: nn.Module, name: str) -> bool:
    state = get_state(model, name)
    method = get_method(state.config.method)
    if method.is_merged is not None:
        return bool(method.is_merged(state))
    return any(layer.is_merged(name) for _, layer in wrapped_layers(model, name))


def merged_weights(model: nn.Module) -> dict[str, float]:
    """{adapter name: the weight it is merged with} for every merged adapter (prefix tables: 1.0)."""
    out: dict[str, float] = {}
    for state in adapters(model).values():
        method = get_method(state.config.method)
        if method.is_merged is not None and method.is_merged(state):
            out[state.name] = 1.0
    for _, layer in adapter_layers(model):
        for name, weight in layer.merged_stack:
            out.setdefault(name, weight)
    return out


def check_merge(model: nn.Module, names: Sequence[str], safe: bool = True) -> None:
    """Raise :class:`MergeError` unless every adapter in ``names`` can be merged now (touches nothing)."""
    for name in names:
        state = get_state(model, name)
        method = get_method(state.config.method)
        if is_merged(model, name):
            raise MergeError(f"adapter {name!r} is already merged; call unmerge(model, {name!r}) first")
        if method.merge is not None:
            continue
        if not method.folds_into_base:
            raise MergeError(
                f"{method.name} adapter {name!r} can't be folded into the base weights; keep it unmerged for "
                f"inference, or unwrap(merge=False) to remove it"
            )
        layers = [layer for _, layer in wrapped_layers(model, name)]
        bad = [layer for layer in layers if not layer.slots[name].mergeable and not layer.slots[name].replaces_base]
        if bad:
            slot = bad[0].slots[name]
            raise MergeError(
                f"{state.config.method} adapter {name!r} cannot be merged into the base weights "
                f"({type(slot).__name__} is not linear in the input); keep it unmerged for inference"
            )
        if safe:
            for layer in layers:
                if layer.slots[name].mergeable:
                    layer.check_merge(name)


def warn_tied(model: nn.Module, names: Sequence[str]) -> None:
    """Warn when a merge writes into a weight that another module shares (an input embedding tied to the output
    head): the other module changes too, so the merged model computes other outputs than the unmerged one."""
    holders: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for pname, param in module.named_parameters(recurse=False, remove_duplicate=False):
            holders.setdefault(id(param), []).append(f"{path}.{pname}")
    for name in names:
        for path, layer in wrapped_layers(model, name):
            weight = getattr(layer.base_layer, "weight", None)
            slot = layer.slots[name]
            if weight is None or not slot.mergeable or slot.params or slot.keeps_ties:
                continue
            others = [h for h in holders.get(id(weight), []) if not h.startswith(f"{path}.")]
            if others:
                warnings.warn(
                    f"merging adapter {name!r} into {path}.weight also changes {', '.join(others[:2])}, which shares it "
                    f"(tied weights): the merged model's outputs differ from the unmerged one's. Untie them first "
                    f"(e.g. model.config.tie_word_embeddings=False and a copy of the weight for the head), or keep the "
                    f"adapter unmerged",
                    stacklevel=3,
                )


def merge_all(model: nn.Module, names: Sequence[str], safe: bool = True) -> None:
    """Merge every adapter in ``names`` (each with its layers' current weight), or none of them."""
    names = list(dict.fromkeys(names))
    check_merge(model, names, safe)
    warn_tied(model, names)
    done: list = []  # ("method", state) | ("layer", layer, name)
    try:
        for name in names:
            state = get_state(model, name)
            method = get_method(state.config.method)
            if method.merge is not None:
                method.merge(model, state)
                done.append(("method", state, None))
                continue
            for _, layer in wrapped_layers(model, name):
                if layer.slots[name].mergeable:
                    layer.merge(name, safe=False)
                    done.append(("layer", layer, name))
    except BaseException:
        for kind, obj, name in reversed(done):
            if kind == "method":
                get_method(obj.config.method).unmerge(model, obj)
            else:
                obj.unmerge(name)
        raise


def _remerge(layer, name: str, weight: float) -> None:
    saved = layer.weights.get(name)
    layer.weights[name] = weight
    try:
        layer.merge(name, safe=False)
    finally:
        if saved is None:
            layer.weights.pop(name, None)
        else:
            layer.weights[name] = saved


def unmerge_all(model: nn.Module, names: Sequence[str] | None = None) -> list[str]:
    """Unmerge ``names`` (default: every merged adapter, last merged first); returns those unmerged.

    Names that are not merged are skipped. If a step fails, the adapters already unmerged are merged again.
    """
    if names is None:
        candidates = list(adapters(model))
    else:
        candidates = list(dict.fromkeys(names))
    done: list = []
    unmerged: list[str] = []
    try:
        for name in candidates:
            state = get_state(model, name)
            method = get_method(state.config.method)
            if method.unmerge is not None and method.is_merged is not None:
                if method.is_merged(state):
                    method.unmerge(model, state)
                    done.append(("method", state, None, None))
                    unmerged.append(name)
        for _, layer in adapter_layers(model):
            if names is None:
                while layer.merged_stack:
                    top, weight = layer.merged_stack[-1]
                    layer.unmerge()
                    done.append(("layer", layer, top, weight))
                    unmerged.append(top)
            else:
                for name in candidates:
                    if layer.is_merged(name):
                        weight = dict(layer.merged_stack)[name]
                        layer.unmerge(name)
                        done.append(("layer", layer, name, weight))
                        unmerged.append(name)
    except BaseException:
        for kind, obj, name, weight in reversed(done):
            if kind == "method":
                get_method(obj.config.method).merge(model, obj)
            else:
                _remerge(obj, name, weight)
        raise
    return list(dict.fromkeys(unmerged))
