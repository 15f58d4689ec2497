"""The layer protocol: one wrapper per base module holding named adapter slots, plus base-weight access.

An :class:`AdapterLayer` owns a frozen ``base_layer`` and any number of named :class:`Slot` s,
one per adapter (LoRA, AdaLoRA, bottleneck, a trained head copy ...). The generic API (merge,
unmerge, safe-merge, disable, switching, unwrap) talks to adapters only through the slot
protocol; a new variant (e.g. DoRA) is a new Slot class, not a change here.

Base weights are read and written through :func:`get_base_weight` / :func:`set_base_weight`,
which dispatch on the base layer type: plain ``nn.Linear`` and GPT-2 ``Conv1D`` here;
quantized types register handlers (see :func:`register_weight_handler`), so merging into a
quantized base dequantizes, adds and requantizes without the methods knowing.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..util.errors import MergeError, WrapError

# (predicate, getter, setter, snapshot, restore): getter(module) -> dense weight (out, in) in a float dtype;
# setter(module, dense_weight) writes it back (requantizing where needed); snapshot(module) -> an opaque
# record of the stored weight (packed data and quantization state), restore(module, record) puts it back.
_WEIGHT_HANDLERS: list[tuple[Callable, Callable, Callable, Callable | None, Callable | None]] = []


def register_weight_handler(
    predicate: Callable,
    getter: Callable,
    setter: Callable,
    snapshot: Callable | None = None,
    restore: Callable | None = None,
) -> None:
    """Register weight access for a base-layer type (checked before the plain handlers).

    A lossy (quantized) type also gives ``snapshot`` / ``restore``: a merge then keeps the stored weight
    it replaced, and the matching unmerge restores it bit for bit instead of requantizing W' − ΔW.
    """
    _WEIGHT_HANDLERS.insert(0, (predicate, getter, setter, snapshot, restore))


def snapshot_base_weight(module: nn.Module) -> Any:
    """The stored weight of a lossy base (what :func:`restore_base_weight` puts back); None for exact bases."""
    for pred, _, _, snapshot, _ in _WEIGHT_HANDLERS:
        if pred(module):
            return snapshot(module) if snapshot is not None else None
    return None


def restore_base_weight(module: nn.Module, record: Any) -> None:
    """Put back a weight recorded by :func:`snapshot_base_weight`."""
    for pred, _, _, _, restore in _WEIGHT_HANDLERS:
        if pred(module):
            restore(module, record)
            return
    raise MergeError(f"no weight handler can restore a {type(module).__name__} base")


def base_param(module: nn.Module, name: str) -> torch.Tensor:
    """The tensor ``name`` of ``module``; a dotted name reaches into a submodule (``out_proj.weight``)."""
    owner, _, leaf = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, leaf)


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style Conv1D: weight stored as (in_features, out_features)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like module (of its base, for a peftlab wrapper)."""
    if isinstance(module, AdapterLayer):
        module = module.base_layer
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    if isinstance(module, nn.Embedding):  # a linear map of one-hot token ids: d_in = vocabulary, d_out = width
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.modules.conv._ConvNd):  # channels (the weight's shape: :func:`weight_shape`)
        return module.in_channels, module.out_channels
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features, module.out_features
    raise TypeError(f"cannot read in/out features of {type(module).__name__}")


def weight_shape(module: nn.Module) -> list[int]:
    """The logical (out_features, in_features) shape of a linear-like module's weight; a convolution's whole
    (C_out, C_in/groups, *kernel) weight shape."""
    if isinstance(module, AdapterLayer):
        module = module.base_layer
    if isinstance(module, nn.modules.conv._ConvNd):
        return list(module.weight.shape)
    d_in, d_out = layer_dims(module)
    return [d_out, d_in]


def get_base_weight(module: nn.Module) -> torch.Tensor:
    """Dense (out, in) weight of a linear-like base layer (a view for plain layers; an ``nn.Embedding``'s
    (vocabulary, width) table transposed, as the linear map of one-hot ids it is)."""
    for pred, getter, *_ in _WEIGHT_HANDLERS:
        if pred(module):
            return getter(module)
    if is_conv1d(module) or isinstance(module, nn.Embedding):  # stored (in, out)
        return module.weight.data.t()
    return module.weight.data


def set_base_weight(module: nn.Module, dense: torch.Tensor) -> None:
    """Write a dense (out, in) weight back into ``module`` (requantizing if needed)."""
    for pred, _, setter, *_ in _WEIGHT_HANDLERS:
        if pred(module):
            setter(module, dense)
            return
    target = module.weight.data
    target.copy_(dense.t() if is_conv1d(module) or isinstance(module, nn.Embedding) else dense)


#: Every per-role dict name a slot class stores tensors in (``lora_A``, ``adapter_down``...), plus
#: model-level tables (``peftlab_prefix``); a key segment after one of these is an adapter name.
SLOT_ROLES: set[str] = set()


class Slot:
    """One named adapter inside an :class:`AdapterLayer`: hyper-parameters plus the variant protocol.

    A slot's tensors live in the layer's per-role dicts (``layer.lora_A[name]``, ...), so their
    parameter names carry the adapter name (``q_proj.lora_A.<name>``) and ``.to()``/``state_dict``
    see them as ordinary submodule state. The slot itself is a plain object that knows its layer.

    The variant protocol, all that the generic code (forward, merge, unmerge, safe-merge, disable)
    ever calls:

    * :meth:`contribute` ``(x, result, weight) -> result'``: its forward contribution;
    * :meth:`merged` ``(W, weight) -> W'`` and :meth:`unmerged` ``(W', weight) -> W`` on the dense
      (out, in) fp32 base weight. Additive variants only define :meth:`delta_weight`;
      multiplicative or normalised ones (DoRA) override the pair.

    Optional: :meth:`fused_forward` (base + contribution in one op, used when the slot is the only
    one running) and ``replaces_base`` (the slot computes the whole output, e.g. a trained copy of a
    ``modules_to_save`` head).
    """

    #: The layer attributes (per-role dicts) this kind of slot stores tensors in.
    roles: tuple[str, ...] = ()
    #: Whether the adapter can be folded into the base weight.
    mergeable: bool = True
    #: True when the slot's forward replaces the base layer's instead of adding to it.
    replaces_base: bool = False
    #: The method name (for error messages and combine checks).
    method: str = ""
    #: Names of parameters of the base module that this slot adapts in place (3-D expert stacks, a router's
    #: weight) instead of adding to the module's output; empty for output-adding slots. Such a slot answers
    #: :meth:`reparametrized`, and the layer runs the base module's own forward on the adapted values.
    params: tuple[str, ...] = ()
    #: For a slot with ``params``: whether a mixed batch may run the base module once per group of rows (every tensor
    #: argument and output with the input's leading size holds one entry per row or token of a row, as an MoE block's
    #: experts and router); False: mixed batches refuse the slot.
    rows_separable: bool = True
    #: True when the adapter adapts every module that shares the base weight alike (trainable tokens and their tied
    #: head): merging into the shared weight then keeps the outputs of all of them, so no tie warning.
    keeps_ties: bool = False
    #: False when ``combine`` cannot rebuild the adapter as a LoRA from its ΔW (a convolution's kernel-shaped update,
    #: replaced embedding rows): combining it is refused with the reason.
    combinable: bool = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        SLOT_ROLES.update(cls.roles)

    def __init__(self, layer: AdapterLayer, name: str) -> None:
        self.layer = layer
        self.name = name

    # -- access ----------------------------------------------------------------------------------
    @property
    def base_layer(self) -> nn.Module:
        return self.layer.base_layer

    @property
    def training(self) -> bool:
        return self.layer.training

    def tensor(self, role: str):
        """This slot's entry in the layer's ``role`` dict (a Parameter or a Module)."""
        return getattr(self.layer, role)[self.name]

    # -- the variant protocol --------------------------------------------------------------------
    def contribute(self, x: torch.Tensor, result: torch.Tensor, weight: float) -> torch.Tensor:
        raise NotImplementedError

    def fused_forward(self, x: torch.Tensor, weight: float) -> torch.Tensor | None:
        """base(x) + contribution in one op, or None when there is no fused path."""
        return None

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A (r, d_in), B (d_out, r), s) when the contribution is exactly ``s · (x Aᵀ) Bᵀ``; else None.

        What ``combine`` and mixed batches (stacked tables) read; a slot that is not a plain low-rank
        product (DoRA, bottleneck adapters, head copies) keeps the default None.
        """
        return None

    def dropout_input(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(x', c): the adapter input of a training forward with the slot's dropout applied, drawn exactly as the
        slot's own training forward draws it (same calls on the same RNG), and the factor c its low-rank term
        takes on top of ``low_rank_factors``'s s (inverted dropout's 1/(1-p) where x' leaves it out).

        Mixed batches in training call it once per segment of rows (under that job's random stream) for the
        slots that answer ``low_rank_factors()``. Default: no dropout, (x, 1.0).
        """
        return x, 1.0

    def delta_weight(self) -> torch.Tensor:
        """The (out, in) fp32 update ΔW of an additive variant."""
        raise MergeError(f"{type(self).__name__} adapters cannot be merged into the base weights")

    def merged(self, weight_matrix: torch.Tensor, weight: float) -> torch.Tensor:
        """W -> W' (dense (out, in), fp32). Additive: W + w·ΔW."""
        return weight_matrix + weight * self.delta_weight().to(weight_matrix.device)

    def unmerged(self, weight_matrix: torch.Tensor, weight: float) -> torch.Tensor:
        """W' -> W, the inverse of :meth:`merged`. Additive: W' − w·ΔW."""
        return weight_matrix - weight * self.delta_weight().to(weight_matrix.device)

    def reparametrized(self, param: str, value: torch.Tensor, weight: float) -> torch.Tensor:
        """value + w·ΔW of base parameter ``param`` (differentiable; ``weight`` −w undoes a merge)."""
        raise MergeError(f"{type(self).__name__} adapts no base parameter {param!r}")

    def param_low_rank_factors(self, param: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A (E, r, d_in), B (E, d_out, r), s) when the update of base parameter ``param`` is, per expert e,
        s · B_e A_e in the (d_out, d_in) orientation (a 2-D weight: E = 1); what ``combine`` stacks. None (the
        default): not such a product, and ``combine`` refuses the slot."""
        return None

    def param_tensors(self, param: str, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        """This slot kind's stored tensors for factors ``a`` (E, r, d_in), ``b`` (E, d_out, r) of ``param`` (the
        inverse of :meth:`param_low_rank_factors`, s = 1), keyed relative to the layer as ``adapter_tensors``
        names them without the adapter name (``combine`` writes a new adapter with them)."""
        raise MergeError(f"{type(self).__name__} adapts no base parameter {param!r} through low-rank factors")

    def describe(self) -> str:
        return ""


def _describe_base(module: nn.Module) -> str:
    try:
        return f"{type(module).__name__} {weight_shape(module)}"
    except TypeError:
        return type(module).__name__


class AdapterLayer(nn.Module):
    """One wrapper per adapted base module, holding any number of named :class:`Slot` s.

    Attributes:
        base_layer: the frozen module it wraps.
        slots: ``{adapter_name: Slot}`` in insertion order.
        active: the adapter names that run in forward (those present here).
        weights: ``{name: w}``; with several active, the contributions add, each scaled by w.
        disabled: names switched off by :func:`peftlab.disable_adapters`.
        merged_stack: ``[(name, w)]`` merged into the base weight, unmerged in LIFO order.

    Forward: ``result = base(x)``; then, for each running slot (active, not merged, not
    disabled) in order, ``result = slot.contribute(x, result, w)``. A single running slot with a
    fused path (the LoRA autograd function / Triton kernel) takes it instead, so one adapter
    costs exactly what it did before slots existed. A routing object set on the layer (``layer.router``,
    e.g. a mixed batch of :mod:`peftlab.serving`) decides the forward instead.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.slots: dict[str, Slot] = {}
        self.active: list[str] = []
        self.weights: dict[str, float] = {}
        self.disabled: set[str] = set()
        self.merged_stack: list[tuple[str, float]] = []
        self.router = None  # a routing object set per forward (``router.forward(layer, x, ...)``), or None

    # -- slots -----------------------------------------------------------------------------------
    def add_slot(self, slot: Slot, tensors: dict[str, Any]) -> Slot:
        """Register ``slot`` and its tensors ``{role: Parameter | Module}`` under its name."""
        if slot.name in self.slots:
            raise WrapError(f"module already has an adapter named {slot.name!r}")
        for role, value in tensors.items():
            store = self._modules.get(role) if role in self._modules else None
            if store is None:
                store = nn.ParameterDict() if isinstance(value, nn.Parameter) else nn.ModuleDict()
                self.add_module(role, store)
            store[slot.name] = value
        self.slots[slot.name] = slot
        return slot

    def remove_slot(self, name: str) -> None:
        slot = self.slots.pop(name)
        for role in list(self._modules):
            store = self._modules[role]
            if role != "base_layer" and isinstance(store, (nn.ParameterDict, nn.ModuleDict)) and name in store:
                del store[name]
                if len(store) == 0:
                    delattr(self, role)
        self.active = [n for n in self.active if n != name]
        self.weights.pop(name, None)
        self.disabled.discard(name)
        del slot

    def running(self) -> list[tuple[Slot, float]]:
        """(slot, weight) of every slot that contributes to forward now."""
        merged = {n for n, _ in self.merged_stack}
        return [
            (self.slots[n], self.weights.get(n, 1.0))
            for n in self.active
            if n not in merged and n not in self.disabled and n in self.slots
        ]

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.router is not None:  # a routing object decides per row (e.g. a mixed batch)
            return self.router.forward(self, x, *args, **kwargs)
        if self.merged_stack and self.training and torch.is_grad_enabled():
            self._refuse_training_merged()
        running = self.running()
        if not running:
            return self.base_layer(x, *args, **kwargs)
        if len(running) == 1 and not args and not kwargs:
            slot, weight = running[0]
            out = slot.fused_forward(x, weight)
            if out is not None:
                return out
        replacing = [s for s, _ in running if s.replaces_base]
        if replacing:
            result = replacing[0].contribute(x, None, 1.0, *args, **kwargs)
        else:
            result = self.adapted_base_forward(running, x, args, kwargs)
        for slot, weight in running:
            if not slot.replaces_base and not slot.params:
                result = slot.contribute(x, result, weight)
        return result

    def adapted_base_forward(self, running: list[tuple[Slot, float]], x: torch.Tensor, args: tuple, kwargs: dict):
        """The base module's forward, on its parameters as the running parameter slots adapt them."""
        values: dict[str, torch.Tensor] = {}
        for slot, weight in running:
            for param in slot.params:
                current = values[param] if param in values else base_param(self.base_layer, param)
                values[param] = slot.reparametrized(param, current, weight)
        if not values:
            return self.base_layer(x, *args, **kwargs)
        return torch.func.functional_call(self.base_layer, values, (x, *args), kwargs, strict=False)

    def _fold_params(self, slot: Slot, weight: float, safe: bool, name: str) -> None:
        """W ← W + w·ΔW for every base parameter ``slot`` adapts (w = −weight undoes it); all or nothing."""
        new = {}
        for param in slot.params:
            current = base_param(self.base_layer, param).data
            value = slot.reparametrized(param, current.float(), weight)
            if safe and not torch.isfinite(value).all():
                raise MergeError(
                    f"merging adapter {name!r} would put NaN/inf into {type(self.base_layer).__name__}.{param} "
                    f"{list(current.shape)}; the adapter is broken. Nothing was written (pass safe=False to merge anyway)"
                )
            new[param] = value
        for param, value in new.items():
            current = base_param(self.base_layer, param).data
            current.copy_(value.to(current.dtype))

    def _refuse_training_merged(self) -> None:
        """Warn when a merged adapter that is marked trainable runs in training mode: it gets no gradient."""
        for name, _ in self.merged_stack:
            store = [getattr(self, r) for r in self.slots[name].roles if r in self._modules]
            if any(p.requires_grad for st in store for p in ([st[name]] if isinstance(st, nn.ParameterDict) else st[name].parameters())):
                warnings.warn(
                    f"adapter {name!r} is merged into the base weights, so training it computes no gradient for it "
                    f"(backward may fail with 'does not require grad'); call peftlab.unmerge(model) before training",
                    stacklevel=3,
                )
                return

    # -- merge -----------------------------------------------------------------------------------
    def merge(self, name: str, safe: bool = True) -> None:
        """W <- slot.merged(W, w). With ``safe`` the result is checked for NaN/inf before it is written."""
        slot = self.slots[name]
        if not slot.mergeable:
            raise MergeError(
                f"{type(slot).__name__} adapters cannot be merged into the base weights (they are not "
                f"linear in the input); keep the adapter at inference or unwrap(model, merge=False)"
            )
        if any(n == name for n, _ in self.merged_stack):
            raise MergeError(f"adapter {name!r} is already merged; call unmerge() first")
        weight = self.weights.get(name, 1.0)
        if slot.params:
            with torch.no_grad():
                self._fold_params(slot, weight, safe, name)
            self.merged_stack.append((name, weight))
            return
        with torch.no_grad():
            current = get_base_weight(self.base_layer)
            new = slot.merged(current.float(), weight)
            if safe and not torch.isfinite(new).all():
                raise MergeError(
                    f"merging adapter {name!r} would put NaN/inf into the base weight "
                    f"({_describe_base(self.base_layer)}); the adapter is broken. "
                    f"Nothing was written (pass safe=False to merge anyway)"
                )
            record = snapshot_base_weight(self.base_layer)
            try:
                set_base_weight(self.base_layer, new.to(current.dtype) if current.is_floating_point() else new)
            except BaseException:  # e.g. an accurate requantization refused after the plain one was written
                if record is not None:
                    restore_base_weight(self.base_layer, record)
                raise
        self._keep_snapshot(name, record)
        self.merged_stack.append((name, weight))

    def _keep_snapshot(self, name: str, record: Any) -> None:
        """Keep the stored weight a merge of ``name`` replaced (lossy bases), dropping records of adapters
        no longer merged (e.g. folded away by unwrap)."""
        kept = self.__dict__.setdefault("_merge_snapshots", {})
        merged = {n for n, _ in self.merged_stack}
        for stale in [n for n in kept if n not in merged]:
            del kept[stale]
        if record is not None:
            kept[name] = record

    def check_merge(self, name: str) -> None:
        """Raise MergeError if merging ``name`` would write NaN/inf (touches nothing)."""
        slot = self.slots[name]
        if not slot.mergeable:
            return
        if slot.params:
            with torch.no_grad():
                for param in slot.params:
                    value = slot.reparametrized(param, base_param(self.base_layer, param).float(), self.weights.get(name, 1.0))
                    if not torch.isfinite(value).all():
                        raise MergeError(
                            f"merging adapter {name!r} would put NaN/inf into {type(self.base_layer).__name__}.{param}; "
                            f"nothing was written"
                        )
            return
        with torch.no_grad():
            new = slot.merged(get_base_weight(self.base_layer).float(), self.weights.get(name, 1.0))
            if not torch.isfinite(new).all():
                raise MergeError(
                    f"merging adapter {name!r} would put NaN/inf into the base weight of "
                    f"{type(self.base_layer).__name__} {weight_shape(self.base_layer)}; nothing was written"
                )

    def unmerge(self, name: str | None = None) -> None:
        """Undo merges in LIFO order; with ``name``, unmerge it (later merges are undone and redone)."""
        if not self.merged_stack:
            raise MergeError("no adapter is merged into this layer; nothing to unmerge")
        names = [n for n, _ in self.merged_stack]
        if name is None:
            name = names[-1]
        if name not in names:
            raise MergeError(f"adapter {name!r} is not merged here; merged: {', '.join(names)}")
        redo = []
        with torch.no_grad():
            while True:
                top, weight = self.merged_stack.pop()
                record = self.__dict__.get("_merge_snapshots", {}).pop(top, None)
                if self.slots[top].params:
                    self._fold_params(self.slots[top], -weight, False, top)
                elif record is not None:  # a lossy base: put back the very weight the merge replaced
                    restore_base_weight(self.base_layer, record)
                else:
                    current = get_base_weight(self.base_layer)
                    restored = self.slots[top].unmerged(current.float(), weight)
                    set_base_weight(
                        self.base_layer, restored.to(current.dtype) if current.is_floating_point() else restored
                    )
                if top == name:
                    break
                redo.append((top, weight))
        for top, weight in reversed(redo):
            saved = self.weights.get(top)
            self.weights[top] = weight
            self.merge(top, safe=False)
            if saved is None:
                self.weights.pop(top)
            else:
                self.weights[top] = saved

    def is_merged(self, name: str) -> bool:
        return any(n == name for n, _ in self.merged_stack)

    def extra_repr(self) -> str:
        parts = [f"{n}: {type(s).__name__}({s.describe()})" for n, s in self.slots.items()]
        return f"slots=[{'; '.join(parts)}], active={self.active}"

    def __getattr__(self, name: str):
        # Let attribute reads fall through to the wrapped layer (weight, in_features, ...), so
        # code that inspects e.g. `q_proj.weight` keeps working on a wrapped model.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "slots"):
                raise
            return getattr(self.base_layer, name)
