"""Which adapters run and train: the active set with its weights, trainability, and enabling/disabling.

The only place that writes a layer's ``active`` list and ``weights``; methods that are not slots (prefix
tuning) follow through their :class:`~peftlab.core.registry.Method` hooks (``set_active``, ``set_enabled``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

from torch import nn

from ..util.errors import ConfigError, WrapError
from .merging import merge_all, merged_weights, unmerge_all
from .registry import get_method
from .state import ACTIVE_ATTR, adapter_layers, adapters, get_state, wrapped_layers
from .tensors import adapter_tensors


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters on ``model``, in the order they were added."""
    return list(adapters(model))


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters that run in forward."""
    return list(getattr(model, ACTIVE_ATTR, None) or [])


def _check_names(model: nn.Module, names: Sequence[str], what: str = "adapter") -> list[str]:
    states = adapters(model)
    if not states:
        get_state(model)  # raises "not wrapped"
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ConfigError(
            f"{what} names must be a name or a list of names (strings), got {names!r} ({type(names).__name__})"
        )
    unknown = [n for n in names if n not in states]
    if unknown:
        raise WrapError(f"unknown {what} name(s) {unknown}; this model has: {', '.join(states)}")
    return list(dict.fromkeys(names))


def check_weights(weights, count: int, what: str = "adapters") -> list[float]:
    """One finite real number per adapter, as a list or tuple (or a 1-d array or tensor); a string is refused,
    not read one character at a time."""
    if hasattr(weights, "tolist") and getattr(weights, "ndim", None) == 1:  # numpy array, torch tensor
        weights = weights.tolist()
    if isinstance(weights, (str, bytes)) or not isinstance(weights, (list, tuple)):
        raise ConfigError(
            f"weights must be a list of numbers, one per adapter (e.g. [1.0, 0.5]), got {weights!r} "
            f"({type(weights).__name__})"
        )
    out = []
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(float(w)):
            raise ConfigError(f"adapter weights must be finite numbers (e.g. [1.0, 0.5]), got {list(weights)!r}")
        out.append(float(w))
    if len(out) != count:
        raise ConfigError(f"got {len(out)} weights for {count} {what}; give one weight per adapter")
    return out


def set_active_adapters(
    model: nn.Module,
    names: str | Sequence[str],
    weights: Sequence[float] | None = None,
    trainable: str | Sequence[str] | None = None,
) -> nn.Module:
    """Choose which adapters run in forward, and with which weights.

    With several active, their contributions add, each scaled by its weight:
    ``h = W x + Σ_i w_i · Δ_i(x)`` (for LoRA slots ``Δ_i(x) = s_i B_i A_i x``).

    Merged adapters: a merged adapter that this call switches off or gives another weight is unmerged
    first (its update leaves the base weights), so the model always computes exactly what
    :func:`active_adapters` and the weights say; one that stays active with the same weight stays merged.

    All or nothing: if anything fails (an unknown name, a bad weight, a method that refuses the
    combination, e.g. two prefixes), the active set, weights and merged adapters are left as they were.

    Args:
        names: one name or a list; ``[]`` runs the base model.
        weights: a list with one finite number per name (default 1.0 each).
        trainable: names whose parameters train (default: unchanged). See :func:`set_trainable`.
    """
    names = _check_names(model, names)
    weights = [1.0] * len(names) if weights is None else check_weights(weights, len(names), f"adapters {names}")
    if trainable is not None:
        _check_names(model, trainable)
    table = dict(zip(names, weights))
    merged = merged_weights(model)
    stale = [n for n, w in merged.items() if n not in table or table[n] != w]
    states = adapters(model)
    prev_attr = getattr(model, ACTIVE_ATTR, None)
    prev_layers = [(layer, list(layer.active), dict(layer.weights)) for _, layer in adapter_layers(model)]
    prev_table = {n: 1.0 for n in (prev_attr or [])}
    for _layer, _, w in prev_layers:
        prev_table.update({n: v for n, v in w.items() if n in prev_table})
    unmerged: list[str] = []
    try:
        unmerged = unmerge_all(model, stale) if stale else []
        _apply(model, states, names, table)
    except BaseException:
        for layer, active, w in prev_layers:
            layer.active, layer.weights = active, w
        _hooks(states, model, prev_table)
        if prev_attr is None:
            if hasattr(model, ACTIVE_ATTR):
                delattr(model, ACTIVE_ATTR)
        else:
            setattr(model, ACTIVE_ATTR, prev_attr)
        if unmerged:
            merge_all(model, [n for n in merged if n in unmerged], safe=False)
        raise
    if trainable is not None:
        set_trainable(model, trainable)
    return model


def _apply(model: nn.Module, states, names: list[str], table: dict[str, float]) -> None:
    for _, layer in adapter_layers(model):
        merged = {n for n, _ in layer.merged_stack}
        layer.active = [n for n in names if n in layer.slots]
        layer.weights = {n: w for n, w in table.items() if n in layer.slots and n not in merged} | {
            n: w for n, w in layer.weights.items() if n in merged
        }
    _hooks(states, model, table)
    setattr(model, ACTIVE_ATTR, names)


def _hooks(states, model: nn.Module, table: dict[str, float]) -> None:
    # switch off first, then on, so methods that allow one active adapter never see two
    for state in sorted(states.values(), key=lambda st: st.name in table):
        method = get_method(state.config.method)
        if method.set_active is not None:
            method.set_active(model, state, state.name in table, table.get(state.name, 1.0))


def set_trainable(model: nn.Module, names: str | Sequence[str]) -> nn.Module:
    """Make exactly the adapters ``names`` trainable; every other adapter's tensors are frozen."""
    names = _check_names(model, names)
    for name in adapters(model):
        flag = name in names
        for tensor in adapter_tensors(model, name).values():
            if isinstance(tensor, nn.Parameter) and tensor.is_floating_point():
                tensor.requires_grad_(flag)
    return model


def set_adapters_enabled(model: nn.Module, enabled: bool, adapter_name: str | Sequence[str] | None = None) -> None:
    names = list(adapters(model)) if adapter_name is None else _check_names(model, adapter_name)
    for name in names:
        state = get_state(model, name)
        method = get_method(state.config.method)
        if method.set_enabled is not None:
            method.set_enabled(model, name, enabled)
        for _, layer in wrapped_layers(model, name):
            if enabled:
                layer.disabled.discard(name)
            else:
                layer.disabled.add(name)
