"""How each benchmark method turns a freshly loaded model into the model to train.

peftlab methods go through ``peftlab.wrap``; ``hf-*`` methods run the same configuration through
Hugging Face PEFT, so the peer is measured side by side in the same sweep.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..util.errors import ConfigError

HEAD_NAMES = ("classifier", "score")


def head_names(model: nn.Module) -> list[str]:
    return [h for h in HEAD_NAMES if isinstance(getattr(model, h, None), nn.Module)]


def _peftlab(method: str, fixed: dict[str, Any] | None = None) -> Callable:
    def build(model, params: dict, ctx: dict):
        import peftlab

        from ..core.config import config_class

        kwargs = {**(fixed or {}), **params}
        if method == "adalora":
            kwargs.setdefault("total_steps", ctx["total_steps"])
        cls = config_class(method)
        if ctx["task_kind"] in ("seq-cls", "token-cls") and "modules_to_save" in cls.__dataclass_fields__:
            kwargs.setdefault("modules_to_save", head_names(model))
        return peftlab.wrap(model, cls(**kwargs))

    return build


def _quantized_lora(bits: int) -> Callable:
    def build(model, params: dict, ctx: dict):
        from ..backends.quant import model as quant

        quant_kwargs = {"bits": bits}
        if bits == 4:
            quant_kwargs.update(
                quant_type=params.pop("quant_type", "nf4"), double_quant=params.pop("double_quant", True)
            )
        skip = head_names(model)
        model = quant.quantize(model, skip_modules=skip, **quant_kwargs)
        return _peftlab("lora")(model, params, ctx)

    return build


def _full(model, params: dict, ctx: dict):
    if params:
        raise ConfigError(f"method 'full' takes no parameters, got {sorted(params)}")
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _hf(peft_name: str) -> Callable:
    def build(model, params: dict, ctx: dict):
        import peft

        task_type = {"seq-cls": "SEQ_CLS", "token-cls": "TOKEN_CLS", "causal-lm": "CAUSAL_LM"}[
            ctx["task_kind"]
        ]
        params = dict(params)
        if peft_name == "lora":
            cfg = peft.LoraConfig(
                task_type=task_type,
                r=params.pop("r", 8),
                lora_alpha=params.pop("alpha", 16),
                lora_dropout=params.pop("dropout", 0.0),
                target_modules=params.pop("target_modules", None),
                use_rslora=params.pop("use_rslora", False),
            )
        elif peft_name == "adalora":
            cfg = peft.AdaLoraConfig(
                task_type=task_type,
                init_r=params.pop("init_r", 12),
                target_r=params.pop("target_r", 8),
                lora_alpha=params.pop("alpha", 32),
                tinit=params.pop("t_init", 0),
                tfinal=params.pop("t_final", 0),
                deltaT=params.pop("delta_t", 1),
                total_step=ctx["total_steps"],
                target_modules=params.pop("target_modules", None),
            )
        else:
            proj = params.pop("projection_dim", None)
            cfg = peft.PrefixTuningConfig(
                task_type=task_type,
                num_virtual_tokens=params.pop("num_virtual_tokens", 20),
                prefix_projection=proj is not None,
                encoder_hidden_size=proj or 512,
            )
        if params:
            raise ConfigError(f"hf-{peft_name}: parameters not mapped to HF PEFT: {sorted(params)}")
        return peft.get_peft_model(model, cfg)

    return build


PROVIDERS: dict[str, Callable] = {
    "full": _full,
    "lora": _peftlab("lora"),
    "dora": _peftlab("lora", {"use_dora": True}),
    "adalora": _peftlab("adalora"),
    "houlsby": _peftlab("adapter", {"style": "houlsby"}),
    "pfeiffer": _peftlab("adapter", {"style": "pfeiffer"}),
    "parallel": _peftlab("adapter", {"style": "parallel"}),
    "prefix": _peftlab("prefix"),
    "qlora": _quantized_lora(4),
    "lora-int8": _quantized_lora(8),
    "hf-lora": _hf("lora"),
    "hf-adalora": _hf("adalora"),
    "hf-prefix": _hf("prefix"),
}


def get_provider(name: str) -> Callable:
    if name not in PROVIDERS:
        raise ConfigError(f"unknown method {name!r}; valid methods: {', '.join(PROVIDERS)}")
    return PROVIDERS[name]
