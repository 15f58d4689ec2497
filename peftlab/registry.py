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
        inject: ``inject(model, config, skip=paths) -> dict`` adds the adapter to ``model`` (base
            already frozen; ``skip`` = ``modules_to_save`` paths, never targeted) and returns
            ``{"targets": [...], "shapes": {...}, "info": {...}, "extra_keys": [...]}``. shapes:
            each target's (out, in) weight shape, checked before loading an adapter; info:
            free-form method state kept on the AdapterState; extra_keys: state-dict keys to save
            besides the trainable parameters and the ``prefix``-named buffers of AdapterLayers.
        remove: ``remove(model, adapter_name)`` undoes injection without merging; ``None``
            means the generic removal of :class:`~peftlab.layers.AdapterLayer` wrappers.
        set_enabled: ``set_enabled(model, adapter_name, flag)`` for methods that are not
            AdapterLayers (prefix tuning); ``None`` means the generic layer flag.
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
