"""LoRA in HF PEFT's format: config fields and state-dict keys, both ways."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...core.state import base_layer_of, submodule
from ...core.targeting import exact_targets
from ...util.errors import AdapterFileError, ConfigError
from .config import LoraConfig
from .conv import check_peft_export, is_conv
from .inits import VALID_INITS, parse_init
from .mha import from_peft_key as mha_from_peft_key
from .mha import to_peft_key as mha_to_peft_key
from .mha import warn_peft_export
from .params import peft_key_map, peft_parameter_fields
from .residual import residual_peft_config

PEFT_PREFIX = "base_model.model."


def to_peft_key(key: str) -> str:
    """``x.lora_A`` -> ``base_model.model.x.lora_A.weight``, ``x.trainable_tokens_delta`` ->
    ``base_model.model.x.token_adapter.trainable_tokens_delta``; other keys just get the prefix."""
    if key.endswith(".trainable_tokens_delta"):  # HF PEFT's TrainableTokensWrapper holds its layer as token_adapter
        return PEFT_PREFIX + key[: -len("trainable_tokens_delta")] + "token_adapter.trainable_tokens_delta"
    if key.endswith(".lora_magnitude"):  # DoRA
        key = key + "_vector"
    key = mha_to_peft_key(key) or key  # nn.MultiheadAttention's out projection
    if key.endswith((".lora_A", ".lora_B")):
        key = key + ".weight"
    return PEFT_PREFIX + key


def from_peft_key(key: str) -> str:
    key = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
    if key.endswith(".token_adapter.trainable_tokens_delta"):
        return key.replace(".token_adapter.trainable_tokens_delta", ".trainable_tokens_delta")
    if key.endswith((".lora_embedding_A", ".lora_embedding_B")):  # LoRA on an nn.Embedding
        return key.replace(".lora_embedding_", ".lora_")
    if key.endswith((".lora_A.weight", ".lora_B.weight")):
        key = key[: -len(".weight")]
        key = mha_from_peft_key(key) or key
    if key.endswith(".lora_magnitude_vector"):  # DoRA
        key = key[: -len("_vector")]
    return key


def to_peft_config(config: LoraConfig, state) -> dict[str, Any]:
    params = state.live.objects.get("peft_parameters") or {}
    return residual_peft_config(config, {
        "peft_type": "LORA",
        "task_type": state.info.get("task_type"),
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "bias": config.bias,
        "target_modules": state.live.objects.get(
            "peft_target_modules", sorted({t.rsplit(".", 1)[-1] for t in state.targets})
        ),
        "rank_pattern": {**config.rank_pattern, **params.get("rank_pattern", {})},
        "alpha_pattern": {**config.alpha_pattern, **params.get("alpha_pattern", {})},
        "target_parameters": params.get("target_parameters"),
        "trainable_token_indices": config.trainable_token_indices,
        "modules_to_save": config.modules_to_save,
        "fan_in_fan_out": state.info.get("fan_in_fan_out", False),
        "init_lora_weights": to_peft_init(config)[0],
        "use_dora": config.use_dora,
        "inference_mode": True,
        "base_model_name_or_path": state.base_model_name,
    })


#: HF PEFT LoraConfig fields that from_peft_config maps onto ours
PEFT_MAPPED = frozenset({
    "r", "lora_alpha", "lora_dropout", "use_rslora", "bias", "target_modules", "rank_pattern", "alpha_pattern",
    "modules_to_save", "use_dora", "init_lora_weights", "loftq_config", "target_parameters", "trainable_token_indices",
})  # fmt: skip
#: fields that do not change what the adapter computes: bookkeeping, runtime settings, the layout of Conv1D
#: weights (found from the module itself), and options that only matter together with a refused one
PEFT_IGNORED = frozenset({
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "runtime_config", "fan_in_fan_out", "layers_pattern", "megatron_core", "qalora_group_size",
})  # fmt: skip


#: HF PEFT re-reads these target names as transformers-v5 fused expert parameters on the model types its MoE
#: conversion covers (``peft.utils.transformers_weight_conversion``); read from peft when it is installed.
def _peft_moe_renames(model: nn.Module) -> dict[str, str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from peft.utils import transformers_weight_conversion as conv
    except ImportError:  # no peft here: whoever loads the export has one; nothing to check against
        return {}
    family = getattr(conv, "_MODEL_TO_CONVERSION_PATTERN", {}).get(model_type)
    return dict(getattr(conv, "_MOE_TARGET_MODULE_MAPPING", {}).get(family, {}))


def prepare_peft_export(model: nn.Module, tensors: dict, state) -> dict:
    """Before :func:`to_peft_config`: the ``target_modules`` that select exactly the adapted modules in ``model``
    (:func:`~peftlab.core.targeting.exact_targets`), and a refusal where HF PEFT would load other modules.

    Raises:
        ConfigError: a LoRA on a module HF PEFT's MoE conversion renames (a dense or shared-expert MLP's
            ``gate_proj``/``up_proj``/``down_proj`` on DeepSeek-V3 or Qwen3-Next): peft would adapt the
            fused expert parameters instead and silently drop these tensors.
    """
    renames = _peft_moe_renames(model)
    param_modules = {p.rpartition(".")[0] for p in state.info.get("target_parameters", [])}
    tokens = set(state.info.get("trainable_tokens", []))  # HF PEFT finds them from trainable_token_indices
    linear = [t for t in state.targets if t not in param_modules and t not in tokens]
    lost = [t for t in linear if t.rsplit(".", 1)[-1] in renames]
    if lost:
        model_type = model.config.model_type
        raise ConfigError(
            f"HF PEFT can't load LoRA on {lost[:3]}{' ...' if len(lost) > 3 else ''}: for model_type {model_type!r} "
            f"its transformers-v5 MoE conversion reads every target named "
            f"{'/'.join(sorted(renames))} as the fused expert parameters "
            f"({'/'.join(sorted(set(renames.values())))}), whatever path or regex names it, so these modules' LoRA "
            f"would be dropped; save with peftlab.save_adapter, or leave those modules out of an HF PEFT export"
        )
    mha = {}
    for path in linear:
        base = base_layer_of(submodule(model, path))
        if is_conv(base):
            check_peft_export(path, base)
        if isinstance(base, nn.MultiheadAttention):
            mha[path] = submodule(model, path)
    warn_peft_export(mha, state.name)
    state.live.objects["peft_target_modules"] = exact_targets(model, linear)
    state.live.objects["peft_parameters"] = peft_parameter_fields(model, state.name, state.config)
    keys = peft_key_map(model, state.name)
    for path in linear:  # HF PEFT names an embedding's factors lora_embedding_A / _B (no ".weight")
        if isinstance(base_layer_of(submodule(model, path)), nn.Embedding):
            keys.update({f"{path}.lora_{x}": f"{path}.lora_embedding_{x}" for x in "AB"})
    return {keys.get(k, k): v for k, v in tensors.items()}


def prepare_peft_import(model: nn.Module, tensors: dict, state) -> dict:
    """HF PEFT's nested ``ParamWrapper`` keys (``experts.base_layer.lora_A``) back to ours; the whole embedding
    tables HF PEFT saves beside an embedding's LoRA (``save_embedding_layers``) dropped when they are the base
    model's own.

    Raises:
        AdapterFileError: a saved embedding table differs from the base model's (a resized vocabulary): load the
            base model that adapter was trained on.
    """
    keys = {peft: ours for ours, peft in peft_key_map(model, state.name).items()}
    out = {}
    for key, value in tensors.items():
        path = key[: -len(".base_layer.weight")] if key.endswith(".base_layer.weight") else None
        base = base_layer_of(submodule(model, path)) if path and path in state.targets else None
        if isinstance(base, nn.Embedding):
            if value.shape != base.weight.shape or not torch.allclose(value.to(base.weight), base.weight):
                raise AdapterFileError(
                    f"the HF PEFT adapter saves the embedding table {path} ({list(value.shape)}) and it differs from this "
                    f"base model's ({list(base.weight.shape)}): it was trained on a changed vocabulary; load that base "
                    f"model (with its resized embeddings) before importing"
                )
            continue
        out[keys.get(key, key)] = value
    return out


def from_peft_config(data: dict[str, Any]) -> LoraConfig:
    # every other field (exclude_modules, lora_bias, layer_replication, aLoRA's
    # alora_invocation_tokens, use_qalora, layers_to_transform, megatron_config, ... and any
    # field a newer peft adds) is refused by name when set: peftlab does not implement it, and loading the
    # weights without it would compute something else
    unsupported = {
        k: v for k, v in data.items()
        if k not in PEFT_MAPPED and k not in PEFT_IGNORED and v not in (None, False, [], {}, "")
    }  # fmt: skip
    if unsupported:
        listed = ", ".join(f"{k}={v!r}" for k, v in sorted(unsupported.items()))
        raise ConfigError(
            f"HF PEFT LoRA option(s) not supported by peftlab: {listed}. peftlab implements only "
            f"{', '.join(sorted(PEFT_MAPPED))}; an adapter that needs the others cannot be loaded as plain LoRA"
        )
    targets = data.get("target_modules")
    if isinstance(targets, (list, set, tuple)):
        targets = sorted(targets)
    parameters = data.get("target_parameters")
    parameters = sorted(parameters) if parameters else None
    if parameters and not targets:
        targets = None  # HF PEFT's target_modules=[] with target_parameters: the parameters alone
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
        target_parameters=parameters,
        trainable_token_indices=data.get("trainable_token_indices"),
    )


def to_peft_init(config) -> tuple[Any, dict[str, Any]]:
    """(init_lora_weights, extra config keys) for an exported adapter (already trained: no init runs in peft).

    PiSSA/OLoRA export as the converted plain LoRA (rank 2r, see the module docstring), so ``True``;
    LoftQ exports ``True`` too: the adapter applies to the LoftQ-quantized base, as HF PEFT's own recipe
    saves it.
    """
    kind, _ = parse_init(config.init)
    return ("gaussian" if kind == "gaussian" else True), {}


def from_peft_init(data: dict[str, Any]) -> str:
    """Our ``init`` for a HF PEFT ``init_lora_weights`` (+ ``loftq_config``)."""
    value = data.get("init_lora_weights", True)
    if value is True or value is False or value is None:
        return "default"
    if isinstance(value, str):
        if value == "loftq":
            cfg = data.get("loftq_config") or {}
            bits = cfg.get("loftq_bits", 4)
            if bits != 4:
                raise ConfigError(f"HF PEFT LoftQ with loftq_bits={bits} is not supported by peftlab (4 only)")
            iters = cfg.get("loftq_iter", 1)
            return "loftq" if iters == 1 else f"loftq_iter_{iters}"
        try:
            parse_init(value)
            return value
        except ConfigError:
            pass
    raise ConfigError(
        f"HF PEFT init_lora_weights={value!r} is not supported by peftlab; supported: True, False, "
        f"{', '.join(VALID_INITS[1:])}"
    )
