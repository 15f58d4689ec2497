"""Which adapters run and train: the active set with its weights, trainability, and enabling/disabling.

The only place that writes a layer's ``active`` list and ``weights``; methods that are not slots (prefix
tuning) follow through their :class:`~peftlab.core.registry.Method` hooks (``set_active``, ``set_enabled``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from ..util.errors import ConfigError, WrapError
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
    unknown = [n for n in names if n not in states]
    if unknown:
        raise WrapError(f"unknown {what} name(s) {unknown}; this model has: {', '.join(states)}")
    return list(dict.fromkeys(names))


def set_active_adapters(
    model: nn.Module,
    names: str | Sequence[str],
    weights: Sequence[float] | None = None,
    trainable: str | Sequence[str] | None = None,
) -> nn.Module:
    """Choose which adapters run in forward, and with which weights.

    With several active, their contributions add, each scaled by its weight:
    ``h = W x + Σ_i w_i · Δ_i(x)`` (for LoRA slots ``Δ_i(x) = s_i B_i A_i x``).

    Args:
        names: one name or a list; ``[]`` runs the base model.
        weights: one float per name (default 1.0 each).
        trainable: names whose parameters train (default: unchanged). See :func:`set_trainable`.
    """
    names = _check_names(model, names)
    if weights is None:
        weights = [1.0] * len(names)
    weights = [float(w) for w in weights]
    if len(weights) != len(names):
        raise ConfigError(f"got {len(weights)} weights for {len(names)} adapters {names}; give one weight per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"adapter weights must be finite numbers, got {weights}")
    table = dict(zip(names, weights))
    for _, layer in adapter_layers(model):
        merged = {n for n, _ in layer.merged_stack}
        layer.active = [n for n in names if n in layer.slots]
        layer.weights = {n: w for n, w in table.items() if n in layer.slots and n not in merged} | {
            n: w for n, w in layer.weights.items() if n in merged
        }
    # switch off first, then on, so methods that allow one active adapter never see two
    for state in sorted(adapters(model).values(), key=lambda st: st.name in table):
        method = get_method(state.config.method)
        if method.set_active is not None:
            method.set_active(model, state, state.name in table, table.get(state.name, 1.0))
    setattr(model, ACTIVE_ATTR, names)
    if trainable is not None:
        set_trainable(model, trainable)
    return model


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
