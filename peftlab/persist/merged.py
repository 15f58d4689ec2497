"""A plain ``save_pretrained`` checkpoint with the running adapters merged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..api import is_merged, merge, unmerge
from ..backends.quant.bnb import is_bnb_linear
from ..core.activation import active_adapters
from ..core.registry import get_method
from ..core.state import adapter_layers, adapters, get_state, wrapped_layers
from ..util.dist import is_sharded
from ..util.errors import AdapterFileError, MergeError
from .sharded import save_merged_sharded


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain (unwrapped) state dict of ``model`` with the running adapters already merged.

    Wrapper internals are dropped, ``base_layer`` is spliced out of every key, and a head with a
    running trained copy (``modules_to_save``) is saved as that copy.
    """
    plain: dict[str, torch.Tensor] = {}
    layers = dict(adapter_layers(model))
    for key, value in model.state_dict().items():
        owner = next((w for w in layers if w and key.startswith(w + ".")), None)
        if owner is None:
            plain[key] = value
            continue
        layer = layers[owner]
        rest = key[len(owner) + 1 :]
        copy = next((s for s, _ in layer.running() if s.replaces_base), None)
        if copy is not None:
            prefix = f"modules_to_save.{copy.name}."
            if rest.startswith(prefix):
                plain[f"{owner}.{rest[len(prefix):]}"] = value
            continue
        if rest.startswith("base_layer."):
            plain[f"{owner}.{rest[len('base_layer.'):]}"] = value
    return {k.replace(".base_layer.", "."): v for k, v in plain.items()}


def save_merged(model: nn.Module, path: str | Path, **save_kwargs: Any) -> Path:
    """Save the model with the active adapters merged, as a plain ``save_pretrained`` checkpoint.

    The wrapped model is left as it was (adapters merged only for the duration of the save).
    Refused, with the reason: a folder that holds an adapter (ours or HF PEFT's), a quantized (bitsandbytes) base (merging then unmerging would
    requantize it twice), and adapters that cannot live in the base weights (prefix tuning,
    bottleneck adapters), which a plain checkpoint would silently drop.
    """
    target = Path(path)
    for name in ("adapter_config.json", "adapters.json"):
        if (target / name).exists() or (target / name).is_symlink():
            raise AdapterFileError(
                f"{target} holds an adapter ({name}); a merged checkpoint there would overwrite files beside it and "
                f"from_pretrained would read the folder as an adapter. Save the merged model into another folder"
            )
    if is_sharded(model):  # every rank gathers; rank 0 rebuilds unsharded, merges and writes
        return save_merged_sharded(model, path, save_merged, **save_kwargs)

    if any(is_bnb_linear(m) for m in model.modules()):
        raise MergeError(
            "save_merged cannot save a quantized (bitsandbytes) base: merging then unmerging would requantize "
            "it twice. Call peftlab.unwrap(model, merge=True, dequantize=True), then model.save_pretrained(path)"
        )
    names = active_adapters(model) or list(adapters(model))
    for name in names:
        state = get_state(model, name)
        unmergeable = [
            s for s in (layer.slots[name] for _, layer in wrapped_layers(model, name))
            if not s.mergeable and not s.replaces_base
        ]
        if not get_method(state.config.method).folds_into_base or unmergeable:
            raise MergeError(
                f"{state.config.method} adapter {name!r} cannot be folded into the base weights, so a merged "
                f"checkpoint would silently lose it; save it with peftlab.save_adapter and load it on the base instead"
            )
    merged_here = []
    for name in names:
        if not is_merged(model, name):
            merge(model, name)
            merged_here.append(name)
    try:
        model.save_pretrained(str(path), state_dict=merged_state_dict(model), **save_kwargs)
    finally:
        for name in reversed(merged_here):
            unmerge(model, name)
    return Path(path)
