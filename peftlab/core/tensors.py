"""One adapter's tensors on a wrapped model: finding them, naming them without the adapter name, loading them.

An adapter's tensors are selected by slot, never by ``requires_grad``: its entries in every wrapper's role
dicts (``q_proj.lora_A.<name>``), the model-level modules it owns (prefix tables) and the base tensors it
trains (``extra_keys``, e.g. LoRA biases).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..util.errors import AdapterFileError
from .head_copies import ROLE as HEAD_COPY_ROLE
from .layer import SLOT_ROLES, weight_shape
from .state import get_state, wrapped_layers


def nameless(key: str, adapter_name: str) -> str:
    """A tensor key without its adapter name, as HF PEFT's files and ours store it.

    ``q.lora_A.<name>`` -> ``q.lora_A``; ``classifier.modules_to_save.<name>.weight`` ->
    ``classifier.weight``; ``peftlab_prefix.<name>.embedding.weight`` -> ``peftlab_prefix.embedding.weight``.
    """
    key = key.replace(f".{HEAD_COPY_ROLE}.{adapter_name}.", ".")
    roles = "|".join(re.escape(r) for r in sorted(SLOT_ROLES))
    return re.sub(rf"(^|\.)({roles})\.{re.escape(adapter_name)}(?=\.|$)", r"\1\2", key)


def _plain(key: str) -> str:
    return key.replace(".base_layer.", ".")


def adapter_tensors(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The live tensors (Parameters, buffers) of one adapter, keyed by their path in ``model``.

    Selected by slot, never by ``requires_grad``: the adapter's entries in every wrapper's role
    dicts, its owned modules (prefix tables), and the base tensors it trains (``extra_keys``).
    """
    state = get_state(model, adapter_name)
    name = state.name
    out: dict[str, torch.Tensor] = {}
    for path, layer in wrapped_layers(model, name):
        for role, store in layer.named_children():
            if role == "base_layer" or not isinstance(store, (nn.ParameterDict, nn.ModuleDict)) or name not in store:
                continue
            value = store[name]
            key = f"{path}.{role}.{name}" if path else f"{role}.{name}"
            if isinstance(value, torch.Tensor):
                out[key] = value
            else:
                out.update({f"{key}.{k}": v for k, v in value.state_dict(keep_vars=True).items()})
    for mpath in state.owned_modules:
        module = model.get_submodule(mpath)
        out.update({f"{mpath}.{k}": v for k, v in module.state_dict(keep_vars=True).items()})
    if state.extra_keys:
        current = dict(model.named_parameters())
        by_plain = {_plain(k): k for k in current}
        for key in state.extra_keys:
            real = key if key in current else by_plain.get(_plain(key))
            if real is None:
                raise AdapterFileError(f"adapter {name!r}: base tensor {key} is missing from the model (was it modified?)")
            out[real] = current[real]
    return out


def adapter_state_dict(model: nn.Module, adapter_name: str | None = None, named: bool = False) -> dict[str, torch.Tensor]:
    """One adapter's tensors (detached) keyed without the adapter name (``named=True``: model paths)."""
    name = get_state(model, adapter_name).name
    tensors = adapter_tensors(model, name)
    if named:
        return {k: v.detach() for k, v in tensors.items()}
    return {nameless(k, name): v.detach() for k, v in tensors.items()}


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Every floating tensor is finite; else an :class:`AdapterFileError` naming the tensor."""
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise AdapterFileError(
                f"{source}: tensor {key} has {bad} NaN/inf value(s) of {value.numel()}; the adapter is corrupt "
                f"(a diverged training run?). Pass check_finite=False to load it anyway"
            )


def load_adapter_tensors(
    model: nn.Module, tensors: dict[str, torch.Tensor], adapter_name: str | None = None
) -> None:
    """Copy ``tensors`` (keyed without the adapter name, or by model path) into one adapter; keys and shapes must match."""
    name = get_state(model, adapter_name).name
    live = adapter_tensors(model, name)
    by_nameless = {nameless(k, name): k for k in live}
    by_plain = {_plain(k): k for k in by_nameless}
    resolved: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in tensors.items():
        real = live.get(key) is not None and key or by_nameless.get(key) or by_nameless.get(by_plain.get(_plain(key), ""))
        if real is None:
            unexpected.append(key)
        else:
            resolved[real] = value
    missing = sorted(set(live) - set(resolved))
    if missing or unexpected:
        raise AdapterFileError(
            f"adapter tensors do not match the wrapped model: missing {[nameless(k, name) for k in missing][:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    with torch.no_grad():
        for key, value in resolved.items():
            target = live[key]
            if tuple(target.shape) != tuple(value.shape):
                raise AdapterFileError(
                    f"tensor {nameless(key, name)}: adapter has shape {list(value.shape)} but the model expects "
                    f"{list(target.shape)}"
                )
            target.copy_(value.to(device=target.device, dtype=target.dtype))


def check_shapes(model: nn.Module, shapes: dict[str, list[int]]) -> None:
    """Every targeted module exists and has the saved (out, in) shape; a targeted base parameter (``path`` of a
    parameter, e.g. ``...experts.gate_up_proj``) exists and has the saved full shape."""
    modules = dict(model.named_modules())
    for path, shape in shapes.items():
        owner, _, param = path.rpartition(".")
        if path not in modules and owner in modules:
            base = getattr(modules[owner], "base_layer", modules[owner])
            value = getattr(base, param, None)
            if isinstance(value, torch.Tensor):
                if list(value.shape) != list(shape):
                    raise AdapterFileError(
                        f"parameter {path!r}: the adapter was trained for shape {list(shape)} but this base model's is "
                        f"{list(value.shape)}"
                    )
                continue
        if path not in modules:
            raise AdapterFileError(
                f"the adapter targets module {path!r}, which this base model does not have "
                f"(is it the same architecture as the one the adapter was trained on?)"
            )
        actual = weight_shape(modules[path])
        if list(actual) != list(shape):
            raise AdapterFileError(
                f"module {path!r}: the adapter was trained for weight shape {list(shape)} but this base "
                f"model's is {list(actual)}"
            )
