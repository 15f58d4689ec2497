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

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import PeftConfig, check_bool, check_int, check_number
from ...core.layer import Slot, layer_dims, weight_shape
from ...core.registry import Injected, Method, register_method
from ...core.state import base_layer_of, submodule
from ...util.errors import ConfigError, TargetError
from . import estimate
from .sites import find_norms, find_sites

STYLES = ("houlsby", "pfeiffer", "parallel")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh}


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
        check_number("adapter", "dropout", self.dropout, low=0, high=1, high_open=True)
        check_number("adapter", "scale", self.scale)
        check_bool("adapter", "train_layernorm", self.train_layernorm)
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)) or not self.layers:
                raise ConfigError(f"adapter layers must be a non-empty list of block indices or None, got {self.layers!r}")
            for i in self.layers:
                check_int("adapter", "layers entry", i, low=0)
            self.layers = list(self.layers)
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
            size = d // factor
            if size < 1:
                raise ConfigError(
                    f"reduction_factor {factor} leaves no bottleneck unit for hidden size {d} (d // factor = 0); "
                    f"use a factor of at most {d}, or bottleneck_size"
                )
        return size


class BottleneckSlot(Slot):
    """A bottleneck adapter on a sublayer's output projection (d_out = d).

    Tensors: ``adapter_down`` (Linear d_in -> m), ``adapter_up`` (Linear m -> d, zero at init).
    Serial: ``result + w·a(result)``. Parallel: ``result + w·s·a(u)``, u = the sublayer input
    captured by a forward pre-hook (shape (..., d)).
    """

    roles = ("adapter_down", "adapter_up")
    mergeable = False
    method = "adapter"

    def __init__(self, layer, name: str, activation: str, dropout: float, parallel: bool, scale: float) -> None:
        super().__init__(layer, name)
        self.activation = ACTIVATIONS[activation]()
        self.dropout_p = float(dropout)
        self.parallel, self.scale = parallel, scale
        self.captured: torch.Tensor | None = None

    @staticmethod
    def make_tensors(
        base_layer: nn.Module, bottleneck: int, d_in: int | None = None, d: int | None = None
    ) -> dict[str, nn.Module]:
        """``adapter_down`` (d_in -> m) and ``adapter_up`` (m -> d, zeros); d is the base's output width (given
        for a module that is not a linear layer, e.g. a whole MoE block)."""
        d = d or layer_dims(base_layer)[1]
        weight = getattr(base_layer, "weight", None)
        if weight is None:  # a MoE block: the dtype and device of its parameters
            weight = next((p for p in base_layer.parameters() if p.is_floating_point()), None)
        dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
        device = weight.device if weight is not None else None
        up = nn.Linear(bottleneck, d, device=device, dtype=dtype)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        return {"adapter_down": nn.Linear(d_in or d, bottleneck, device=device, dtype=dtype), "adapter_up": up}

    def adapt(self, h: torch.Tensor) -> torch.Tensor:
        """a(h) = W_up f(W_down D(h) + b_down) + b_up."""
        down, up = self.tensor("adapter_down"), self.tensor("adapter_up")
        x = h.to(down.weight.dtype)
        if self.dropout_p:
            x = F.dropout(x, self.dropout_p, self.training)
        return up(self.activation(down(x)))

    def contribute(self, x: torch.Tensor, result, weight: float):
        """The adapted sublayer output; a module returning a tuple (a MoE block's ``(hidden, router_logits)``)
        has its first element adapted."""
        if isinstance(result, tuple):
            return (self.contribute(x, result[0], weight), *result[1:])
        if self.parallel:
            u, self.captured = self.captured, None
            if u is None:
                raise RuntimeError("parallel adapter: the sublayer input was not captured (pre-hook missing)")
            delta = (weight * self.scale * self.adapt(u)).to(result.dtype)
            return result + delta.reshape(result.shape)  # a MoE block may return its tokens flattened (Llama-4)
        delta = self.adapt(result)
        return result + (delta if weight == 1.0 else weight * delta).to(result.dtype)

    def describe(self) -> str:
        kind = f"parallel, scale={self.scale:g}" if self.parallel else "serial"
        return f"{kind}, bottleneck={self.tensor('adapter_down').out_features}"


def _is_linear_like(module: nn.Module) -> bool:
    try:
        layer_dims(module)
    except TypeError:
        return False
    return True


def _output_width(module: nn.Module, path: str) -> int:
    """d, the width of the hidden state ``module`` outputs: a linear-like layer's out_features, or a norm's (its
    1-D scale has one entry per channel; a module named with ``ffn_out`` / ``attn_out`` may be the norm a block
    applies to its sublayer's output, as Gemma-4's ``post_feedforward_layernorm``)."""
    if _is_linear_like(module):
        return layer_dims(module)[1]
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 1:
        return weight.shape[0]
    raise TargetError(
        f"bottleneck adapter: can't tell the output width of {path} ({type(module).__name__}); name a linear layer, a "
        f"norm (its weight is one scale per channel) or a mixture-of-experts block as the sublayer output"
    )


def _inline_experts_note(model: nn.Module) -> str:
    """Why a model whose blocks hold their experts directly (Gemma-4's 26B-A4B: ``router`` and ``experts`` beside a
    dense ``mlp``, their outputs combined in the block's forward) has no feed-forward site, and what to name."""
    from ...core.structure import structure

    held = [b.inline_experts for b in structure(model).main().blocks if b.inline_experts]
    if not held:
        return ""
    return (
        f": its blocks hold their experts directly ({held[0]}) and combine them with the other feed-forward branches "
        f"in the block's own forward, so no module outputs the whole feed-forward sublayer. Name the module whose "
        f"output is that sublayer's output (before the residual add) with a regex whose first group is the layer "
        f"index, e.g. on Gemma-4 AdapterConfig(ffn_out=r'.*layers\\.(\\d+)\\.post_feedforward_layernorm') (and "
        f"ffn_in=r'.*layers\\.(\\d+)\\.pre_feedforward_layernorm' for parallel adapters)"
    )


def inject_adapter(model: nn.Module, config: AdapterConfig, txn) -> dict[str, Any]:
    """A :class:`BottleneckSlot` on each residual point that :func:`~.adapter_arch.find_sites` finds."""
    overrides = {k: getattr(config, k) for k in ("attn_out", "ffn_out", "attn_in", "ffn_in")}
    kinds = ["ffn"] if config.style == "pfeiffer" else ["attn", "ffn"]
    parallel = config.style == "parallel"
    sites = [s for s in find_sites(model, overrides) if s.kind in kinds]
    chosen = [s for s in sites if config.layers is None or s.index in config.layers]
    if config.layers is not None and sites:
        have = sorted({s.index for s in sites})
        missing = sorted(set(config.layers) - set(have))
        if missing:
            raise TargetError(
                f"adapter layers {missing} do not exist in {type(model).__name__}; its blocks are {have[0]}..{have[-1]}"
            )
    for kind in kinds:
        if kind == "attn" and sites and not any(s.kind == kind for s in sites):  # attention-free blocks (ConvNeXt)
            raise TargetError(
                f"{config.style} adapters can't be placed in {type(model).__name__}: they go "
                f"{'beside' if parallel else 'after'} both the attention and the feed-forward sublayer of each block, "
                f"and its blocks have no attention (a convolution mixes the tokens); style='pfeiffer' adapts the "
                f"feed-forward alone"
            )
        if not any(s.kind == kind for s in chosen):
            have = sorted({s.index for s in sites if s.kind == kind})
            raise TargetError(
                f"no {kind} sublayer to adapt in {type(model).__name__}"
                + (f" for layers {config.layers}; its blocks are numbered {have}" if config.layers is not None else "")
                + (_inline_experts_note(model) if kind == "ffn" and config.layers is None else "")
            )
    targets, shapes = [], {}
    for site in chosen:
        base = base_layer_of(submodule(model, site.out))
        d = site.width or _output_width(base, site.out)
        if parallel and not site.inp:
            raise TargetError(
                f"parallel adapter: no sublayer-input module for {site.kind} of block {site.index} ({site.out}); "
                f"name it with {site.kind}_in"
            )
        slot = txn.add_slot(
            site.out,
            lambda wrapper: BottleneckSlot(
                wrapper, config.adapter_name, config.activation, config.dropout, parallel, config.scale
            ),
            BottleneckSlot.make_tensors(base, config.bottleneck(site.index, d), d=d),
        )
        if parallel:
            txn.hook(submodule(model, site.inp).register_forward_pre_hook(_capture(slot), with_kwargs=True))
        targets.append(site.out)
        if site.width is None and _is_linear_like(base):  # a MoE block or a norm has no (out, in) weight to check
            shapes[site.out] = weight_shape(base)
    extra: list[str] = []
    if config.train_layernorm:
        norms = find_norms(model, config.norms, config.layers)
        if not norms:
            raise ConfigError("train_layernorm=True: no norm modules found in the blocks; name them with the `norms` regex")
        for path in norms:
            extra.extend(f"{path}.{n}" for n, _ in submodule(model, path).named_parameters())
    return Injected(targets=targets, shapes=shapes, extra_keys=extra)


def _capture(slot: BottleneckSlot):
    def hook(module, args, kwargs):
        slot.captured = args[0] if args else kwargs.get("hidden_states")

    return hook


def examples(adapter_name: str, r: int) -> dict[str, AdapterConfig]:
    """The three placements (Houlsby, Pfeiffer, parallel), bottleneck d/``r``."""
    return {style: AdapterConfig(style=style, reduction_factor=r, adapter_name=adapter_name) for style in STYLES}


register_method(
    Method(name="adapter", config_class=AdapterConfig, inject=inject_adapter, examples=examples, estimate=estimate.RULES)
)
