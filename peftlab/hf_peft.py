"""Interop with Hugging Face PEFT's on-disk format, both ways.

``export_peft`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` that
``peft.PeftModel.from_pretrained(base, path)`` loads; ``import_peft`` reads a folder saved by
``peft`` (``save_pretrained``) into a peftlab-wrapped model. The key and config mapping is
method-specific and lives in each method file (:class:`peftlab.registry.Method`).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .errors import AdapterFileError, ConfigError
from .inject import get_state
from .io import (
    adapter_state_dict,
    atomic_save_safetensors,
    atomic_write_json,
    read_json,
    read_safetensors,
    wrap_and_load,
)
from .registry import get_method, method_for_peft_type

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"

_TASK_TYPES = {
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForCausalLM": "CAUSAL_LM",
    "ForConditionalGeneration": "SEQ_2_SEQ_LM",
    "ForQuestionAnswering": "QUESTION_ANS",
}


def task_type(model: nn.Module) -> str | None:
    """HF PEFT ``task_type`` for a transformers model class (None for bare backbones)."""
    name = type(model).__name__
    for suffix, task in _TASK_TYPES.items():
        if name.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION" if hasattr(model, "config") else None


def export_peft(model: nn.Module, path: str | Path, adapter_name: str | None = None) -> Path:
    """Write one adapter in HF PEFT's layout into ``path``."""
    state = get_state(model, adapter_name)
    method = get_method(state.config.method)
    if method.to_peft_config is None or method.to_peft_key is None:
        raise ConfigError(f"method {state.config.method!r} has no HF PEFT export")
    tensors = adapter_state_dict(model, adapter_name)
    if method.prepare_export is not None:
        tensors = method.prepare_export(model, tensors, state)
    state.info.setdefault("task_type", task_type(model))
    config = method.to_peft_config(state.config, state)
    if config.get("task_type") is None:
        config["task_type"] = task_type(model)
    if config["task_type"] in ("SEQ_CLS", "TOKEN_CLS"):
        # peft always treats the classification head of these tasks as modules_to_save and expects it in
        # the file; write the head we have (trained or not) so peft reproduces our outputs exactly.
        saved = list(config.get("modules_to_save") or [])
        for head in ("classifier", "score"):
            module = getattr(model, head, None)
            if isinstance(module, nn.Module) and head not in state.modules_to_save:
                tensors.update({f"{head}.{k}": v.detach() for k, v in module.state_dict().items()})
                saved.append(head)
        config["modules_to_save"] = saved or None
    path = Path(path)
    atomic_save_safetensors(
        path / PEFT_WEIGHTS_NAME, {method.to_peft_key(k): v for k, v in tensors.items()}, {"format": "pt"}
    )
    atomic_write_json(path / PEFT_CONFIG_NAME, config)
    return path


def import_peft(
    model: nn.Module, path: str | Path, adapter_name: str = "default", trainable: bool = False
) -> nn.Module:
    """Wrap ``model`` with an adapter saved by HF PEFT in ``path`` and load its weights."""
    path = Path(path)
    raw = read_json(path / PEFT_CONFIG_NAME)
    if "peft_type" not in raw:
        raise AdapterFileError(f"{path / PEFT_CONFIG_NAME} has no 'peft_type'; is it a HF PEFT adapter?")
    method = method_for_peft_type(raw["peft_type"])
    tensors = read_safetensors(path / PEFT_WEIGHTS_NAME)
    config = method.from_peft_config(raw).replace(adapter_name=adapter_name)
    if raw.get("task_type") in ("SEQ_CLS", "TOKEN_CLS") and not config.modules_to_save:
        # HF PEFT trains (and saves) the classification head of SEQ_CLS / TOKEN_CLS models.
        heads = [h for h in ("classifier", "score") if isinstance(getattr(model, h, None), nn.Module)]
        head_keys = [k for k in tensors if any(f"model.{h}." in k for h in heads)]
        if head_keys:
            config = config.replace(modules_to_save=heads)
    ours = {method.from_peft_key(k): v for k, v in tensors.items()}

    def transform(tensors):
        if method.prepare_import is None:
            return tensors
        return method.prepare_import(model, tensors, get_state(model, adapter_name))

    wrap_and_load(model, config, ours, transform)
    state = get_state(model, adapter_name)
    if not trainable:
        params = dict(model.named_parameters())
        for key in state.saved_keys:
            if key in params:
                params[key].requires_grad_(False)
    return model
