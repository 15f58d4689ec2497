"""Generic injection: freeze the base, let a method add its slots, record what was done, roll back on failure.

The record of each adapter (:class:`AdapterState`) lives on the model as
``model.peftlab_adapters`` (a dict keyed by adapter name), so the model object itself stays a
plain ``transformers`` model that ``Trainer``, ``accelerate`` and ``generate`` use unchanged.

An :class:`AdapterState` keeps what is *saved* (config, targets, shapes, extra keys, info)
apart from what only *lives* in memory (:class:`LiveState`: hooks, the AdaLoRA rank allocator,
prefix holders). :func:`peftlab.unwrap` and :func:`peftlab.delete_adapter` clear the live part
generically, so no method writes its own hook removal.

:func:`inject` is a transaction: the method adds its slots through an :class:`Injection`, and if
anything raises, every slot, wrapper, hook and ``requires_grad`` flag is put back as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .config import PeftConfig, check_adapter_name
from .errors import TargetError, WrapError
from .layers import AdapterLayer, Slot
from .targeting import name_matches

STATE_ATTR = "peftlab_adapters"
ORIG_GRAD_ATTR = "_peftlab_orig_requires_grad"


@dataclass
class LiveState:
    """What exists only in memory for one adapter: removed by unwrap/delete, never saved.

    Attributes:
        hooks: ``RemovableHandle`` s (forward hooks, pre-hooks) to remove.
        objects: method objects (AdaLoRA's ``allocator``, prefix ``holder``...).
    """

    hooks: list = field(default_factory=list)
    objects: dict[str, Any] = field(default_factory=dict)

    def clear(self) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()
        self.objects.clear()


@dataclass
class AdapterState:
    """What :func:`peftlab.wrap` did to a model for one adapter.

    Saved metadata: ``config``, ``targets`` (module paths with a slot), ``shapes`` (their (out, in)
    weight shapes), ``modules_to_save`` (paths of head copies), ``extra_keys`` (base tensors this
    adapter trains, e.g. LoRA biases), ``owned_modules`` (model-level modules holding its tensors,
    e.g. ``peftlab_prefix.<name>``), ``info`` (free-form, JSON-ready). ``live``: not saved.
    """

    config: PeftConfig
    targets: list[str]
    shapes: dict[str, list[int]]
    modules_to_save: list[str] = field(default_factory=list)
    extra_keys: list[str] = field(default_factory=list)
    owned_modules: list[str] = field(default_factory=list)
    base_model_name: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    live: LiveState = field(default_factory=LiveState, repr=False)

    @property
    def name(self) -> str:
        return self.config.adapter_name


def adapters(model: nn.Module) -> dict[str, AdapterState]:
    """The adapters on ``model`` (empty dict when it is not wrapped)."""
    return getattr(model, STATE_ATTR, None) or {}


def get_state(model: nn.Module, adapter_name: str | None = None) -> AdapterState:
    """One adapter's state; with ``adapter_name=None`` the only adapter (or, with several, the active one)."""
    states = adapters(model)
    if not states:
        raise WrapError(
            f"{type(model).__name__} is not wrapped by peftlab; call peftlab.wrap(model, config) first"
        )
    if adapter_name is None:
        if len(states) == 1:
            return next(iter(states.values()))
        active = getattr(model, "peftlab_active", None) or []
        if len(active) == 1 and active[0] in states:
            return states[active[0]]
        return list(states.values())[-1]
    if adapter_name not in states:
        raise WrapError(f"no adapter named {adapter_name!r}; this model has: {', '.join(states)}")
    return states[adapter_name]


def get_submodule_parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    return parent, child


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, child = get_submodule_parent(model, path)
    setattr(parent, child, new)


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
    return any(f".{role}." in f".{path}." for role in ("modules_to_save", "adapter_down", "adapter_up"))


def adapter_layers(model: nn.Module):
    """(path, AdapterLayer) for every wrapper in ``model``."""
    for path, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield path, module


def wrapped_layers(model: nn.Module, adapter_name: str | None = None):
    """(path, layer) for every AdapterLayer that holds ``adapter_name`` (any adapter when None)."""
    for path, module in adapter_layers(model):
        if adapter_name is None or adapter_name in module.slots:
            yield path, module


def slots_of(model: nn.Module, adapter_name: str) -> dict[str, Slot]:
    """{module path: slot} of one adapter."""
    return {path: layer.slots[adapter_name] for path, layer in wrapped_layers(model, adapter_name)}


class Injection:
    """The transaction a method injects through: adds slots (wrapping a module at most once),
    registers hooks, and can undo all of it.

    Attributes:
        model, config; skip: ``modules_to_save`` paths (never targeted); live: the new adapter's
        :class:`LiveState` (append hooks with :meth:`hook`).
    """

    def __init__(self, model: nn.Module, config: PeftConfig, skip: list[str]) -> None:
        self.model, self.config, self.skip = model, config, list(skip)
        self.live = LiveState()
        self.wrapped: list[str] = []  # paths wrapped by this injection (unwrapped on rollback)
        self.slotted: list[str] = []  # paths that got a slot
        self.undo: list = []  # extra callables run on rollback, last first

    def add_slot(self, path: str, make_slot, tensors: dict[str, Any]) -> Slot:
        """Give the module at ``path`` a slot ``make_slot(layer)`` with ``tensors`` ({role: tensor})."""
        module = self.model.get_submodule(path)
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
        for fn in reversed(self.undo):
            fn()
        name = self.config.adapter_name
        for path in self.slotted:
            layer = self.model.get_submodule(path)
            if isinstance(layer, AdapterLayer) and name in layer.slots:
                layer.remove_slot(name)
        for path in reversed(self.wrapped):
            layer = self.model.get_submodule(path)
            if isinstance(layer, AdapterLayer) and not layer.slots:
                replace_module(self.model, path, layer.base_layer)
        self.live.clear()


def base_layer_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdapterLayer) else module


def inject(model: nn.Module, config: PeftConfig, method) -> AdapterState:
    """Freeze ``model``, let the method add its slots, copy ``modules_to_save``, record it.

    A transaction: on any exception the model is left exactly as it was (wrappers, slots, hooks,
    ``requires_grad`` flags, the adapter registry), and the exception propagates.
    """
    from .modules_to_save import add_head_copies

    check_adapter_name(config.adapter_name)
    states = dict(adapters(model))
    if config.adapter_name in states:
        raise WrapError(
            f"this model already has an adapter named {config.adapter_name!r} (adapters: {', '.join(states)}); "
            f"pass a different adapter_name, or delete_adapter(model, {config.adapter_name!r}) first"
        )
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    first = not states
    txn = Injection(model, config, skip=[])
    try:
        txn.skip = resolve_modules_to_save(model, config.modules_to_save)
        for p in model.parameters():
            p.requires_grad_(False)
        record = method.inject(model, config, txn)
        to_save = add_head_copies(txn, txn.skip)
        model.train(model.training)  # new adapter modules take the model's mode (no dropout in an eval model)
        state = AdapterState(
            config=config,
            targets=record["targets"],
            shapes=record.get("shapes", {}),
            modules_to_save=to_save,
            extra_keys=list(record.get("extra_keys", [])),
            owned_modules=list(record.get("owned_modules", [])),
            base_model_name=getattr(getattr(model, "config", None), "_name_or_path", None) or None,
            info=record.get("info", {}),
            live=txn.live,
        )
        txn.live.objects.update(record.get("live", {}))
        states[config.adapter_name] = state
        setattr(model, STATE_ATTR, states)
        if first:
            setattr(model, ORIG_GRAD_ATTR, grads)
        from .api import set_active_adapters

        set_active_adapters(model, [config.adapter_name], trainable=[config.adapter_name])
        from .mixed_batch_hooks import install

        install(model)  # model(..., adapter_names=[...]) / generate(..., adapter_names=[...]): one adapter per row
        for key in state.extra_keys:  # base tensors this adapter trains (LoRA bias modes)
            param = dict(model.named_parameters()).get(key)
            if param is not None:
                param.requires_grad_(True)
    except BaseException:
        txn.rollback()
        restored = dict(adapters(model))
        restored.pop(config.adapter_name, None)
        if restored:
            setattr(model, STATE_ATTR, restored)
        elif hasattr(model, STATE_ATTR):
            delattr(model, STATE_ATTR)
        if first and hasattr(model, ORIG_GRAD_ATTR):
            delattr(model, ORIG_GRAD_ATTR)
        params = dict(model.named_parameters())
        for n, flag in grads.items():
            if n in params:
                params[n].requires_grad_(flag)
        _restore_active(model)
        raise
    return state


def _restore_active(model: nn.Module) -> None:
    """After a failed wrap, re-apply the model's recorded active set to every layer."""
    active = getattr(model, "peftlab_active", None)
    if active is None:
        return
    for _, layer in adapter_layers(model):
        layer.active = [n for n in active if n in layer.slots]
