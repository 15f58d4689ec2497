"""Generic injection as a transaction: freeze the base, let a method add its slots, record what was done.

:func:`inject` runs a method's ``inject`` hook through an :class:`Injection` and registers the new
:class:`~peftlab.core.state.AdapterState`. If anything raises, every slot, wrapper, hook, ``requires_grad``
flag and the adapter registry are put back as they were. The caller (:func:`peftlab.wrap`) holds the
returned transaction open while it activates the adapter and installs routing, and calls
:meth:`Injection.rollback` if one of those steps fails; this module imports neither.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..util.errors import TargetError, WrapError
from .config import PeftConfig, check_adapter_name
from .head_copies import add_head_copies
from .layer import SLOT_ROLES, AdapterLayer, Slot
from .registry import Injected, Method
from .state import (
    ACTIVE_ATTR,
    ADAPTERS_ATTR,
    ORIG_GRAD_ATTR,
    AdapterState,
    LiveState,
    adapter_layers,
    adapters,
    replace_module,
    submodule,
)
from .structure import name_matches


def resolve_modules_to_save(model: nn.Module, names: list[str] | None) -> list[str]:
    """Paths of ``modules_to_save`` (suffix match); an unknown name is an error listing top modules."""
    if not names:
        return []
    paths: list[str] = []
    for name in names:
        hits = [
            p
            for p, m in model.named_modules()
            if p and name_matches(p, name) and ".base_layer" not in p and not _in_adapter_store(p)
        ]
        # keep only outermost matches (e.g. `classifier`, not `classifier.dense` when both match)
        hits = [p for p in hits if not any(p.startswith(h + ".") for h in hits)]
        if not hits:
            top = [n for n, _ in model.named_children()]
            raise TargetError(
                f"modules_to_save entry {name!r} not found; top-level modules: {', '.join(top)}"
            )
        paths.extend(hits)
    return paths


def _in_adapter_store(path: str) -> bool:
    """Whether ``path`` lies inside a wrapper's per-role adapter dict (a head copy, a bottleneck's layers...)."""
    return any(f".{role}." in f".{path}." for role in SLOT_ROLES)


class Injection:
    """The transaction a method injects through: adds slots (wrapping a module at most once), registers hooks,
    and can undo all of it, including the registry entry and the ``requires_grad`` flags.

    Attributes:
        model, config; skip: ``modules_to_save`` paths (never targeted); live: the new adapter's
        :class:`LiveState` (append hooks with :meth:`hook`); undo: extra callables run on rollback, last first.
    """

    def __init__(self, model: nn.Module, config: PeftConfig) -> None:
        self.model, self.config, self.skip = model, config, []
        self.live = LiveState()
        self.wrapped: list[str] = []  # paths wrapped by this injection (unwrapped on rollback)
        self.slotted: list[str] = []  # paths that got a slot
        self.undo: list = []
        self.grads = {n: p.requires_grad for n, p in model.named_parameters()}
        self.first = not adapters(model)
        self.active = getattr(model, ACTIVE_ATTR, None)
        self.state: AdapterState | None = None

    def add_slot(self, path: str, make_slot, tensors: dict[str, Any]) -> Slot:
        """Give the module at ``path`` a slot ``make_slot(layer)`` with ``tensors`` ({role: tensor})."""
        module = submodule(self.model, path)
        if isinstance(module, AdapterLayer):
            layer = module
        else:
            layer = AdapterLayer(module)
            replace_module(self.model, path, layer)
            self.wrapped.append(path)
        slot = layer.add_slot(make_slot(layer), tensors)
        self.slotted.append(path)
        return slot

    def hook(self, handle) -> None:
        self.live.hooks.append(handle)

    def rollback(self) -> None:
        """Put the model back exactly as it was before :func:`inject`."""
        model = self.model
        for fn in reversed(self.undo):
            fn()
        name = self.config.adapter_name
        for path in self.slotted:
            layer = submodule(model, path)
            if isinstance(layer, AdapterLayer) and name in layer.slots:
                layer.remove_slot(name)
        for path in reversed(self.wrapped):
            layer = submodule(model, path)
            if isinstance(layer, AdapterLayer) and not layer.slots:
                replace_module(model, path, layer.base_layer)
        self.live.clear()
        restored = dict(adapters(model))
        restored.pop(name, None)
        if restored:
            setattr(model, ADAPTERS_ATTR, restored)
        elif hasattr(model, ADAPTERS_ATTR):
            delattr(model, ADAPTERS_ATTR)
        if self.first and hasattr(model, ORIG_GRAD_ATTR):
            delattr(model, ORIG_GRAD_ATTR)
        params = dict(model.named_parameters())
        for n, flag in self.grads.items():
            if n in params:
                params[n].requires_grad_(flag)
        if self.active is None:
            if hasattr(model, ACTIVE_ATTR) and not restored:
                delattr(model, ACTIVE_ATTR)
        else:
            setattr(model, ACTIVE_ATTR, self.active)
            for _, layer in adapter_layers(model):
                layer.active = [n for n in self.active if n in layer.slots]


def inject(model: nn.Module, config: PeftConfig, method: Method) -> Injection:
    """Freeze ``model``, let ``method`` add its slots, copy ``modules_to_save``, and register the adapter.

    Returns the open :class:`Injection` (its ``state`` is the new :class:`AdapterState`); the adapter is
    not active yet. On any exception here the model is left exactly as it was and the exception propagates.
    """
    check_adapter_name(config.adapter_name)
    states = dict(adapters(model))
    if config.adapter_name in states:
        raise WrapError(
            f"this model already has an adapter named {config.adapter_name!r} (adapters: {', '.join(states)}); "
            f"pass a different adapter_name, or delete_adapter(model, {config.adapter_name!r}) first"
        )
    txn = Injection(model, config)
    try:
        txn.skip = resolve_modules_to_save(model, config.modules_to_save)
        for p in model.parameters():
            p.requires_grad_(False)
        record: Injected = method.inject(model, config, txn)
        to_save = add_head_copies(txn, txn.skip)
        model.train(model.training)  # new adapter modules take the model's mode (no dropout in an eval model)
        state = AdapterState(
            config=config,
            targets=list(record.targets),
            shapes=dict(record.shapes),
            modules_to_save=to_save,
            extra_keys=list(record.extra_keys),
            owned_modules=list(record.owned_modules),
            base_model_name=getattr(getattr(model, "config", None), "_name_or_path", None) or None,
            info=dict(record.info),
            live=txn.live,
        )
        txn.live.objects.update(record.live)
        states[config.adapter_name] = state
        setattr(model, ADAPTERS_ATTR, states)
        if txn.first:
            setattr(model, ORIG_GRAD_ATTR, txn.grads)
        txn.state = state
    except BaseException:
        txn.rollback()
        raise
    return txn


def train_extra_keys(model: nn.Module, state: AdapterState) -> None:
    """Make the base tensors this adapter trains (``extra_keys``, e.g. LoRA bias modes) trainable."""
    params = dict(model.named_parameters())
    for key in state.extra_keys:
        if key in params:
            params[key].requires_grad_(True)
