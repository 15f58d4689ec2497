"""What peftlab keeps on a wrapped model: one :class:`AdapterState` per adapter, and lookups over its layers.

The record of each adapter lives on the model as ``model.peftlab_adapters`` (a dict keyed by adapter name),
so the model object itself stays a plain ``transformers`` model that ``Trainer``, ``accelerate`` and
``generate`` use unchanged. An :class:`AdapterState` keeps what is *saved* (config, targets, shapes, extra
keys, info) apart from what only *lives* in memory (:class:`LiveState`: hooks, the AdaLoRA rank allocator,
prefix holders).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..util.errors import WrapError
from .config import PeftConfig
from .layer import AdapterLayer, Slot

#: the attribute holding the active adapter names on a wrapped model
ACTIVE_ATTR = "peftlab_active"


ADAPTERS_ATTR = "peftlab_adapters"


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
    return getattr(model, ADAPTERS_ATTR, None) or {}


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
        active = getattr(model, ACTIVE_ATTR, None) or []
        if len(active) == 1 and active[0] in states:
            return states[active[0]]
        return list(states.values())[-1]
    if adapter_name not in states:
        raise WrapError(f"no adapter named {adapter_name!r}; this model has: {', '.join(states)}")
    return states[adapter_name]


def submodule(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)`` by plain path, also inside a wrapped module (a bottleneck adapter around a
    whole MoE block wraps its experts and router, whose names may clash with the wrapper's own attributes)."""
    module = model
    for item in path.split(".") if path else []:
        holder = module.base_layer if isinstance(module, AdapterLayer) else module
        child = holder._modules.get(item)
        if child is None:
            return model.get_submodule(path)  # torch's own error
        module = child
    return module


def get_submodule_parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    """(the module holding ``path``'s last component, that component); inside a wrapped module (a wrapper around a
    whole MoE block) the holder is the wrapper's base module, as in :func:`submodule`; the wrapper's own children
    (``base_layer`` itself, its adapter weights) stay the wrapper's."""
    parent_path, _, child = path.rpartition(".")
    parent = submodule(model, parent_path)
    if isinstance(parent, AdapterLayer) and child in parent.base_layer._modules:
        parent = parent.base_layer
    return parent, child


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, child = get_submodule_parent(model, path)
    setattr(parent, child, new)


def adapter_layers(model: nn.Module):
    """(path, AdapterLayer) for every wrapper in ``model``, by its plain path (a wrapper nested in another one's
    base module, e.g. LoRA on experts inside a bottleneck-wrapped MoE block, without the outer ``base_layer``)."""
    seen: set[int] = set()

    def visit(path: str, module: nn.Module):
        if id(module) in seen:
            return
        seen.add(id(module))
        if isinstance(module, AdapterLayer):
            yield path, module
            module = module.base_layer
        for name, child in module.named_children():
            if child is not None:
                yield from visit(f"{path}.{name}" if path else name, child)

    yield from visit("", model)


def wrapped_layers(model: nn.Module, adapter_name: str | None = None):
    """(path, layer) for every AdapterLayer that holds ``adapter_name`` (any adapter when None)."""
    for path, module in adapter_layers(model):
        if adapter_name is None or adapter_name in module.slots:
            yield path, module


def slots_of(model: nn.Module, adapter_name: str) -> dict[str, Slot]:
    """{module path: slot} of one adapter."""
    return {path: layer.slots[adapter_name] for path, layer in wrapped_layers(model, adapter_name)}


def base_layer_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdapterLayer) else module
