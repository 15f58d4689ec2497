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

import contextlib
import hashlib
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..api import delete_adapter, wrap
from ..core.activation import active_adapters, set_active_adapters
from ..core.config import PeftConfig
from ..core.state import adapters, get_state
from ..core.tensors import (
    adapter_state_dict,
    adapter_tensors,
    check_finite,
    check_shapes,
    load_adapter_tensors,
)
from ..util.dist import gather_state_dict, is_main_process
from ..util.errors import AdapterFileError
from ..util.files import atomic_save_safetensors, atomic_write_json, folder_lock, read_json, read_safetensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"


# ---- atomic writes -----------------------------------------------------------------------------


def _clean_stale(path: Path, keep: set[str]) -> None:
    """Remove leftovers of interrupted saves: temporaries (``.*.tmp``, ``.tmp*``) and weight files no config names."""
    for item in path.iterdir():
        if item.name in keep:
            continue
        # ours end in .tmp; safetensors' own writer (Rust `tempfile`) leaves `.tmpXXXXXX` when killed mid-write
        if (item.name.startswith(".") and (item.name.endswith(".tmp") or item.name.startswith(".tmp"))) or (
            item.name.startswith("adapter-") and item.name.endswith(".safetensors")
        ):
            with contextlib.suppress(OSError):
                item.unlink()


# ---- state dicts -------------------------------------------------------------------------------


# ---- peftlab format ----------------------------------------------------------------------------

FORMAT_VERSION = 2
INDEX_NAME = "adapters.json"


def save_adapter(model: nn.Module, path: str | Path, adapter_name: str | None = None) -> Path:
    """Save adapters in peftlab's format.

    One adapter (``adapter_name``, or the model's only one): ``path/adapter_config.json`` and its
    weights. Several (``adapter_name=None`` on a model with more than one): one such folder per
    adapter, ``path/<name>/``, and ``path/adapters.json`` listing them with the active set.

    Each folder is written as a unit: the weights go to a new uniquely named file, then the config
    that points to it replaces the old one in one atomic rename (the commit point), then the old
    weights are removed. A crash at any moment leaves the complete old or the complete new adapter;
    concurrent savers into one folder take turns (a file lock); leftovers are cleaned on the next save.
    """
    path = Path(path)
    names = [get_state(model, adapter_name).name] if adapter_name or len(adapters(model)) <= 1 else list(adapters(model))
    if len(names) == 1:
        _save_one(model, path, names[0])
        return path
    for name in names:
        _save_one(model, path / name, name)

    atomic_write_json(
        path / INDEX_NAME,
        {"peftlab_version": __version__, "adapters": names, "active": active_adapters(model)},
    )
    return path


def _save_one(model: nn.Module, path: Path, name: str) -> None:
    state = get_state(model, name)
    tensors = gather_state_dict(adapter_state_dict(model, name))  # full tensors of sharded (FSDP2) models
    if not is_main_process():  # every rank gathers; rank 0 writes
        return
    with folder_lock(path):
        clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        digest = hashlib.sha256()
        for key in sorted(clean):
            digest.update(key.encode())
            digest.update(clean[key].view(-1).view(torch.uint8).numpy().tobytes())
        weights_name = f"adapter-{digest.hexdigest()[:16]}.safetensors"
        atomic_save_safetensors(path / weights_name, clean, {"format": "pt"})
        atomic_write_json(
            path / CONFIG_NAME,
            {
                "method": state.config.method,
                "peftlab_version": __version__,
                "format_version": FORMAT_VERSION,
                "weights": weights_name,
                "adapter_name": name,
                "config": state.config.to_dict(),
                "targets": state.targets,
                "shapes": state.shapes,
                "modules_to_save": state.modules_to_save,
                "base_model_name": state.base_model_name,
                "info": state.info,
            },
        )
        _clean_stale(path, keep={CONFIG_NAME, weights_name})


def read_adapter_config(path: str | Path) -> tuple[PeftConfig, dict[str, Any]]:
    """(config, raw json) of a saved peftlab adapter; unknown methods or keys are clear errors."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file() and path.is_dir():
        found = sorted(p.name for p in path.iterdir())[:10]
        raise AdapterFileError(
            f"{path} holds no {CONFIG_NAME} (found: {', '.join(found) or 'nothing'}); expected a folder written by "
            f"peftlab.save_adapter (or, for a HF PEFT folder, use peftlab.import_peft)"
        )
    raw = read_json(path / CONFIG_NAME)
    if "config" not in raw or not isinstance(raw["config"], dict):
        if "peft_type" in raw:
            raise AdapterFileError(f"{path} is a HF PEFT adapter (it has peft_type); load it with peftlab.import_peft")
        raise AdapterFileError(f"{path / CONFIG_NAME} has no 'config' object; is it a peftlab adapter?")
    cfg = dict(raw["config"])
    cfg.setdefault("method", raw.get("method"))
    return PeftConfig.from_dict(cfg), raw


def _upgrade_v1(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Format 1 (one adapter per model) keyed prefix tables as ``peftlab_prefix_<name>.``."""
    return {re.sub(r"^peftlab_prefix_[^.]+\.", "peftlab_prefix.", k): v for k, v in tensors.items()}


def wrap_and_load(
    model: nn.Module,
    config: PeftConfig,
    tensors: dict[str, torch.Tensor],
    transform=None,
    trainable: bool = False,
) -> None:
    """Add the adapter ``config`` to ``model`` and load ``tensors``; on any failure the model is as before.

    The first adapter on a model becomes active; a further one is added inactive (switch with
    :func:`peftlab.set_active_adapters`), so loading never changes what the model computes.
    """
    previous = list(adapters(model))
    prev_active = active_adapters(model)
    prev_grads = {n: p.requires_grad for n, p in model.named_parameters()}
    wrap(model, config)
    try:
        if transform is not None:
            tensors = transform(tensors)
        load_adapter_tensors(model, tensors, config.adapter_name)
    except BaseException:
        delete_adapter(model, config.adapter_name, force=True)
        raise
    if previous:
        set_active_adapters(model, prev_active)
        params = dict(model.named_parameters())
        for n, flag in prev_grads.items():
            if n in params:
                params[n].requires_grad_(flag)
    for tensor in adapter_tensors(model, config.adapter_name).values():
        if isinstance(tensor, nn.Parameter) and tensor.is_floating_point():
            tensor.requires_grad_(trainable)


def _read_config_and_weights(path: Path, attempts: int = 5):
    """(config, raw config, weights path, tensors) of one saved adapter, consistent under concurrent saves.

    A save writes new versioned weights, commits the config that names them, then removes the old file;
    a reader that read the old config just before may find its file gone. Then the config has changed:
    read it again. A weights file that is missing while the config still names it is an error.
    """
    for attempt in range(attempts):
        config, raw = read_adapter_config(path)
        weights = path / raw.get("weights", WEIGHTS_NAME)
        try:
            return config, raw, weights, read_safetensors(weights)
        except AdapterFileError:
            if attempt == attempts - 1 or weights.is_file():
                raise
            _, again = read_adapter_config(path)
            if again.get("weights") == raw.get("weights"):
                raise
    raise AssertionError("unreachable")


def load_adapter(
    model: nn.Module,
    path: str | Path,
    adapter_name: str | None = None,
    trainable: bool = False,
    check_finite: bool = True,
) -> nn.Module:
    """Add the adapter(s) saved in ``path`` to ``model`` (plain or already wrapped) and load the weights.

    Args:
        adapter_name: load under this name (default: the saved one). For a folder of several
            adapters (``adapters.json``), load only this one.
        trainable: keep the loaded parameters trainable (default: frozen, for inference).
        check_finite: refuse tensors with NaN/inf (default), naming the tensor.

    The first adapter on a model becomes active; further ones are added inactive.
    """
    path = Path(path)
    if (path / INDEX_NAME).is_file() and not (path / CONFIG_NAME).is_file():
        index = read_json(path / INDEX_NAME)
        names = index.get("adapters", [])
        if adapter_name is not None:
            if adapter_name not in names:
                raise AdapterFileError(f"{path} has no adapter {adapter_name!r}; it has: {', '.join(names)}")
            names = [adapter_name]
        fresh = not adapters(model)
        for name in names:
            load_adapter(model, path / name, name, trainable=trainable, check_finite=check_finite)
        if fresh and adapter_name is None:
            set_active_adapters(model, [n for n in index.get("active", names) if n in names] or names[:1])
        return model
    config, raw, weights, tensors = _read_config_and_weights(path)
    if raw.get("format_version", 1) < 2:
        tensors = _upgrade_v1(tensors)
    if check_finite:
        _check_finite(tensors, str(weights))
    check_shapes(model, raw.get("shapes") or {})
    name = adapter_name or raw.get("adapter_name") or config.adapter_name
    if name in adapters(model):
        raise AdapterFileError(
            f"this model already has an adapter named {name!r} (adapters: {', '.join(adapters(model))}); pass "
            f"adapter_name='<new name>' to load it beside, or delete_adapter(model, {name!r}) first"
        )
    config = config.replace(adapter_name=name)
    wrap_and_load(model, config, tensors, trainable=trainable)
    return model


_check_finite = check_finite


