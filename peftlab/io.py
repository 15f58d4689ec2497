"""Saving and loading adapters in peftlab's format, and exporting merged models.

On disk an adapter is a folder with

* ``adapter_config.json``: ``{"method", "peftlab_version", "config": {...}, "targets": [...],
  "shapes": {path: [out, in]}, "modules_to_save": [...], "base_model_name"}``
* ``adapter.safetensors``: the adapter tensors, keyed by their path in the model.

Every file is written atomically (temporary file in the same folder, then ``os.replace``); the
config is written last, so a folder with a config always has a complete tensor file. Only
safetensors is ever read or written (no pickle).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ._version import __version__
from .api import is_merged, merge, unmerge, wrap
from .config import PeftConfig
from .errors import AdapterFileError, MergeError
from .inject import get_state, wrapped_layers
from .layers import weight_shape

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"


# ---- atomic writes -----------------------------------------------------------------------------


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, data: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=_json_default)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    _atomic(Path(path), write)


def atomic_save_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None
) -> None:
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    _atomic(Path(path), lambda tmp: save_file(clean, tmp, metadata=metadata))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (set, tuple)):
        return sorted(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing, corrupt or truncated file is an :class:`AdapterFileError`."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"adapter weights file {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(
            f"adapter weights file {path} is corrupt or truncated ({exc}); re-save or re-download it"
        ) from None


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(
            f"adapter config {path} does not exist (expected {CONFIG_NAME} in {path.parent})"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterFileError(f"adapter config {path} is not valid JSON: {exc}") from None


# ---- state dicts -------------------------------------------------------------------------------


def adapter_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors that make up one adapter, keyed by their path in ``model``."""
    state = get_state(model, adapter_name)
    full = model.state_dict(keep_vars=True)
    missing = [k for k in state.saved_keys if k not in full]
    if missing:
        raise AdapterFileError(f"adapter tensors missing from the model (was it modified?): {missing[:5]}")
    return {k: full[k].detach() for k in state.saved_keys}


def load_adapter_tensors(
    model: nn.Module, tensors: dict[str, torch.Tensor], adapter_name: str | None = None
) -> None:
    """Copy ``tensors`` into the model's adapter; keys and shapes must match exactly."""
    state = get_state(model, adapter_name)
    expected = set(state.saved_keys)
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise AdapterFileError(
            f"adapter tensors do not match the wrapped model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    full = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, value in tensors.items():
            target = full[key]
            if tuple(target.shape) != tuple(value.shape):
                raise AdapterFileError(
                    f"tensor {key}: adapter has shape {list(value.shape)} but the model expects {list(target.shape)}"
                )
            target.copy_(value.to(device=target.device, dtype=target.dtype))


def check_shapes(model: nn.Module, shapes: dict[str, list[int]]) -> None:
    """Every targeted module exists and has the saved (out, in) shape."""
    modules = dict(model.named_modules())
    for path, shape in shapes.items():
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


# ---- peftlab format ----------------------------------------------------------------------------


def save_adapter(model: nn.Module, path: str | Path, adapter_name: str | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter.safetensors`` for one adapter into ``path``."""
    state = get_state(model, adapter_name)
    path = Path(path)
    atomic_save_safetensors(path / WEIGHTS_NAME, adapter_state_dict(model, adapter_name), {"format": "pt"})
    atomic_write_json(
        path / CONFIG_NAME,
        {
            "method": state.config.method,
            "peftlab_version": __version__,
            "config": state.config.to_dict(),
            "targets": state.targets,
            "shapes": state.shapes,
            "modules_to_save": state.modules_to_save,
            "base_model_name": state.base_model_name,
        },
    )
    return path


def read_adapter_config(path: str | Path) -> tuple[PeftConfig, dict[str, Any]]:
    """(config, raw json) of a saved peftlab adapter; unknown methods or keys are clear errors."""
    raw = read_json(Path(path) / CONFIG_NAME)
    if "config" not in raw or not isinstance(raw["config"], dict):
        raise AdapterFileError(f"{Path(path) / CONFIG_NAME} has no 'config' object; is it a peftlab adapter?")
    cfg = dict(raw["config"])
    cfg.setdefault("method", raw.get("method"))
    return PeftConfig.from_dict(cfg), raw


def wrap_and_load(
    model: nn.Module, config: PeftConfig, tensors: dict[str, torch.Tensor], transform=None
) -> None:
    """Wrap ``model`` with ``config`` and load ``tensors``; on any failure the model is unwrapped again."""
    from .api import unwrap

    wrap(model, config)
    try:
        if transform is not None:
            tensors = transform(tensors)
        load_adapter_tensors(model, tensors, config.adapter_name)
    except BaseException:
        unwrap(model, adapter_name=config.adapter_name)
        raise


def load_adapter(
    model: nn.Module, path: str | Path, adapter_name: str | None = None, trainable: bool = False
) -> nn.Module:
    """Wrap ``model`` with the adapter saved in ``path`` and load its weights.

    Args:
        adapter_name: load under another name (default: the saved one).
        trainable: keep adapter parameters trainable (default: frozen, for inference).
    """
    config, raw = read_adapter_config(path)
    tensors = read_safetensors(Path(path) / WEIGHTS_NAME)
    check_shapes(model, raw.get("shapes") or {})
    if adapter_name:
        config = config.replace(adapter_name=adapter_name)
    wrap_and_load(model, config, tensors)
    state = get_state(model, config.adapter_name)
    if not trainable:
        params = dict(model.named_parameters())
        for key in state.saved_keys:
            if key in params:
                params[key].requires_grad_(False)
    return model


def save_merged(model: nn.Module, path: str | Path, **save_kwargs: Any) -> Path:
    """Save the model with every adapter merged, as a plain ``save_pretrained`` checkpoint.

    The wrapped model is left as it was (adapters merged only for the duration of the save).
    A quantized (bitsandbytes) base is refused: merging and unmerging would requantize it twice.
    """
    from .quant_layers import is_bnb_linear

    if any(is_bnb_linear(m) for m in model.modules()):
        raise MergeError(
            "save_merged cannot save a quantized (bitsandbytes) base: merging then unmerging would requantize "
            "it twice. Call peftlab.unwrap(model, merge=True, dequantize=True), then model.save_pretrained(path)"
        )
    states = list(getattr(model, "peftlab_adapters", {}))
    merged_here = []
    for name in states:
        if not is_merged(model, name):
            merge(model, name)
            merged_here.append(name)
    try:
        wrapped = [p for p, _ in wrapped_layers(model)]
        plain: dict[str, torch.Tensor] = {}
        for key, value in model.state_dict().items():
            if any(key.startswith(w + ".") and not key.startswith(w + ".base_layer.") for w in wrapped):
                continue  # adapter-only tensors (lora_A, ...), already folded into the base weight
            plain[key.replace(".base_layer.", ".")] = value
        model.save_pretrained(str(path), state_dict=plain, **save_kwargs)
    finally:
        for name in merged_here:
            unmerge(model, name)
    return Path(path)
