"""LoRA as a peftlab method: injection (a :class:`LoraSlot`, or the variant the config asks for, on every
target), bias training, and its :class:`~peftlab.core.registry.Method` entry."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from ...core.layer import is_conv1d, weight_shape
from ...core.registry import Injected, Method, register_method
from ...core.state import base_layer_of, submodule
from ...core.structure import is_linear
from ...core.targeting import resolve_targets
from ...util.errors import ConfigError
from . import estimate
from .config import LoraConfig
from .conv import conv_slot, is_conv
from .embedding import EmbeddingLoraSlot, check_embedding_config
from .interop import (
    from_peft_config,
    from_peft_key,
    prepare_peft_export,
    prepare_peft_import,
    to_peft_config,
    to_peft_key,
)
from .mha import IN_PARAM, mha_slot
from .params import ParamLoraSlot, parameter_specs
from .residual import residual_export, residual_import
from .slot import LoraSlot
from .tokens import inject_tokens
from .variants import apply_init


def inject_lora(model: nn.Module, config: LoraConfig, txn) -> dict[str, Any]:
    """Give every target a :class:`LoraSlot` (and every targeted parameter's module a :class:`ParamLoraSlot`);
    set bias trainability per ``config.bias``."""
    param_specs = parameter_specs(model, config, txn.skip)
    if config.target_parameters and config.target_modules is None:
        targets = []  # HF PEFT: target_parameters alone adapts no module
    else:
        targets = resolve_targets(model, config.target_modules, predicate=is_lora_target, skip=txn.skip)
    both = sorted(set(targets) & set(param_specs))
    if both:
        raise ConfigError(
            f"module(s) {both[:3]} are targeted both by target_modules and target_parameters; a module's LoRA goes "
            f"on its output or on its parameters, not both (HF PEFT refuses this too): drop one of them"
        )
    check_patterns(config, targets + [f"{p}.{n}" for p, specs in param_specs.items() for n in specs])
    shapes, init_state = {}, {}
    for path in targets:
        base = base_layer_of(submodule(model, path))
        r, alpha = config.rank_and_alpha(path)
        scaling = config.scaling(r, alpha)
        if isinstance(base, nn.Embedding):
            check_embedding_config(config, path)
            tensors, cls = EmbeddingLoraSlot.make_tensors(base, r), EmbeddingLoraSlot
        elif is_conv(base):
            tensors, cls = conv_slot(base, r, config, path)
        elif isinstance(base, nn.MultiheadAttention):
            tensors, cls = mha_slot(base, r, config, path)
        else:
            tensors = LoraSlot.make_tensors(base, r)
            cls = apply_init(model, path, base, tensors, config, r, scaling, txn, init_state)  # init, DoRA magnitude
        txn.add_slot(
            path,
            lambda layer, r=r, alpha=alpha, scaling=scaling, cls=cls: cls(
                layer, config.adapter_name, r, alpha, scaling, config.dropout, config.use_kernel
            ),
            tensors,
        )
        if isinstance(base, nn.MultiheadAttention):  # no (out, in) weight: the packed q/k/v one's shape
            shapes[f"{path}.{IN_PARAM}"] = list(base.in_proj_weight.shape)
        else:
            shapes[path] = weight_shape(base)
    for path, specs in param_specs.items():
        base = base_layer_of(submodule(model, path))
        shapes.update({f"{path}.{n}": list(getattr(base, n).shape) for n in specs})
        tensors = ParamLoraSlot.make_tensors(base, specs, gaussian=config.init == "gaussian")
        txn.add_slot(path, lambda layer, specs=specs: ParamLoraSlot(layer, config.adapter_name, specs), tensors)
    token_paths = inject_tokens(model, config, txn, targets) if config.trainable_token_indices else []
    for path in token_paths:
        shapes[path] = weight_shape(base_layer_of(submodule(model, path)))
    extra: list[str] = []
    if config.bias == "all":
        skip = tuple(f"{path}." for path in txn.skip)  # modules_to_save copies carry their own biases
        extra = [n for n, p in model.named_parameters() if "bias" in n and ".lora_" not in n and not n.startswith(skip)]
    elif config.bias == "lora_only":
        extra = [f"{path}.base_layer.bias" for path in targets if getattr(base_layer_of(submodule(model, path)), "bias", None) is not None]
    fan_in_fan_out = any(is_conv1d(base_layer_of(submodule(model, t))) for t in targets)
    info = {"fan_in_fan_out": fan_in_fan_out}
    if param_specs:
        info["target_parameters"] = [f"{p}.{n}" for p, specs in param_specs.items() for n in specs]
    if token_paths:
        info["trainable_tokens"] = token_paths
    return Injected(targets=targets + list(param_specs) + token_paths, shapes=shapes, extra_keys=extra, info=info)


def is_lora_target(module: nn.Module) -> bool:
    """What LoRA adapts by module: linear layers (``all-linear``'s), and ``nn.Embedding``,
    ``nn.Conv1d/2d/3d`` and ``nn.MultiheadAttention`` when named."""
    return is_linear(module) or isinstance(module, (nn.Embedding, nn.MultiheadAttention)) or is_conv(module)


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


def prepare_import(model: nn.Module, tensors: dict, state) -> dict:
    """HF PEFT import: parameter LoRA's nested keys mapped back, PiSSA/OLoRA residuals taken from our init."""
    return residual_import(model, prepare_peft_import(model, tensors, state), state)


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
        prepare_import=prepare_import,
    )
)
