r"""Bottleneck adapters: Houlsby (2019), Pfeiffer (2021) and parallel (He et al., 2022).

A bottleneck maps the d-dimensional hidden state through m << d units and back::

    a(h) = W_up · f(W_down · dropout(h) + b_down) + b_up        W_down: m×d, W_up: d×m (zeros at init)

* **serial** (Houlsby, Pfeiffer): the sublayer output h becomes h + a(h), before the residual add
  (and before the LayerNorm of post-norm BERT blocks). Houlsby adapts the attention and the
  feed-forward sublayers of every block; Pfeiffer only the feed-forward one.
* **parallel** (He et al.): the adapter reads the sublayer *input* x and the sublayer output
  becomes h + s · a(x).

W_up starts at zero, so a freshly wrapped model computes exactly the base model. Each adapter
has 2·d·m + d + m parameters. Adapters are nonlinear, so they cannot be merged into the base.
Where adapters go per architecture: :mod:`peftlab.methods.adapter_arch`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import PeftConfig, register_config
from ..errors import ConfigError, TargetError
from ..inject import replace_module, wrapped_layers
from ..layers import AdapterLayer, layer_dims, weight_shape
from ..registry import Method, register_method
from .adapter_arch import sites_for

STYLES = ("houlsby", "pfeiffer", "parallel")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh}


@register_config
@dataclass
class AdapterConfig(PeftConfig):
    """Bottleneck adapter hyper-parameters.

    Args:
        style: "houlsby" (attention + FFN, serial), "pfeiffer" (FFN only, serial) or "parallel"
            (attention + FFN, reading the sublayer input).
        reduction_factor: m = d // reduction_factor; an int, or ``{layer_index: int}``.
        bottleneck_size: m directly (overrides reduction_factor); an int or ``{layer_index: int}``.
        activation: relu, gelu, silu/swish or tanh.
        layers: indices of the blocks to adapt (default: all).
        train_layernorm: also train the blocks' LayerNorms (saved with the adapter).
        dropout: dropout on the adapter input.
        scale: s, the output scale of parallel adapters.
        attn_out, ffn_out, attn_in, ffn_in, norms: regexes (first group = layer index) naming the
            modules for architectures not in the built-in table, or overriding it.
    """

    method = "adapter"

    style: str = "houlsby"
    reduction_factor: Any = 16
    bottleneck_size: Any = None
    activation: str = "relu"
    layers: list[int] | None = None
    train_layernorm: bool = False
    dropout: float = 0.0
    scale: float = 1.0
    attn_out: str | None = None
    ffn_out: str | None = None
    attn_in: str | None = None
    ffn_in: str | None = None
    norms: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_modules is not None:
            raise ConfigError(
                "bottleneck adapters don't use target_modules; name sites with attn_out/ffn_out regexes"
            )
        if self.style not in STYLES:
            raise ConfigError(f"adapter style must be one of {STYLES}, got {self.style!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"adapter dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("reduction_factor", "bottleneck_size"):
            value = getattr(self, name)
            if isinstance(value, dict):
                value = {int(k): v for k, v in value.items()}
                setattr(self, name, value)
                values = list(value.values())
            else:
                values = [] if value is None else [value]
            if any(not isinstance(v, int) or isinstance(v, bool) or v <= 0 for v in values):
                raise ConfigError(
                    f"{name} must be a positive integer or {{layer: positive integer}}, got {value!r}"
                )
        if self.reduction_factor is None and self.bottleneck_size is None:
            raise ConfigError("give reduction_factor or bottleneck_size")

    def bottleneck(self, layer: int, d: int) -> int:
        size = self.bottleneck_size
        if isinstance(size, dict):
            size = size.get(layer)
        if size is None:
            factor = (
                self.reduction_factor.get(layer, 16)
                if isinstance(self.reduction_factor, dict)
                else self.reduction_factor
            )
            size = max(1, d // factor)
        return size


class BottleneckAdapterLayer(AdapterLayer):
    """Wraps a sublayer's output projection (d_out = d) and adds a bottleneck adapter.

    Serial: y = h + a(h) with h = base(x). Parallel: y = h + s · a(u), u = the sublayer input
    captured by a pre-hook (shape (..., d)).
    """

    prefix = "adapter_"
    mergeable = False

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        bottleneck: int,
        activation: str,
        dropout: float,
        parallel: bool = False,
        scale: float = 1.0,
        d_in: int | None = None,
    ) -> None:
        super().__init__(base_layer, adapter_name)
        _, d = layer_dims(base_layer)
        weight = getattr(base_layer, "weight", None)
        dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
        device = weight.device if weight is not None else None
        self.parallel, self.scale = parallel, scale
        self.adapter_down = nn.Linear(d_in or d, bottleneck, device=device, dtype=dtype)
        self.adapter_act = ACTIVATIONS[activation]()
        self.adapter_up = nn.Linear(bottleneck, d, device=device, dtype=dtype)
        self.adapter_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self._sublayer_input: torch.Tensor | None = None

    def adapt(self, h: torch.Tensor) -> torch.Tensor:
        x = self.adapter_dropout(h.to(self.adapter_down.weight.dtype))
        return self.adapter_up(self.adapter_act(self.adapter_down(x)))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        h = self.base_layer(x, *args, **kwargs)
        u, self._sublayer_input = self._sublayer_input, None
        if not self.active:
            return h
        if self.parallel:
            if u is None:
                raise RuntimeError("parallel adapter: the sublayer input was not captured (pre-hook missing)")
            return h + (self.scale * self.adapt(u)).to(h.dtype)
        return h + self.adapt(h).to(h.dtype)

    def extra_repr(self) -> str:
        kind = f"parallel, scale={self.scale:g}" if self.parallel else "serial"
        return f"adapter={self.adapter_name!r}, {kind}, bottleneck={self.adapter_down.out_features}"


def _matches(model: nn.Module, pattern: str, layers: list[int] | None) -> dict[int, str]:
    found = {}
    for path, _ in model.named_modules():
        m = re.fullmatch(pattern, path)
        if m and (layers is None or int(m.group(1)) in layers):
            found[int(m.group(1))] = path
    return found


def inject_adapter(model: nn.Module, config: AdapterConfig, skip: list[str] = ()) -> dict[str, Any]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    sites = sites_for(
        model_type, {k: getattr(config, k) for k in ("attn_out", "ffn_out", "attn_in", "ffn_in", "norms")}
    )
    kinds = ["ffn"] if config.style == "pfeiffer" else ["attn", "ffn"]
    parallel = config.style == "parallel"
    targets, shapes, hooks = [], {}, []
    for kind in kinds:
        outs = _matches(model, getattr(sites, f"{kind}_out"), config.layers)
        if not outs:
            raise TargetError(
                f"no {kind} output module matched {getattr(sites, f'{kind}_out')!r} in {type(model).__name__}"
            )
        ins = _matches(model, getattr(sites, f"{kind}_in"), config.layers) if parallel else {}
        for layer, path in sorted(outs.items()):
            base = model.get_submodule(path)
            _, d = layer_dims(base)
            wrapper = BottleneckAdapterLayer(
                base,
                config.adapter_name,
                config.bottleneck(layer, d),
                config.activation,
                config.dropout,
                parallel,
                config.scale,
            )
            replace_module(model, path, wrapper)
            if parallel:
                if layer not in ins:
                    raise TargetError(
                        f"parallel adapter: no sublayer-input module for layer {layer} ({kind}_in)"
                    )
                hooks.append(
                    model.get_submodule(ins[layer]).register_forward_pre_hook(
                        _capture(wrapper), with_kwargs=True
                    )
                )
            targets.append(path)
            shapes[path] = weight_shape(base)
    if config.train_layernorm:
        if not sites.norms:
            raise ConfigError("train_layernorm=True needs the `norms` regex for this architecture")
        for path, module in model.named_modules():
            m = re.fullmatch(sites.norms, path)
            if m and (config.layers is None or int(m.group(1)) in config.layers):
                for p in module.parameters():
                    p.requires_grad_(True)
    return {"targets": targets, "shapes": shapes, "info": {"hooks": hooks}}


def _capture(wrapper: BottleneckAdapterLayer):
    def hook(module, args, kwargs):
        wrapper._sublayer_input = args[0] if args else kwargs.get("hidden_states")

    return hook


def remove_adapter(model: nn.Module, adapter_name: str) -> None:
    from ..inject import get_state

    for handle in get_state(model, adapter_name).info.get("hooks", []):
        handle.remove()
    for path, layer in list(wrapped_layers(model, adapter_name)):
        replace_module(model, path, layer.base_layer)


register_method(Method(name="adapter", inject=inject_adapter, remove=remove_adapter))
