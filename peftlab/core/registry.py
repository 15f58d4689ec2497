"""The method registry: one :class:`Method` per PEFT method, carrying its config class and every hook.

The generic code (``wrap``, ``merge``, ``save_adapter``, ``export_peft``, mixed batches, FSDP, the Trainer
callback, the estimator) does no method-specific work beyond calling these hooks, so a new method is one
package under :mod:`peftlab.methods` that calls :func:`register_method` once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..util.errors import ConfigError


@dataclass(frozen=True)
class Injected:
    """What a method's ``inject`` did (besides the slots it added through the transaction).

    Attributes:
        targets: module paths that got a slot.
        shapes: each target's (out, in) weight shape, checked before loading an adapter.
        info: saved, JSON-ready metadata.
        extra_keys: base tensors the adapter trains and saves (LoRA biases).
        owned_modules: model-level module paths holding the adapter's tensors (prefix tables).
        live: in-memory objects (allocators, holders), dropped by unwrap.
    """

    targets: list[str]
    shapes: dict[str, list[int]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    extra_keys: list[str] = field(default_factory=list)
    owned_modules: list[str] = field(default_factory=list)
    live: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EstimateRules:
    """How :func:`peftlab.estimate` counts a method, without building the model (shapes only).

    Attributes:
        adapted_linears: ``(meta model, config, skip paths) -> {path: r}``: the linear layers that get a
            low-rank adapter, with its rank; None when the method adapts no linear layer.
        linear_params: ``(r, d_in, d_out) -> [numel, ...]``: the adapter tensors of one adapted linear.
        linear_saved: ``(graph, x, out, linear, rows)``: what one adapted linear saves for backward, recorded
            on the estimator's symbolic graph (``graph.save(name, bytes)``, ``graph.rg``, ``graph.gemm``,
            ``graph.e`` activation bytes, ``graph.a`` adapter bytes, ``graph.device``).
        trains_base: ``(config, module path, parameter name, is_target) -> bool``: base tensors the adapter
            trains (LoRA's bias modes).
        extra_params: ``(meta model, config, counts) -> [numel, ...]``: adapter tensors that are not per
            linear (bottleneck sites, prefix tables); may record ``counts.adapter_sites`` /
            ``counts.prefix_tokens`` / ``counts.norms_train``.
        quantized_base: whether the method trains on a quantized (QLoRA-style) base.
        params_in_model_dtype: adapter tensors take the model dtype (else fp32 on half or quantized bases).
        activation: ``config -> name`` of the adapter's nonlinearity, for its saved activations.
        for_config: ``config -> EstimateRules``: the rules for one config when a variant counts differently
            (LoRA with ``use_dora``: DoRA's magnitude and saved LoRA output); None: these rules for every config.
        embedding_saved: ``(graph, counts, rows) -> bool``: what the method's adapters on the input embeddings save
            for backward (``rows(path)``: the rows an embedding looks up), recorded on the graph; returns whether the
            embeddings' output requires grad because of them. Reads what ``extra_params`` noted in ``counts.notes``.
        head_saved: ``(graph, counts, x, rows)``: what they save at the output head (a tied head's rows), on its
            input ``x``.
    """

    adapted_linears: Callable | None = None
    linear_params: Callable | None = None
    linear_saved: Callable | None = None
    trains_base: Callable | None = None
    extra_params: Callable | None = None
    quantized_base: bool = False
    params_in_model_dtype: bool = False
    activation: Callable | None = None
    for_config: Callable | None = None
    embedding_saved: Callable | None = None
    head_saved: Callable | None = None


@dataclass
class Method:
    """Hooks for one PEFT method.

    Attributes:
        name: the config's ``method`` string.
        config_class: its :class:`~peftlab.core.config.PeftConfig` subclass (``config_class.method == name``).
        inject: ``inject(model, config, txn) -> Injected`` adds the adapter to ``model`` through the
            :class:`~peftlab.core.inject.Injection` ``txn`` (``txn.add_slot(path, make_slot, tensors)``,
            ``txn.hook(handle)``; ``txn.skip`` = ``modules_to_save`` paths, never targeted), with the base
            already frozen.
        examples: ``(adapter_name, r) -> {label: PeftConfig}``: small configs of the method and its variants (rank
            or size ``r``, targets that fit any tiny model); the contract suite runs every one of them.
        remove: ``remove(model, state)`` extra clean-up after the generic removal (slots, hooks, live objects).
        set_enabled / set_active: ``(model, adapter_name, flag)`` / ``(model, state, active, weight)`` for
            methods that are not slots (prefix tuning); slots use the layer's ``disabled`` set and ``active``.
        merge / unmerge / is_merged: for methods that are not AdapterLayer slots.
        folds_into_base: False when merging cannot put the adapter into the base weights (prefix tuning).
        identity_at_init: whether a fresh adapter computes exactly the base model (False for prefix tuning,
            which attends to n learned tokens from the start).
        on_step: ``(model, state, step)`` once per optimizer step, after backward and before ``zero_grad``.
        peft_type, to_peft_config, from_peft_config, to_peft_key, from_peft_key, prepare_export,
            prepare_import: HF PEFT interop (``peft_type`` None: no HF equivalent).
        unshardable_reason: why the method cannot train on FSDP-sharded parameters (None: it can).
        train_state / load_train_state: ``(model, state) -> {key: tensor}`` / ``(model, state, tensors)``: extra
            training state that is not a parameter (AdaLoRA's importance averages), saved in checkpoints.
        route_rows / clear_rows / routing_key: mixed batches for methods that act on the whole model rather
            than through slots (prefix tuning): ``route_rows(model, router, args, kwargs) -> kwargs`` before
            a routed forward, ``clear_rows(model)`` after it, ``routing_key(model) -> hashable`` that changes
            whenever the routed tables must be rebuilt. Slots take part through ``low_rank_factors()``.
        estimate: the :class:`EstimateRules` the memory estimator counts the method with (None: not estimable).
    """

    name: str
    config_class: type
    inject: Callable[..., Injected]
    examples: Callable[[str, int], dict[str, Any]] | None = None
    remove: Callable | None = None
    set_enabled: Callable | None = None
    set_active: Callable | None = None
    merge: Callable | None = None
    unmerge: Callable | None = None
    on_step: Callable | None = None
    is_merged: Callable | None = None
    folds_into_base: bool = True
    identity_at_init: bool = True
    peft_type: str | None = None
    to_peft_config: Callable | None = None
    from_peft_config: Callable | None = None
    to_peft_key: Callable[[str], str] | None = None
    from_peft_key: Callable[[str], str] | None = None
    prepare_export: Callable | None = None
    prepare_import: Callable | None = None
    unshardable_reason: str | None = None
    train_state: Callable | None = None
    load_train_state: Callable | None = None
    route_rows: Callable | None = None
    clear_rows: Callable | None = None
    routing_key: Callable | None = None
    estimate: EstimateRules | None = None


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Make ``method`` known by its name; a second method with the same name is an error."""
    if method.name in _METHODS:
        raise ConfigError(f"a method named {method.name!r} is already registered; choose another name")
    declared = getattr(method.config_class, "method", None)
    if declared != method.name:
        raise ConfigError(
            f"method {method.name!r}: its config class {method.config_class.__name__} declares method={declared!r}"
        )
    _METHODS[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Forget a method (for tests that register a toy one)."""
    _METHODS.pop(name, None)


def method_names() -> list[str]:
    """Names of every registered method, sorted."""
    return sorted(_METHODS)


def registered_methods() -> list[Method]:
    return [_METHODS[n] for n in method_names()]


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown method {name!r}; valid methods: {', '.join(method_names())}") from None


def config_class(name: str) -> type:
    """The config dataclass of method ``name``; a clear error lists the valid names."""
    return get_method(name).config_class


def method_for_peft_type(peft_type: str) -> Method:
    for method in _METHODS.values():
        if method.peft_type == peft_type:
            return method
    supported = sorted(m.peft_type for m in _METHODS.values() if m.peft_type)
    raise ConfigError(
        f"HF PEFT adapter type {peft_type!r} is not supported; supported: {', '.join(supported)}"
    )
