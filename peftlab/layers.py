"""The small protocol every layer-wrapping adapter follows, plus base-weight access.

An :class:`AdapterLayer` owns a frozen ``base_layer`` and adds trainable parameters whose
names start with the method's prefix (``lora_``, ``adapter_``...). The generic API
(merge, unmerge, disable, unwrap) talks to adapters only through this protocol.

Base weights are read and written through :func:`get_base_weight` / :func:`set_base_weight`,
which dispatch on the base layer type: plain ``nn.Linear`` and GPT-2 ``Conv1D`` here;
quantized types register handlers (see :func:`register_weight_handler`), so merging into a
quantized base dequantizes, adds and requantizes without the methods knowing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .errors import MergeError

# (predicate, getter, setter): getter(module) -> dense weight (out, in) in a float dtype;
# setter(module, dense_weight) writes it back (requantizing where needed).
_WEIGHT_HANDLERS: list[tuple[Callable, Callable, Callable]] = []


def register_weight_handler(predicate: Callable, getter: Callable, setter: Callable) -> None:
    """Register weight access for a base-layer type (checked before the plain handlers)."""
    _WEIGHT_HANDLERS.insert(0, (predicate, getter, setter))


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style Conv1D: weight stored as (in_features, out_features)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like module."""
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features, module.out_features
    raise TypeError(f"cannot read in/out features of {type(module).__name__}")


def weight_shape(module: nn.Module) -> list[int]:
    """The logical (out_features, in_features) shape of a linear-like module's weight."""
    d_in, d_out = layer_dims(module)
    return [d_out, d_in]


def get_base_weight(module: nn.Module) -> torch.Tensor:
    """Dense (out, in) weight of a linear-like base layer (a view for plain layers)."""
    for pred, getter, _ in _WEIGHT_HANDLERS:
        if pred(module):
            return getter(module)
    if is_conv1d(module):
        return module.weight.data.t()
    return module.weight.data


def set_base_weight(module: nn.Module, dense: torch.Tensor) -> None:
    """Write a dense (out, in) weight back into ``module`` (requantizing if needed)."""
    for pred, _, setter in _WEIGHT_HANDLERS:
        if pred(module):
            setter(module, dense)
            return
    target = module.weight.data
    target.copy_(dense.t() if is_conv1d(module) else dense)


def add_to_base_weight(module: nn.Module, delta: torch.Tensor) -> None:
    """W <- W + delta, computed in fp32 and cast back to the weight's dtype. delta: (out, in)."""
    weight = get_base_weight(module)
    merged = weight.float() + delta.float().to(weight.device)
    set_base_weight(module, merged.to(weight.dtype) if weight.is_floating_point() else merged)


class AdapterLayer(nn.Module):
    """Base of every layer that wraps a frozen ``base_layer``.

    Subclasses implement :meth:`delta_weight` (if mergeable) and ``forward``; they check
    :attr:`active` to decide whether the adapter path runs.
    """

    #: Prefix shared by all adapter parameter names of this method.
    prefix: str = "adapter_"
    #: Whether the adapter can be folded into the base weight.
    mergeable: bool = True

    def __init__(self, base_layer: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter_name = adapter_name
        self.merged = False
        self.enabled = True

    @property
    def active(self) -> bool:
        """True when the adapter path must run in forward (enabled and not merged)."""
        return self.enabled and not self.merged

    def delta_weight(self) -> torch.Tensor:
        """The (out, in) weight update this adapter represents."""
        raise MergeError(f"{type(self).__name__} cannot be merged into the base weights")

    def merge(self, safe: bool = False) -> None:
        """W <- W + ΔW. With ``safe=True`` the merged weight is checked for NaN/inf before it is written."""
        if not self.mergeable:
            raise MergeError(
                f"{type(self).__name__} adapters cannot be merged into the base weights (they add a "
                f"nonlinear bottleneck); use unwrap(model, merge=False) or keep the adapter at inference"
            )
        if self.merged:
            raise MergeError(f"adapter {self.adapter_name!r} is already merged; call unmerge() first")
        if safe:
            self.check_safe_merge()
        with torch.no_grad():
            add_to_base_weight(self.base_layer, self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def check_safe_merge(self) -> None:
        """Raise MergeError if W + ΔW would contain NaN/inf."""
        if not torch.isfinite(get_base_weight(self.base_layer).float() + self.delta_weight().float()).all():
            raise MergeError(
                f"merging adapter {self.adapter_name!r} would put NaN/inf into the base weight "
                f"({type(self.base_layer).__name__} {weight_shape(self.base_layer)}); the adapter is broken"
            )

    def unmerge(self) -> None:
        if not self.mergeable:
            raise MergeError(f"{type(self).__name__} adapters are never merged, so cannot be unmerged")
        if not self.merged:
            raise MergeError(f"adapter {self.adapter_name!r} is not merged; nothing to unmerge")
        with torch.no_grad():
            add_to_base_weight(self.base_layer, -self.delta_weight())
        self.merged = False

    def __getattr__(self, name: str):
        # Let attribute reads fall through to the wrapped layer (weight, in_features, ...), so
        # code that inspects e.g. `q_proj.weight` keeps working on a wrapped model.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)
