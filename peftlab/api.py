"""The public, method-agnostic API: wrap, several adapters (activate, weight, delete), merge, disable, unwrap.

Orchestration only: everything here works through the slot protocol of :mod:`peftlab.core.layer`, the
activation rules of :mod:`peftlab.core.activation` and the hooks a method registers
(:mod:`peftlab.core.registry`); nothing here knows LoRA from a bottleneck adapter.

Two rules hold for every function here:

* **All or nothing.** An operation on several adapters or layers checks everything first, then changes
  the model; if a step still fails, what was done is undone, and the model is exactly as before.
* **Merged state is never hidden.** A merged adapter always counts as active, with the weight it was merged
  with. A call that would switch it off, give it another weight, disable it or delete it unmerges it first
  (:func:`disable_adapters` merges it again on exit); merging an inactive adapter activates it (weight 1.0);
  :func:`wrap` keeps merged adapters active beside the new one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import nn

from .backends.quant.model import dequantize_model, logical_numel
from .core.activation import _check_names, active_adapters, set_active_adapters, set_adapters_enabled
from .core.config import PeftConfig
from .core.inject import inject, train_extra_keys
from .core.merging import check_merge, merge_all, merged_weights, unmerge_all
from .core.merging import is_merged as _is_merged
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
    never a second wrapper. Adapters that are merged stay active beside it, with their weights (their
    update is in the base weights); the other adapters are switched off. The model remains a plain
    ``transformers`` model, so ``Trainer``, ``accelerate`` and ``generate`` work unchanged.

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
    previous_weights = _active_weights(model, previous)
    merged = merged_weights(model)
    txn = inject(model, config, get_method(config.method))
    name = config.adapter_name
    try:
        # merged adapters stay active with their weight: their update is in the base weights
        keep = [n for n in previous if n in merged]
        set_active_adapters(model, keep + [name], [merged[n] for n in keep] + [1.0], trainable=[name])
        install_routing(model)  # model(..., adapter_names=[...]) / generate(..., adapter_names=[...]): one per row
        train_extra_keys(model, txn.state)
    except BaseException:
        txn.rollback()
        if adapters(model):
            set_active_adapters(model, previous, previous_weights)  # the other adapters' method hooks follow too
        else:
            uninstall_routing(model)
        raise
    return model


# ---- several adapters ---------------------------------------------------------------------------


def delete_adapter(model: nn.Module, adapter_name: str, force: bool = False) -> nn.Module:
    """Remove one adapter (its slots, head copies, hooks and live objects); the others stay.

    A merged adapter is unmerged first (later merges are undone and redone), as every call that changes
    a merged adapter does. Everything is checked before anything changes.

    Raises:
        WrapError: unknown name; or the adapter has gradients not yet applied by an optimizer
            step (pass ``force=True`` to delete anyway, after ``optimizer.zero_grad()``).
    """
    if not isinstance(adapter_name, str):
        raise ConfigError(f"delete_adapter() takes one adapter name (a string), got {adapter_name!r}")
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
    remaining = [n for n in active_adapters(model) if n != adapter_name]
    weights = _active_weights(model, remaining)
    # switch it off first (this unmerges it, all or nothing); then nothing that can fail is left
    set_active_adapters(model, remaining, weights)
    _remove(model, adapter_name)
    return model


def _active_weights(model: nn.Module, names: list[str]) -> list[float]:
    """The current weight of each active adapter in ``names``."""
    table = {n: 1.0 for n in names}
    for _, layer in adapter_layers(model):
        for n in names:
            if n in layer.weights:
                table[n] = layer.weights[n]
    return [table[n] for n in names]


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
        if not isinstance(adapter_name, str):
            raise ConfigError(f"adapter_name must be one adapter name (a string) or None, got {adapter_name!r}")
        names = _check_names(model, [adapter_name])
        return names
    return active_adapters(model) or [get_state(model).name]


def merge(model: nn.Module, adapter_name: str | None = None, safe: bool = True) -> nn.Module:
    """Fold adapters into the base weights: ``W <- slot.merged(W, w)`` per layer.

    All or nothing: every adapter is checked first (known, active, not merged yet, foldable, and with
    ``safe`` no NaN/inf in any merged weight); if a step still fails, the adapters merged so far are
    unmerged, so the model is left as it was.

    Args:
        adapter_name: one adapter (an inactive one becomes active with weight 1.0, since a merged
            adapter always counts as active); default: every active adapter (each with its active weight).
        safe: check every merged weight for NaN/inf before anything is written (default); a broken
            adapter then raises :class:`MergeError` and the model is unchanged. ``safe=False`` skips it.
    """
    names = _merge_targets(model, adapter_name)
    active = active_adapters(model)
    if all(n in active for n in names):
        merge_all(model, names, safe)
        return model
    # merging an inactive adapter makes it active (weight 1.0): a merged adapter always shows as active
    weights = _active_weights(model, active)
    check_merge(model, names, safe)
    set_active_adapters(model, active + [n for n in names if n not in active], weights + [1.0])
    try:
        merge_all(model, names, safe)
    except BaseException:
        set_active_adapters(model, active, weights)
        raise
    return model


_merge_adapters = merge  # for unwrap(), whose ``merge`` parameter shadows the function


def unmerge(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Undo merges: one adapter, or (default) every merged adapter in LIFO order. All or nothing."""
    if adapter_name is not None:
        if not isinstance(adapter_name, str):
            raise ConfigError(f"adapter_name must be one adapter name (a string) or None, got {adapter_name!r}")
        _check_names(model, [adapter_name])
        if not _is_merged(model, adapter_name):
            raise MergeError(f"adapter {adapter_name!r} is not merged; nothing to unmerge")
        unmerge_all(model, [adapter_name])
        return model
    get_state(model)
    if not merged_weights(model):
        raise MergeError("no adapter is merged; nothing to unmerge")
    unmerge_all(model)
    return model


def is_merged(model: nn.Module, adapter_name: str | None = None) -> bool:
    """Whether the adapter (default: the only or active one) is merged into the base weights."""
    return _is_merged(model, get_state(model, adapter_name).name)


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

    Everything is checked before anything changes: with ``merge=True`` an adapter that cannot be folded
    (a bottleneck adapter, a prefix) is refused before any other is merged or removed.

    Args:
        merge: fold the adapter(s) into the base weights first (the active weights apply). With
            ``merge=False`` merged adapters are unmerged, so the base weights are restored.
        adapter_name: remove only this adapter (default: all of them).
        dequantize: replace quantized (bitsandbytes) base layers by full-precision ones first,
            so that ``merge=True`` gives a plain full-precision merged model.
    """
    if adapter_name is not None and not isinstance(adapter_name, str):
        raise ConfigError(f"adapter_name must be one adapter name (a string) or None, got {adapter_name!r}")
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
        to_merge = [n for n in names[::-1] if not _is_merged(model, n)]
        check_merge(model, to_merge)
    if dequantize:
        dequantize_model(model)
    if merge:
        merge_all(model, to_merge)
        for name in names:
            _commit_merge(model, name)
    else:
        unmerge_all(model, names)
    for name in names:
        _remove(model, name)
    if adapters(model):
        remaining = [n for n in active_adapters(model) if n in adapters(model)]
        set_active_adapters(model, remaining, _active_weights(model, remaining))
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

    With every adapter disabled the model computes exactly the base model. A merged adapter is unmerged
    on entry (its update lives in the base weights) and merged again on exit.
    """
    names = list(adapters(model)) if adapter_name is None else _check_names(model, adapter_name)
    if not names:
        get_state(model)
    merged = merged_weights(model)
    unmerged = unmerge_all(model, [n for n in names if n in merged])  # all or nothing
    set_adapters_enabled(model, False, names)
    try:
        yield model
    finally:
        set_adapters_enabled(model, True, names)
        if unmerged:
            merge_all(model, [n for n in merged if n in unmerged], safe=False)


# ---- counting -------------------------------------------------------------------------------------


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied parameters are counted once.

    A module in ``modules_to_save`` (a task head) is counted once: its trainable copies count, and the frozen
    original they stand in for does not (MiniLM-L6 + LoRA r=8 on query/value + a copied 2-class head:
    22,713,986 base + 73,728 LoRA = 22,787,714 total, 74,498 trainable). For bitsandbytes 4-bit weights
    (packed two values per byte) the logical count is used.
    """
    trainable = total = 0
    seen: set[int] = set()
    originals = [
        f"{path}.base_layer." for state in adapters(model).values() for path in state.modules_to_save
    ]
    if originals:  # the frozen originals of head copies, unless tied to a tensor elsewhere (embeddings)
        places: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            places.setdefault(id(p), []).append(name)
        for pid, names in places.items():
            if all(any(n.startswith(o) for o in originals) for n in names):
                p = model.get_parameter(names[0])
                if not p.requires_grad:
                    seen.add(pid)
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
