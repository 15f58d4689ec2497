r"""Mixed-batch routing on the model: ``adapter_names`` on ``model(...)`` and ``model.generate(...)``.

The model-level half of :mod:`peftlab.serving` (which holds the per-layer half: the :class:`Router`,
the stacked LoRA tables, ``mixed_forward``). :func:`install` adds a forward pre-hook that pops
``adapter_names``, validates it (:func:`check_names`), re-checks the used adapters' tensors
(:func:`refresh`) and sets one router on every adapter layer; a forward hook clears it. ``generate`` gets a
per-instance wrapper (:class:`BoundGenerate`) that routes every forward of the generation, repeating a
row's adapter for its beams / return sequences. :func:`uninstall` removes all of it.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..core.registry import get_method
from ..core.state import adapter_layers, adapters
from ..core.tensors import adapter_tensors
from ..util.errors import ConfigError, MergeError, WrapError
from .router import BASE, LAYER_PLAN_ATTR, LAYER_TABLES_ATTR, ROUTING_ATTR, Router


class MixedState:
    """What the routing hooks keep on a model (``model._peftlab_mixed``).

    Attributes:
        version: bumped whenever the adapters' structure or tensors change (tables follow it, see
        :func:`refresh`); structure: the registry it was computed for; layers: the model's AdapterLayers;
        tensors: {adapter: its tensors}; seen: {adapter: (version sum, storage)} last checked;
        pending: the names of the running ``generate`` (None outside it); router: the last router;
        routed: whether the layers hold a router now.
    """

    def __init__(self) -> None:
        self.version = 0
        self.structure: Any = None
        self.layers: list = []
        self.tensors: dict = {}
        self.seen: dict = {}
        self.methods: list = []  # the registry entries of the model's adapters that route whole-model state
        self.disabled: Any = None
        self.pending: tuple[str, ...] | None = None
        self.router: Router | None = None
        self.routed = False
        self.streams: dict[str, torch.Generator] = {}  # per-adapter random streams (set_row_streams)
        self.lengths: dict[str, int] = {}  # per-adapter sequence lengths of a right-padded pack (set_row_streams)


def _state(model: nn.Module) -> MixedState:
    return model.__dict__[ROUTING_ATTR]


def refresh(model: nn.Module, names: Sequence[str] | None = None) -> int:
    """Re-check the adapters a batch uses; bump the version (so every layer rebuilds its tables) if any changed.

    Checked: the registry (wrap / delete / load install a new one), the disabled sets, and, per adapter
    in ``names`` (default: all), the sum of its tensors' version counters (every in-place write, e.g.
    an optimizer step or ``copy_``, bumps one) and the storage of its first tensor (``.to()`` moves it).
    An adapter not in the batch is checked when a batch uses it. Cost: one C-level pass over the used
    adapters' tensors per call (once per ``generate``).
    """
    state = _state(model)
    states = adapters(model)
    bump = False
    if state.structure is not states:  # wrap / delete / load always install a new registry dict
        state.layers = [layer for _, layer in adapter_layers(model)]
        state.structure = states
        state.tensors = {name: list(adapter_tensors(model, name).values()) for name in states}
        state.methods = _routing_methods(states)
        state.seen = {}
        bump = True
    disabled = (tuple(tuple(sorted(layer.disabled)) if layer.disabled else () for layer in state.layers),
                tuple(method.routing_key(model) for method in state.methods if method.routing_key is not None))
    if disabled != state.disabled:
        state.disabled = disabled
        bump = True
    version = operator.attrgetter("_version")
    for name in dict.fromkeys(names if names is not None else states):
        if name == BASE:
            continue
        tensors = state.tensors.get(name, [])
        mark = (sum(map(version, tensors)), tensors[0].data_ptr() if tensors else 0)
        if state.seen.get(name) != mark:
            state.seen[name] = mark
            bump = True
    if bump:
        state.version += 1
        state.router = None
    return state.version


def set_row_streams(
    model: nn.Module, streams: dict[str, torch.Generator] | None, lengths: dict[str, int] | None = None
) -> None:
    """Give adapters their own CPU random streams for mixed batches in training (None: back to the global one).

    Every random draw an adapter makes for its rows (its dropout) then comes from its own generator, swapped
    in for the global one (:func:`peftlab.serving.train_rows.job_rng`), so a job trained in a pack draws what it
    draws alone, where the global generator was seeded as the stream was. ``lengths``: {adapter: its rows' own
    sequence length} when they are right-padded to a longer batch (the draws then cover the own length only).
    """
    install(model)
    _state(model).lengths = dict(lengths or {})
    if streams is not None:
        bad = sorted(n for n, g in streams.items() if not isinstance(g, torch.Generator) or g.device.type != "cpu")
        if bad:
            raise ConfigError(f"set_row_streams: adapter(s) {bad} need a CPU torch.Generator each")
    _state(model).streams = dict(streams or {})


def _routing_methods(states) -> list:
    """The distinct methods of the model's adapters that take part in routing beyond their slots."""
    methods = {st.config.method: get_method(st.config.method) for st in states.values()}
    return [m for _, m in sorted(methods.items()) if m.route_rows or m.clear_rows or m.routing_key]


def check_names(model: nn.Module, names: Any, batch: int | None = None) -> tuple[str, ...]:
    """Validate ``adapter_names`` for a mixed batch; returns them as a tuple.

    Raises:
        ConfigError: not one string per row, or an unknown name (the message lists the loaded ones).
        MergeError: an adapter is merged into the base weights (every row would get it).
    """
    loaded = list(adapters(model))
    valid = f"loaded adapters: {', '.join(loaded)}; '{BASE}' runs a row without adapter"
    if isinstance(names, str) or not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"adapter_names must be a list with one adapter name per row, got {names!r} ({valid})")
    if batch is not None and len(names) != batch:
        raise ConfigError(
            f"adapter_names has {len(names)} names for a batch of {batch} rows; give one name per row ({valid})"
        )
    unknown = sorted({n for n in names if n != BASE and n not in loaded})
    if unknown:
        raise ConfigError(f"unknown adapter name(s) {unknown} in adapter_names ({valid})")
    state = model.__dict__.get(ROUTING_ATTR)
    layers = state.layers if state is not None and state.structure is adapters(model) else [
        layer for _, layer in adapter_layers(model)]
    merged = sorted({n for layer in layers for n, _ in layer.merged_stack})
    if merged:
        raise MergeError(
            f"adapter(s) {merged} are merged into the base weights, which every row of a mixed batch shares; "
            f"call peftlab.unmerge(model) (or unmerge(model, name)) before using adapter_names"
        )
    return tuple(names)


def _batch_size(args, kwargs) -> int | None:
    for key in ("input_ids", "inputs_embeds"):
        value = kwargs.get(key)
        if value is not None:
            return value.shape[0]
    if args and isinstance(args[0], torch.Tensor):
        return args[0].shape[0]
    return None


def _seq_len(args, kwargs) -> int | None:
    """The call's sequence length T (its ``input_ids`` / ``inputs_embeds`` are (batch, T, ...)), or None."""
    for key in ("input_ids", "inputs_embeds"):
        value = kwargs.get(key)
        if value is not None:
            return value.shape[1] if value.dim() > 1 else None
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() > 1:
        return args[0].shape[1]
    return None


def _route(model: nn.Module, state: MixedState, router: Router) -> None:
    for layer in state.layers:
        if layer.router is not router:
            layer.router = router
    state.routed = True


def _clear(model: nn.Module, state: MixedState) -> None:
    for layer in state.layers:
        layer.router = None
    for method in state.methods:
        if method.clear_rows is not None:
            method.clear_rows(model)
    state.routed = False


def _pre_hook(model: nn.Module, args, kwargs):
    state = model.__dict__.get(ROUTING_ATTR)
    names = None
    if "adapter_names" in kwargs:
        kwargs = dict(kwargs)
        names = kwargs.pop("adapter_names")
    if state is None:
        if names is not None:
            raise WrapError("adapter_names needs a model wrapped by peftlab (peftlab.wrap or load_adapter)")
        return args, kwargs
    batch = _batch_size(args, kwargs)
    if names is None and state.pending is not None:  # inside generate(adapter_names=...)
        names = state.pending
        if batch is None or batch % len(names):
            raise ConfigError(
                f"generate: the model got a batch of {batch} rows, not a multiple of the {len(names)} adapter_names"
            )
        names = tuple(n for n in names for _ in range(batch // len(names)))  # beams repeat their row's adapter
    elif names is not None:
        names = check_names(model, names, batch)
        refresh(model, names)
    if names is None:
        if state.routed:
            _clear(model, state)
        return args, kwargs
    router = state.router
    if router is None or router.names != names or router.version != state.version:
        router = state.router = Router(names, state.version)
    router.streams, router.lengths = state.streams, state.lengths
    router.tokens = _seq_len(args, kwargs)  # how layers that see (batch·T) tokens map them to rows (param_rows)
    _route(model, state, router)
    for method in state.methods:  # whole-model adapters (prefix tuning) route their own per-row state
        if method.route_rows is not None:
            kwargs = method.route_rows(model, router, args, kwargs)
    return args, kwargs


def _post_hook(model: nn.Module, args, kwargs, output):
    state = model.__dict__.get(ROUTING_ATTR)
    if state is not None and state.routed and state.pending is None:
        if torch.is_grad_enabled() and any(layer.training for layer in state.layers):
            return output  # training: gradient checkpointing recomputes layers in backward, routed the same;
            # the next forward of the model clears or replaces the routing
        _clear(model, state)
    return output


def generate(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
    """``transformers`` ``generate`` plus ``adapter_names`` (one per input row; see :mod:`peftlab.serving`)."""
    original = type(self).generate
    if adapter_names is None:
        return original(self, *args, **kwargs)
    state = _state(self)
    batch = _batch_size(args, kwargs)
    names = check_names(self, adapter_names, batch)
    refresh(self, names)
    state.pending = names
    try:
        return original(self, *args, **kwargs)
    finally:
        state.pending = None
        _clear(self, state)


class BoundGenerate:
    """``model.generate`` with ``adapter_names``: a per-instance callable (copies and pickles with its model)."""

    def __init__(self, model: nn.Module) -> None:
        self.__self__ = model

    def __call__(self, *args, **kwargs):
        return generate(self.__self__, *args, **kwargs)


_HOOK_FNS = (_pre_hook, _post_hook)


def install(model: nn.Module) -> None:
    """Let ``model(..., adapter_names=...)`` and ``model.generate(..., adapter_names=...)`` route rows (idempotent)."""
    if ROUTING_ATTR in model.__dict__:
        return
    model.__dict__[ROUTING_ATTR] = MixedState()
    model.register_forward_pre_hook(_pre_hook, with_kwargs=True, prepend=True)
    model.register_forward_hook(_post_hook, with_kwargs=True, always_call=True)
    if callable(getattr(type(model), "generate", None)):
        model.__dict__["generate"] = BoundGenerate(model)


def uninstall(model: nn.Module) -> None:
    """Remove what :func:`install` added (when the last adapter goes)."""
    if ROUTING_ATTR not in model.__dict__:
        return
    _clear(model, _state(model))
    for layer in _state(model).layers:
        layer.__dict__.pop(LAYER_TABLES_ATTR, None)
        layer.__dict__.pop(LAYER_PLAN_ATTR, None)
    for store in ("_forward_pre_hooks", "_forward_hooks"):
        hooks = getattr(model, store)
        for hid in [h for h, fn in hooks.items() if fn in _HOOK_FNS]:
            del hooks[hid]
            for extra in ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
                getattr(model, extra, {}).pop(hid, None)
    del model.__dict__[ROUTING_ATTR]
    if isinstance(model.__dict__.get("generate"), BoundGenerate):
        del model.__dict__["generate"]
