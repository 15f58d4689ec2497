"""Method registry: each method file registers how it is injected and (optionally) mapped to HF PEFT.

A method is a :class:`Method`: the generic API (``wrap``, ``unwrap``, ``merge``, ``save_adapter``,
``export_peft``) does no method-specific work beyond calling these hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import known_methods
from .errors import ConfigError


@dataclass
class Method:
    """Hooks for one PEFT method.

    Attributes:
        name: the config's ``method`` string.
        inject: ``inject(model, config, txn) -> dict`` adds the adapter to ``model`` through the
            :class:`~peftlab.inject.Injection` ``txn`` (``txn.add_slot(path, make_slot, tensors)``,
            ``txn.hook(handle)``; ``txn.skip`` = ``modules_to_save`` paths, never targeted), with
            the base already frozen, and returns ``{"targets": [...], "shapes": {...}, "info": {...},
            "extra_keys": [...], "owned_modules": [...], "live": {...}}``. shapes: each target's
            (out, in) weight shape, checked before loading an adapter; info: saved, JSON-ready
            metadata; extra_keys: base tensors the adapter trains and saves (LoRA biases);
            owned_modules: model-level module paths holding the adapter's tensors (prefix tables);
            live: in-memory objects (allocators, holders), dropped by unwrap.
        remove: ``remove(model, state)`` extra clean-up after the generic removal (slots, hooks,
            live objects), e.g. deleting ``owned_modules``; ``None`` when nothing else is needed.
        set_enabled: ``set_enabled(model, adapter_name, flag)`` for methods that are not
            slots (prefix tuning); slots use the generic per-layer ``disabled`` set.
        set_active: ``set_active(model, state, active, weight)`` for methods that are not slots.
        peft_type: HF PEFT's ``peft_type`` string, when interop is supported.
        to_peft_config: ``(config, state) -> dict`` HF PEFT ``adapter_config.json`` content.
        from_peft_config: ``(dict) -> PeftConfig``.
        to_peft_key / from_peft_key: map one state-dict key between our layout (relative to the
            model) and HF PEFT's saved layout (``base_model.model.`` prefix included).
        merge / unmerge: ``(model, state)`` for methods that are not AdapterLayers; ``is_merged(state)``
            tells their merge state.
        folds_into_base: False when merging cannot put the adapter into the base weights (prefix
            tuning): ``unwrap(merge=True)`` then refuses instead of silently dropping the adapter.
        on_step: ``(model, state, step)`` called once per optimizer step, after backward and
            before ``zero_grad`` (AdaLoRA's rank allocation); see :func:`peftlab.on_train_step`.
        prepare_export: optional ``(model, state_dict, state) -> state_dict`` transform applied
            before writing HF PEFT files (e.g. folding a prefix MLP).
        prepare_import: optional ``(model, state_dict, state) -> state_dict`` applied after key
            mapping when importing HF PEFT files.
    """

    name: str
    inject: Callable[..., dict[str, Any]]
    remove: Callable | None = None
    set_enabled: Callable | None = None
    set_active: Callable | None = None
    merge: Callable | None = None
    unmerge: Callable | None = None
    on_step: Callable | None = None
    is_merged: Callable | None = None
    folds_into_base: bool = True
    peft_type: str | None = None
    to_peft_config: Callable | None = None
    from_peft_config: Callable | None = None
    to_peft_key: Callable[[str], str] | None = None
    from_peft_key: Callable[[str], str] | None = None
    prepare_export: Callable | None = None
    prepare_import: Callable | None = None


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in _METHODS:
        from .config import config_class

        config_class(name)  # imports the method's module, which registers it
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; valid methods: {', '.join(known_methods())}") from None


def method_for_peft_type(peft_type: str) -> Method:
    for method in _METHODS.values():
        if method.peft_type == peft_type:
            return method
    supported = sorted(m.peft_type for m in _METHODS.values() if m.peft_type)
    raise ConfigError(
        f"HF PEFT adapter type {peft_type!r} is not supported; supported: {', '.join(supported)}"
    )
