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
import json
import os
import re
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
from .distributed import gather_state_dict, is_main_process, is_sharded, save_merged_sharded
from .errors import AdapterFileError, MergeError
from .inject import adapter_layers, adapters, get_state, wrapped_layers
from .layers import SLOT_ROLES, weight_shape

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"


# ---- atomic writes -----------------------------------------------------------------------------


def _umask_mode() -> int:
    """The mode a plain ``open(..., 'w')`` would give (0o666 & ~umask), as ``save_pretrained`` files get."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _umask_mode())
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

    def write(tmp: str) -> None:
        save_file(clean, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())

    _atomic(Path(path), write)


@contextlib.contextmanager
def folder_lock(path: Path):
    """An exclusive advisory lock beside ``path`` (``.<name>.lock``): concurrent writers into one folder serialise."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as f:
        try:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - Windows: no advisory lock
            pass
        yield


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


def nameless(key: str, adapter_name: str) -> str:
    """A tensor key without its adapter name, as HF PEFT's files and ours store it.

    ``q.lora_A.<name>`` -> ``q.lora_A``; ``classifier.modules_to_save.<name>.weight`` ->
    ``classifier.weight``; ``peftlab_prefix.<name>.embedding.weight`` -> ``peftlab_prefix.embedding.weight``.
    """
    from .modules_to_save import ROLE

    key = key.replace(f".{ROLE}.{adapter_name}.", ".")
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
    from .api import active_adapters

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
    from .api import active_adapters, delete_adapter, set_active_adapters

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
            from .api import set_active_adapters

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
    Refused, with the reason: a quantized (bitsandbytes) base (merging then unmerging would
    requantize it twice), and adapters that cannot live in the base weights (prefix tuning,
    bottleneck adapters), which a plain checkpoint would silently drop.
    """
    from .api import active_adapters
    from .quant_layers import is_bnb_linear

    if is_sharded(model):  # every rank gathers; rank 0 rebuilds unsharded, merges and writes
        return save_merged_sharded(model, path, save_merged, **save_kwargs)
    from .registry import get_method

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
