r"""LoRA: Low-Rank Adaptation (Hu et al., 2021, arXiv:2106.09685).

::

            x ──────────────► W (frozen) ─────────────┐
            │                                          ▼
            └─► dropout ─► A (r×d_in) ─► B (d_out×r) ─► × s ─► (+) ─► h

    h = W x + b + s · B A dropout(x),   s = alpha / r   (rsLoRA: s = alpha / sqrt(r))

A is Kaiming-uniform and B is zero, so a freshly wrapped model computes exactly the base
model. ``merge`` folds s·B A into W; ``unmerge`` subtracts it again.

Shapes: x (..., d_in); A (r, d_in); B (d_out, r); h (..., d_out). GPT-2 ``Conv1D`` stores its
weight transposed (d_in, d_out); the layer handles both through :mod:`peftlab.layers`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import PeftConfig, check_bool, check_int, check_number, register_config
from ..errors import ConfigError
from ..inject import base_layer_of
from ..layers import AdapterLayer, Slot, is_conv1d, layer_dims, weight_shape
from ..registry import Method, register_method
from ..targeting import resolve_targets
from .lora_init import from_peft_init, residual_export, residual_import

BIAS_OPTIONS = ("none", "all", "lora_only")


@register_config
@dataclass
class LoraConfig(PeftConfig):
    r"""LoRA hyper-parameters.

    Args:
        r: rank of the update (> 0).
        alpha: scaling numerator (> 0); the update is scaled by alpha/r (or alpha/sqrt(r)).
        dropout: dropout on the adapter input, in [0, 1).
        use_rslora: rank-stabilised scaling alpha/sqrt(r) (Kalajievski, 2023).
        bias: "none", "all" (every bias in the model trains) or "lora_only" (biases of the
            adapted layers train).
        rank_pattern / alpha_pattern: per-module overrides, ``{name_or_regex: value}``; a key
            matches a module path when ``re.match(rf"(.*\.)?({key})$", path)`` does.
        use_kernel: "auto" (Triton on CUDA when importable, torch otherwise), "triton" or "torch".
        use_dora: weight-decomposed LoRA (DoRA, :mod:`peftlab.methods.dora`): a trained magnitude per
            output unit times the row-normalised W + s·B A.
        init: "default" (Kaiming A, zero B), "gaussian", "pissa", "pissa_niter_N", "olora", "loftq" or
            "loftq_iter_N" (:mod:`peftlab.methods.lora_init`).
    """

    method = "lora"

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    use_rslora: bool = False
    bias: str = "none"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_kernel: str = "auto"
    use_dora: bool = False
    init: str = "default"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("LoRA", "rank r", self.r, low=1)
        check_number("LoRA", "alpha", self.alpha, low=0, low_open=True)
        check_number("LoRA", "dropout", self.dropout, low=0, high=1, high_open=True)
        check_bool("LoRA", "use_rslora", self.use_rslora)
        if self.bias not in BIAS_OPTIONS:
            raise ConfigError(f"LoRA bias must be one of {BIAS_OPTIONS}, got {self.bias!r}")
        if self.use_kernel not in ("auto", "triton", "torch"):
            raise ConfigError(f"use_kernel must be 'auto', 'triton' or 'torch', got {self.use_kernel!r}")
        for field_name in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, field_name), dict):
                raise ConfigError(f"LoRA {field_name} must be a dict {{module name or regex: value}}, got {getattr(self, field_name)!r}")
        for key, value in self.rank_pattern.items():
            check_int("LoRA", f"rank_pattern[{key!r}]", value, low=1)
        for key, value in self.alpha_pattern.items():
            check_number("LoRA", f"alpha_pattern[{key!r}]", value, low=0, low_open=True)
        check_bool("LoRA", "use_dora", self.use_dora)
        from .lora_init import check_config

        check_config(self)

    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        """Rank and alpha for the module at ``path`` after the per-module patterns."""
        return pattern_value(self.rank_pattern, path, self.r), pattern_value(
            self.alpha_pattern, path, self.alpha
        )

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def pattern_value(pattern: dict[str, Any], path: str, default: Any) -> Any:
    """The value of the first key of ``pattern`` that matches ``path`` as HF PEFT does."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def adapter_tensor_kwargs(base_layer: nn.Module) -> dict:
    """``device``/``dtype`` keyword arguments for new adapter tensors of ``base_layer`` (see :func:`adapter_dtype`)."""
    weight = getattr(base_layer, "weight", None)
    return {"device": weight.device if weight is not None else None, "dtype": adapter_dtype(base_layer)}


class LowRankTensors:
    """``lora_A`` / ``lora_B`` of a slot, read from its layer's role dicts (shared by the LoRA-family slots)."""

    @property
    def lora_A(self) -> nn.Parameter:
        return self.layer.lora_A[self.name]

    @property
    def lora_B(self) -> nn.Parameter:
        return self.layer.lora_B[self.name]


def adapter_dtype(base_layer: nn.Module) -> torch.dtype:
    """Adapter weights train in fp32 when the base is half precision or quantized (as HF PEFT)."""
    weight = getattr(base_layer, "weight", None)
    if weight is None or not weight.is_floating_point() or weight.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return weight.dtype


class LoraSlot(LowRankTensors, Slot):
    """One LoRA adapter on a linear-like layer (``nn.Linear``, ``Conv1D``, bitsandbytes linears).

    Tensors (in the layer's per-role dicts, keyed by adapter name): ``lora_A`` (r, d_in),
    Kaiming-uniform; ``lora_B`` (d_out, r), zero. Contribution: ``result + w·s·(D(x) Aᵀ) Bᵀ``.
    As the only running slot with weight 1 it takes the fused path (:func:`lora_forward`: the
    lean autograd function on the CPU, the Triton kernel on CUDA), which computes the base term too.

    Args:
        layer: the owning :class:`~peftlab.layers.AdapterLayer`; name: the adapter name.
        r, alpha, scaling: rank, alpha and the resulting scale s.
        dropout: dropout probability on the adapter input.
        use_kernel: "auto", "triton" or "torch" (see :class:`LoraConfig`).
    """

    roles = ("lora_A", "lora_B")
    method = "lora"

    def __init__(
        self, layer, name: str, r: int, alpha: float, scaling: float, dropout: float = 0.0, use_kernel: str = "auto"
    ) -> None:
        super().__init__(layer, name)
        self.in_features, self.out_features = layer_dims(layer.base_layer)
        self.r, self.alpha, self.scaling = r, alpha, scaling
        self.dropout_p = float(dropout)
        self.use_kernel = use_kernel
        self.fan_in_fan_out = is_conv1d(layer.base_layer)

    @staticmethod
    def make_tensors(base_layer: nn.Module, r: int) -> dict[str, nn.Parameter]:
        """Fresh ``lora_A`` (r, d_in), Kaiming-uniform(a=√5) as nn.Linear, and ``lora_B`` (d_out, r) = 0."""
        d_in, d_out = layer_dims(base_layer)
        kw = adapter_tensor_kwargs(base_layer)
        lora_a = nn.Parameter(torch.empty(r, d_in, **kw))
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
        return {"lora_A": lora_a, "lora_B": nn.Parameter(torch.zeros(d_out, r, **kw))}

    def delta_weight(self) -> torch.Tensor:
        """s · B A, shape (d_out, d_in), fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def fused_forward(self, x: torch.Tensor, weight: float) -> torch.Tensor | None:
        if weight != 1.0:
            return None
        from .lora_ops import lora_forward

        return lora_forward(self, x)

    def contribute(self, x: torch.Tensor, result: torch.Tensor, weight: float) -> torch.Tensor:
        from .lora_ops import lora_delta

        return (result + lora_delta(self, x, self.scaling * weight)).to(result.dtype)

    def describe(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, dropout={self.dropout_p:g}"


def lora_layer(
    base_layer: nn.Module,
    r: int = 8,
    alpha: float = 16,
    scaling: float | None = None,
    dropout: float = 0.0,
    use_kernel: str = "auto",
    name: str = "default",
) -> AdapterLayer:
    """A standalone :class:`~peftlab.layers.AdapterLayer` around ``base_layer`` with one active LoRA slot.

    For using LoRA on a single module outside :func:`peftlab.wrap`; ``layer.slots[name]`` is the slot.
    """
    layer = AdapterLayer(base_layer)
    scale = alpha / r if scaling is None else scaling
    layer.add_slot(LoraSlot(layer, name, r, alpha, scale, dropout, use_kernel), LoraSlot.make_tensors(base_layer, r))
    layer.active = [name]
    return layer


def inject_lora(model: nn.Module, config: LoraConfig, txn) -> dict[str, Any]:
    """Give every target a :class:`LoraSlot`; set bias trainability per ``config.bias``."""
    from ..targeting import is_linear
    from .lora_init import apply_init

    targets = resolve_targets(model, config.target_modules, predicate=is_linear, skip=txn.skip)
    check_patterns(config, targets)
    shapes, init_state = {}, {}
    for path in targets:
        base = base_layer_of(model.get_submodule(path))
        shapes[path] = weight_shape(base)
        r, alpha = config.rank_and_alpha(path)
        scaling = config.scaling(r, alpha)
        tensors = LoraSlot.make_tensors(base, r)
        cls = apply_init(model, path, base, tensors, config, r, scaling, txn, init_state)  # init, DoRA magnitude
        txn.add_slot(
            path,
            lambda layer, r=r, alpha=alpha, scaling=scaling, cls=cls: cls(
                layer, config.adapter_name, r, alpha, scaling, config.dropout, config.use_kernel
            ),
            tensors,
        )
    extra: list[str] = []
    if config.bias == "all":
        skip = tuple(f"{path}." for path in txn.skip)  # modules_to_save copies carry their own biases
        extra = [n for n, p in model.named_parameters() if "bias" in n and ".lora_" not in n and not n.startswith(skip)]
    elif config.bias == "lora_only":
        extra = [f"{path}.base_layer.bias" for path in targets if getattr(base_layer_of(model.get_submodule(path)), "bias", None) is not None]
    fan_in_fan_out = any(is_conv1d(base_layer_of(model.get_submodule(t))) for t in targets)
    return {"targets": targets, "shapes": shapes, "extra_keys": extra, "info": {"fan_in_fan_out": fan_in_fan_out}}


def check_patterns(config, targets: list[str]) -> None:
    """Every ``rank_pattern`` / ``alpha_pattern`` key must match a targeted module."""
    for field_name in ("rank_pattern", "alpha_pattern"):
        pattern = getattr(config, field_name, None) or {}
        for key in pattern:
            if not any(re.match(rf"(.*\.)?({key})$", t) for t in targets):
                names = sorted({t.rsplit(".", 1)[-1] for t in targets})
                raise ConfigError(
                    f"{field_name} key {key!r} matches no targeted module; targeted modules end in "
                    f"{', '.join(names)} (e.g. {targets[0]})"
                )


# ---- HF PEFT interop ---------------------------------------------------------------------------

PEFT_PREFIX = "base_model.model."


def to_peft_key(key: str) -> str:
    """``x.lora_A`` -> ``base_model.model.x.lora_A.weight``; other keys just get the prefix."""
    if key.endswith(".lora_magnitude"):  # DoRA
        key = key + "_vector"
    if key.endswith((".lora_A", ".lora_B")):
        key = key + ".weight"
    return PEFT_PREFIX + key


def from_peft_key(key: str) -> str:
    key = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
    if key.endswith((".lora_A.weight", ".lora_B.weight")):
        key = key[: -len(".weight")]
    if key.endswith(".lora_magnitude_vector"):  # DoRA
        key = key[: -len("_vector")]
    return key


def to_peft_config(config: LoraConfig, state) -> dict[str, Any]:
    from .lora_init import residual_peft_config, to_peft_init

    return residual_peft_config(config, {
        "peft_type": "LORA",
        "task_type": state.info.get("task_type"),
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "bias": config.bias,
        "target_modules": sorted({t.rsplit(".", 1)[-1] for t in state.targets}),
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "modules_to_save": config.modules_to_save,
        "fan_in_fan_out": state.info.get("fan_in_fan_out", False),
        "init_lora_weights": to_peft_init(config)[0],
        "use_dora": config.use_dora,
        "inference_mode": True,
        "base_model_name_or_path": state.base_model_name,
    })


def from_peft_config(data: dict[str, Any]) -> LoraConfig:
    unsupported = {
        k: data[k]
        for k in ("layers_to_transform", "megatron_config")
        if data.get(k) not in (None, False, [], {})
    }
    if unsupported:
        raise ConfigError(f"HF PEFT LoRA options not supported by peftlab: {unsupported}")
    targets = data.get("target_modules")
    if isinstance(targets, (list, set, tuple)):
        targets = sorted(targets)
    return LoraConfig(
        r=data["r"],
        alpha=data.get("lora_alpha", 8),
        dropout=data.get("lora_dropout", 0.0),
        use_rslora=data.get("use_rslora", False),
        bias=data.get("bias", "none"),
        target_modules=targets,
        rank_pattern=data.get("rank_pattern") or {},
        alpha_pattern=data.get("alpha_pattern") or {},
        modules_to_save=data.get("modules_to_save"),
        use_dora=bool(data.get("use_dora", False)),
        init=from_peft_init(data),
    )


register_method(
    Method(
        name="lora",
        inject=inject_lora,
        peft_type="LORA",
        to_peft_config=to_peft_config,
        from_peft_config=from_peft_config,
        to_peft_key=to_peft_key,
        from_peft_key=from_peft_key,
        prepare_export=residual_export,
        prepare_import=residual_import,
    )
)
