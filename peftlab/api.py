"""The public, method-agnostic API: wrap, several adapters (activate, weight, delete), merge, disable, unwrap.

Orchestration only: everything here works through the slot protocol of :mod:`peftlab.core.layer`, the
activation rules of :mod:`peftlab.core.activation` and the hooks a method registers
(:mod:`peftlab.core.registry`); nothing here knows LoRA from a bottleneck adapter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import nn

from .backends.quant.model import dequantize_model, logical_numel
from .core.activation import _check_names, active_adapters, set_active_adapters, set_adapters_enabled
from .core.config import PeftConfig
from .core.inject import inject, train_extra_keys
from .core.registry import get_method
from .core.state import (
    ACTIVE_ATTR,
    ADAPTERS_ATTR,
    ORIG_GRAD_ATTR,
    adapter_layers,
    adapters,
    get_state,
    replace_module,
    wrapped_layers,
)
from .core.tensors import adapter_tensors
from .serving.hooks import install as install_routing
from .serving.hooks import uninstall as uninstall_routing
from .util.errors import ConfigError, MergeError, WrapError


def wrap(model: nn.Module, config: PeftConfig) -> nn.Module:
    """Add a PEFT adapter to ``model`` in place and return the same object.

    The base weights are frozen; only the new adapter's parameters (and its copies of
    ``modules_to_save``) are trainable, and it becomes the active adapter. A model that already
    has adapters gets one more, named ``config.adapter_name``: a wrapped module gets a new slot,
    never a second wrapper. The model remains a plain ``transformers`` model, so ``Trainer``,
    ``accelerate`` and ``generate`` work unchanged.

    If anything fails, the model is left exactly as it was.

    Raises:
        ConfigError: ``config`` is not a peftlab config.
        TargetError: target modules not found (the message lists candidates).
        WrapError: an adapter with this name is already on the model, or the name is invalid.
    """
    if not isinstance(config, PeftConfig):
        raise ConfigError(
            f"wrap() needs a peftlab config (e.g. peftlab.LoraConfig), got {type(config).__name__}"
        )
    previous = active_adapters(model)
    txn = inject(model, config, get_method(config.method))
    name = config.adapter_name
    try:
        set_active_adapters(model, [name], trainable=[name])
        install_routing(model)  # model(..., adapter_names=[...]) / generate(..., adapter_names=[...]): one per row
        train_extra_keys(model, txn.state)
    except BaseException:
        txn.rollback()
        if adapters(model):
            set_active_adapters(model, previous)  # the other adapters' method hooks follow too
        else:
            uninstall_routing(model)
        raise
    return model


# ---- several adapters ---------------------------------------------------------------------------


def delete_adapter(model: nn.Module, adapter_name: str, force: bool = False) -> nn.Module:
    """Remove one adapter (its slots, head copies, hooks and live objects); the others stay.

    A merged adapter is unmerged first (later merges are undone and redone).

    Raises:
        WrapError: unknown name; or the adapter has gradients not yet applied by an optimizer
            step (pass ``force=True`` to delete anyway, after ``optimizer.zero_grad()``).
    """
    _check_names(model, [adapter_name])
    get_state(model, adapter_name)  # raises for an unknown adapter
    tensors = adapter_tensors(model, adapter_name)
    pending = [k for k, t in tensors.items() if isinstance(t, nn.Parameter) and t.grad is not None and bool(t.grad.any())]
    if pending and not force:
        raise WrapError(
            f"adapter {adapter_name!r} has gradients that no optimizer step has applied yet ({len(pending)} tensors, "
            f"e.g. {pending[0]}): an optimizer step is pending. Call optimizer.step() and optimizer.zero_grad(), "
            f"or delete_adapter(..., force=True)"
        )
    if is_merged(model, adapter_name):
        unmerge(model, adapter_name)
    _remove(model, adapter_name)
    remaining = [n for n in active_adapters(model) if n != adapter_name]
    if adapters(model):
        set_active_adapters(model, remaining)
    return model


def _remove(model: nn.Module, adapter_name: str) -> None:
    """Generic removal: live state, slots (unwrapping empty wrappers), the method's own modules, registry."""
    state = get_state(model, adapter_name)
    method = get_method(state.config.method)
    state.live.clear()
    for path, layer in list(wrapped_layers(model, adapter_name)):
        layer.remove_slot(adapter_name)
        if not layer.slots:
            replace_module(model, path, layer.base_layer)
    if method.remove is not None:
        method.remove(model, state)
    states = dict(adapters(model))
    states.pop(adapter_name)
    if states:
        setattr(model, ADAPTERS_ATTR, states)
        return
    delattr(model, ADAPTERS_ATTR)
    uninstall_routing(model)  # the mixed-batch routing hooks go with the last adapter
    if hasattr(model, ACTIVE_ATTR):
        delattr(model, ACTIVE_ATTR)
    orig = getattr(model, ORIG_GRAD_ATTR, None)
    if orig is not None:
        for pname, p in model.named_parameters():
            if pname in orig:
                p.requires_grad_(orig[pname])
        delattr(model, ORIG_GRAD_ATTR)


# ---- merge ----------------------------------------------------------------------------------------


def _merge_targets(model: nn.Module, adapter_name: str | None) -> list[str]:
    if adapter_name is not None:
        return _check_names(model, [adapter_name])
    active = active_adapters(model)
    return active or [get_state(model).name]


def merge(model: nn.Module, adapter_name: str | None = None, safe: bool = True) -> nn.Module:
    """Fold adapters into the base weights: ``W <- slot.merged(W, w)`` per layer.

    Args:
        adapter_name: one adapter; default: every active adapter (each with its active weight).
        safe: check every merged weight for NaN/inf before anything is written (default); a broken
            adapter then raises :class:`MergeError` and the model is unchanged. ``safe=False`` skips it.
    """
    for name in _merge_targets(model, adapter_name):
        state = get_state(model, name)
        method = get_method(state.config.method)
        if method.merge is not None:
            method.merge(model, state)
            continue
        layers = [layer for _, layer in wrapped_layers(model, name)]
        if any(layer.is_merged(name) for layer in layers):
            raise MergeError(f"adapter {name!r} is already merged; call unmerge() first")
        unmergeable = [layer for layer in layers if not layer.slots[name].mergeable and not layer.slots[name].replaces_base]
        if unmergeable:
            slot = unmergeable[0].slots[name]
            raise MergeError(
                f"{state.config.method} adapter {name!r} cannot be merged into the base weights "
                f"({type(slot).__name__} is not linear in the input); keep it unmerged for inference"
            )
        mergeable = [layer for layer in layers if layer.slots[name].mergeable]
        if safe:  # check every layer before touching any weight, so a failure leaves the model as it was
            for layer in mergeable:
                layer.check_merge(name)
        for layer in mergeable:
            layer.merge(name, safe=False)
    return model


_merge_adapters = merge  # for unwrap(), whose ``merge`` parameter shadows the function


def unmerge(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Undo merges: one adapter, or (default) every merged adapter in LIFO order."""
    names = [adapter_name] if adapter_name is not None else list(adapters(model))
    if adapter_name is not None:
        _check_names(model, names)
    done = False
    for name in names:
        state = get_state(model, name)
        method = get_method(state.config.method)
        if method.unmerge is not None:
            if method.is_merged(state):
                method.unmerge(model, state)
                done = True
            continue
    layers = [layer for _, layer in adapter_layers(model)]
    for layer in layers:
        if adapter_name is None:
            while layer.merged_stack:
                layer.unmerge()
                done = True
        elif layer.is_merged(adapter_name):
            layer.unmerge(adapter_name)
            done = True
    if not done:
        what = f"adapter {adapter_name!r} is" if adapter_name else "no adapter is"
        raise MergeError(f"{what} not merged; nothing to unmerge")
    return model


def is_merged(model: nn.Module, adapter_name: str | None = None) -> bool:
    state = get_state(model, adapter_name)
    method = get_method(state.config.method)
    if method.is_merged is not None:
        return method.is_merged(state)
    return any(layer.is_merged(state.name) for _, layer in wrapped_layers(model, state.name))


def on_train_step(model: nn.Module, step: int) -> None:
    """Call once per optimizer step, after ``optimizer.step()`` and before ``zero_grad()``.

    Runs each adapter method's per-step hook (e.g. AdaLoRA's importance update and rank
    allocation); a no-op for methods that have none. peftlab's training loop and its
    ``transformers.TrainerCallback`` call it for you.
    """
    for state in adapters(model).values():
        method = get_method(state.config.method)
        if method.on_step is not None:
            method.on_step(model, state, step)


def unwrap(
    model: nn.Module, merge: bool = False, adapter_name: str | None = None, dequantize: bool = False
) -> nn.Module:
    """Remove the adapter(s) and return the plain model (the same object).

    Args:
        merge: fold the adapter(s) into the base weights first (the active weights apply). With
            ``merge=False`` merged adapters are unmerged, so the base weights are restored.
        adapter_name: remove only this adapter (default: all of them).
        dequantize: replace quantized (bitsandbytes) base layers by full-precision ones first,
            so that ``merge=True`` gives a plain full-precision merged model.
    """
    if dequantize:
        dequantize_model(model)
    names = [adapter_name] if adapter_name else list(adapters(model))[::-1]
    if not names:
        get_state(model)  # raises the "not wrapped" error
    _check_names(model, names)
    if merge:
        for name in names:
            method = get_method(get_state(model, name).config.method)
            if not method.folds_into_base:
                raise MergeError(
                    f"{method.name} adapter {name!r} can't be folded into the base weights; unwrap(merge=False) "
                    f"removes the adapter, or keep it wrapped for inference"
                )
    for name in names:
        state = get_state(model, name)
        method = get_method(state.config.method)
        merged = is_merged(model, name)
        if merge and not merged:
            _merge_adapters(model, name)
        elif not merge and merged:
            unmerge(model, name)
        if merge:
            _commit_merge(model, name)
        _remove(model, name)
    return model


def _commit_merge(model: nn.Module, name: str) -> None:
    """Forget that ``name`` is merged (its update stays in the base weights) before removing it."""
    for _, layer in wrapped_layers(model, name):
        layer.merged_stack = [(n, w) for n, w in layer.merged_stack if n != name]
    state = get_state(model, name)
    method = get_method(state.config.method)
    if method.is_merged is not None and method.is_merged(state):
        method.unmerge(model, state)


# ---- disable --------------------------------------------------------------------------------------


@contextlib.contextmanager
def disable_adapters(model: nn.Module, adapter_name: str | Sequence[str] | None = None) -> Iterator[nn.Module]:
    """Context manager: inside it the given adapters (default: all) contribute nothing.

    With every adapter disabled the model computes exactly the base model. A merged adapter cannot
    be disabled (its update lives in the base weights): unmerge first.
    """
    names = list(adapters(model)) if adapter_name is None else _check_names(model, adapter_name)
    if not names:
        get_state(model)
    for name in names:
        if is_merged(model, name):
            raise MergeError(
                f"adapter {name!r} is merged into the base weights; unmerge() before disabling it"
            )
    set_adapters_enabled(model, False, names)
    try:
        yield model
    finally:
        set_adapters_enabled(model, True, names)


# ---- counting -------------------------------------------------------------------------------------


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied parameters are counted once.

    For bitsandbytes 4-bit weights (packed two values per byte) the logical count is used.
    """
    trainable = total = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = logical_numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> str:
    """Print and return ``trainable params: X || all params: Y || trainable%: Z``."""
    trainable, total = count_parameters(model)
    line = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    print(line)
    return line
