"""LoRA as a peftlab method: injection (a :class:`LoraSlot`, or the variant the config asks for, on every
target), bias training, and its :class:`~peftlab.core.registry.Method` entry."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from ...core.layer import is_conv1d, weight_shape
from ...core.registry import Injected, Method, register_method
from ...core.state import base_layer_of
from ...core.structure import is_linear
from ...core.targeting import resolve_targets
from ...util.errors import ConfigError
from . import estimate
from .config import LoraConfig
from .interop import from_peft_config, from_peft_key, prepare_peft_export, to_peft_config, to_peft_key
from .residual import residual_export, residual_import
from .slot import LoraSlot
from .variants import apply_init


def inject_lora(model: nn.Module, config: LoraConfig, txn) -> dict[str, Any]:
    """Give every target a :class:`LoraSlot`; set bias trainability per ``config.bias``."""
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
    return Injected(targets=targets, shapes=shapes, extra_keys=extra, info={"fan_in_fan_out": fan_in_fan_out})


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


def prepare_export(model: nn.Module, tensors: dict, state) -> dict:
    """HF PEFT export: exact ``target_modules`` (:func:`.interop.prepare_peft_export`), PiSSA/OLoRA folded."""
    return residual_export(model, prepare_peft_export(model, tensors, state), state)


def examples(adapter_name: str, r: int) -> dict[str, LoraConfig]:
    """LoRA and its variants (DoRA, PiSSA's residual init) on every linear layer, for the contract suite."""
    base = {"r": r, "alpha": 2 * r, "target_modules": "all-linear", "adapter_name": adapter_name}
    return {"lora": LoraConfig(**base), "dora": LoraConfig(**base, use_dora=True), "pissa": LoraConfig(**base, init="pissa")}


register_method(
    Method(
        name="lora",
        config_class=LoraConfig,
        inject=inject_lora,
        examples=examples,
        estimate=estimate.RULES,
        peft_type="LORA",
        to_peft_config=to_peft_config,
        from_peft_config=from_peft_config,
        to_peft_key=to_peft_key,
        from_peft_key=from_peft_key,
        prepare_export=prepare_export,
        prepare_import=residual_import,
    )
)
