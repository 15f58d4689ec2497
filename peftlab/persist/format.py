"""Saving and loading adapters in peftlab's format.

One adapter is a folder with

* ``adapter_config.json``: ``{"method", "peftlab_version", "format_version", "generation", "weights",
  "adapter_name", "config": {...}, "targets", "shapes", "modules_to_save", "base_model_name", "info"}``;
* the weights file it names (``adapter-<content hash>.safetensors``), keyed by path in the model;
* ``.peftlab.lock``: the savers' lock and journal (:class:`peftlab.util.files.FolderWriter`).

Several adapters (one save of a model with more than one) are a folder with one sub-folder per adapter
(``<name>/``, each a one-adapter folder) and ``adapters.json``, the manifest: it names every adapter, its
sub-folder, its weights file and its full config record, and the active set. The manifest is the one
commit point of a multi-adapter save; the sub-folders' own configs are rewritten after it (they serve
loading one sub-folder on its own).

Guarantees:

* every name read from a file is a plain name inside its folder (:func:`peftlab.util.files.plain_name_in`);
* a save writes new files beside the old ones, commits with one atomic rename (the config, or the
  manifest), then removes the files the previous save of that folder named, and no other file;
  a crash at any moment leaves the complete old or the complete new state;
* a newer save wins over an older layout in the same folder (both record a ``generation``);
* a load reads and checks everything first and attaches adapters only when all of it loaded;
  a failure leaves the model as it was;
* NaN/inf tensors are refused on save and on load; an unknown ``format_version`` is refused.

Only safetensors and JSON are ever read or written (no pickle).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..api import delete_adapter, wrap
from ..core.activation import active_adapters, set_active_adapters
from ..core.config import PeftConfig
from ..core.state import adapter_layers, adapters, get_state
from ..core.tensors import (
    adapter_state_dict,
    adapter_tensors,
    check_finite,
    check_shapes,
    load_adapter_tensors,
)
from ..util.dist import gather_state_dict, is_main_process
from ..util.errors import AdapterFileError
from ..util.files import FolderWriter, plain_name_in, read_json, read_safetensors, remove_empty_dir

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"  # format 1's fixed name
INDEX_NAME = "adapters.json"
FORMAT_VERSION = 2
FORMAT_VERSIONS = (1, 2)
#: the weights files a save of ours creates (the only names a save ever removes)
WEIGHTS_PATTERN = r"adapter(-[0-9a-f]{16}(-[0-9]+)?)?\.safetensors"
_WEIGHTS = re.compile(WEIGHTS_PATTERN)


# ---- what a folder holds ------------------------------------------------------------------------


def is_peftlab_config(raw: Any) -> bool:
    return isinstance(raw, dict) and isinstance(raw.get("config"), dict) and "peft_type" not in raw


def is_hf_peft_config(raw: Any) -> bool:
    return isinstance(raw, dict) and "peft_type" in raw and not isinstance(raw.get("config"), dict)


def _read_quiet(path: Path) -> dict | None:
    try:
        return read_json(path) if path.is_file() else None
    except AdapterFileError:
        return None


@dataclass
class Committed:
    """The committed state of one folder as our saves see it: the peftlab config and manifest found,
    the files they name (``owned``) and the newest ``generation``."""

    config: dict | None = None
    index: dict | None = None
    owned: set[str] = field(default_factory=set)
    generation: int = 0


def _generation(raw: dict | None) -> int:
    value = (raw or {}).get("generation", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def committed_state(folder: Path) -> Committed:
    """What a save into ``folder`` replaces; refuses a folder whose ``adapter_config.json`` is HF PEFT's
    (or anything else that is not ours), saying how to keep both."""
    found = Committed()
    config_path = folder / CONFIG_NAME
    if config_path.exists() or config_path.is_symlink():
        raw = _read_quiet(config_path) if not config_path.is_symlink() else None
        if is_hf_peft_config(raw):
            raise AdapterFileError(
                f"{folder} holds a HF PEFT adapter (its {CONFIG_NAME} has peft_type); saving peftlab's format there "
                f"would overwrite it. Save into another folder or a sub-folder, e.g. {folder / 'peftlab'}"
            )
        if not is_peftlab_config(raw):
            raise AdapterFileError(
                f"{config_path} is not a peftlab adapter config; refusing to overwrite it. Save into another "
                f"folder, or remove that file first"
            )
        found.config = raw
        found.owned.add(CONFIG_NAME)
        weights = raw.get("weights", WEIGHTS_NAME)
        if isinstance(weights, str) and _WEIGHTS.fullmatch(weights):
            found.owned.add(weights)
    index = _read_quiet(folder / INDEX_NAME)
    if isinstance(index, dict) and isinstance(index.get("adapters"), list):
        found.index = index
        found.owned.add(INDEX_NAME)
    found.generation = max(_generation(found.config), _generation(found.index))
    return found


def _index_entries(index: dict) -> dict[str, dict]:
    """name -> {"folder", "weights"?, "record"?} of a manifest (older manifests: just the names)."""
    records = index.get("records") if isinstance(index.get("records"), dict) else {}
    out = {}
    for name in index.get("adapters", []):
        rec = records.get(name) if isinstance(records.get(name), dict) else None
        out[name] = {"folder": (rec or {}).get("folder", name), "record": rec}
    return out


def layout(path: Path) -> str:
    """``"single"`` (``adapter_config.json``) or ``"multi"`` (``adapters.json``), the newer if both."""
    has_config = (path / CONFIG_NAME).is_file()
    index = _read_quiet(path / INDEX_NAME) if (path / INDEX_NAME).is_file() else None
    if index is None:
        return "single"
    if not has_config:
        return "multi"
    return "multi" if _generation(index) > _generation(_read_quiet(path / CONFIG_NAME)) else "single"


# ---- saving --------------------------------------------------------------------------------------


def _refuse_non_finite(tensors: dict[str, torch.Tensor], name: str) -> None:
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise AdapterFileError(
                f"refusing to save adapter {name!r}: tensor {key} has {bad} NaN/inf value(s) of {value.numel()} "
                f"(a diverged training run?). Reset or retrain it, or pass check_finite=False to save it anyway"
            )


def _record(model: nn.Module, name: str, generation: int) -> dict[str, Any]:
    state = get_state(model, name)
    return {
        "method": state.config.method,
        "peftlab_version": __version__,
        "format_version": FORMAT_VERSION,
        "generation": generation,
        "adapter_name": name,
        "config": state.config.to_dict(),
        "targets": state.targets,
        "shapes": state.shapes,
        "modules_to_save": state.modules_to_save,
        "base_model_name": state.base_model_name,
        "info": state.info,
    }


def _weights_name(tensors: dict[str, torch.Tensor], folder: Path, owned: set[str]) -> str:
    """``adapter-<hash of the content>.safetensors``; never the name of a file that is not ours."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].reshape(-1).view(torch.uint8).numpy().tobytes())
    base = f"adapter-{digest.hexdigest()[:16]}"
    name, n = f"{base}.safetensors", 0
    while (folder / name).exists() and name not in owned:
        n += 1
        name = f"{base}-{n}.safetensors"
    return name


def save_adapter(
    model: nn.Module, path: str | Path, adapter_name: str | None = None, check_finite: bool = True
) -> Path:
    """Save adapters in peftlab's format (see the module doc).

    One adapter (``adapter_name``, or the model's only one): ``path/adapter_config.json`` and its weights.
    Several (``adapter_name=None`` on a model with more than one): ``path/<name>/`` per adapter and the
    manifest ``path/adapters.json``, committed last.

    Files in ``path`` that this save's predecessor did not write (your notes, other checkpoints) are never
    touched. A folder holding a HF PEFT adapter is refused (save into a sub-folder instead).

    Raises:
        AdapterFileError: a tensor has NaN/inf (``check_finite=False`` saves it anyway); ``path`` holds an
            adapter in another format.
    """
    path = Path(path)
    names = [get_state(model, adapter_name).name] if adapter_name or len(adapters(model)) <= 1 else list(adapters(model))
    tensors = {}
    for name in names:  # every rank gathers (FSDP2); all checked before anything is written
        tensors[name] = {k: v.detach().to("cpu").contiguous() for k, v in gather_state_dict(adapter_state_dict(model, name)).items()}
        if check_finite:
            _refuse_non_finite(tensors[name], name)
    if not is_main_process():  # rank 0 writes
        return path
    if len(names) == 1:
        _save_single(model, path, names[0], tensors[names[0]])
    else:
        _save_multi(model, path, names, tensors)
    return path


def _save_single(model: nn.Module, path: Path, name: str, tensors: dict) -> None:
    with FolderWriter(path, (WEIGHTS_PATTERN,)) as w:
        old = committed_state(path)
        w.recover(old.owned)
        weights = _weights_name(tensors, path, w.owned)
        w.write_safetensors(weights, tensors, {"format": "pt"})
        w.write_json(CONFIG_NAME, {**_record(model, name, old.generation + 1), "weights": weights})  # commit
        w.commit()
        w.remove(old.owned - {CONFIG_NAME, weights, INDEX_NAME})
        if old.index is not None:  # an older multi-adapter layout: this save replaces it
            w.remove({INDEX_NAME})
            _remove_sub_folders(path, old.index, keep=())


def _save_multi(model: nn.Module, path: Path, names: list[str], tensors: dict) -> None:
    with FolderWriter(path, (WEIGHTS_PATTERN,)) as w, contextlib.ExitStack() as stack:
        old = committed_state(path)
        w.recover(old.owned)
        generation = old.generation + 1
        subs, records = {}, {}
        for name in names:
            folder = plain_name_in(path, name, "adapter name (sub-folder)")
            sw = stack.enter_context(FolderWriter(folder, (WEIGHTS_PATTERN,)))
            sub_old = committed_state(folder)
            sub_old.owned |= _manifest_weights(old.index, name)  # named by the committed manifest: ours too
            sw.recover(sub_old.owned)
            weights = _weights_name(tensors[name], folder, sw.owned)
            sw.write_safetensors(weights, tensors[name], {"format": "pt"})
            subs[name] = (sw, sub_old)
            records[name] = {**_record(model, name, generation), "weights": weights, "folder": name}
        manifest = {
            "peftlab_version": __version__,
            "format_version": FORMAT_VERSION,
            "generation": generation,
            "adapters": names,
            "active": [n for n in active_adapters(model) if n in names],
            "records": records,
        }
        w.write_json(INDEX_NAME, manifest)  # the commit point
        w.commit()
        for sw, _ in subs.values():
            sw.commit()
        for name, (sw, sub_old) in subs.items():  # each sub-folder loads on its own too
            record = {k: v for k, v in records[name].items() if k != "folder"}
            sw.write_json(CONFIG_NAME, record)
            sw.commit()
            sw.remove(sub_old.owned - {CONFIG_NAME, record["weights"], INDEX_NAME})
        w.remove(old.owned - {INDEX_NAME})  # an older one-adapter layout at the top
        if old.index is not None:
            _remove_sub_folders(path, old.index, keep=set(names))


def _manifest_weights(index: dict | None, name: str) -> set[str]:
    """The weights file a manifest names for adapter ``name`` (a set of at most one of our names)."""
    record = _index_entries(index).get(name, {}).get("record") if index else None
    weights = (record or {}).get("weights")
    return {weights} if isinstance(weights, str) and _WEIGHTS.fullmatch(weights) else set()


def _remove_sub_folders(path: Path, index: dict, keep) -> None:
    """Remove the files of an older manifest's sub-folders (not in ``keep``) that our saves wrote."""
    for name, entry in _index_entries(index).items():
        if name in keep:
            continue
        try:
            folder = plain_name_in(path, entry["folder"], "adapter sub-folder")
        except AdapterFileError:
            continue
        if not folder.is_dir() or folder.is_symlink():
            continue
        try:
            with FolderWriter(folder, (WEIGHTS_PATTERN,)) as sw:
                sw.recover(committed_state(folder).owned | _manifest_weights(index, name))
                sw.remove(sw.owned)
        except AdapterFileError:  # not ours after all: leave it
            continue
        remove_empty_dir(folder)


# ---- reading -------------------------------------------------------------------------------------


def check_format_version(raw: dict, where: Path) -> int:
    version = raw.get("format_version", 1)
    if isinstance(version, bool) or version not in FORMAT_VERSIONS:
        raise AdapterFileError(
            f"{where} has format_version {version!r}, which this peftlab ({__version__}) does not read; valid "
            f"versions: {', '.join(map(str, FORMAT_VERSIONS))}. Upgrade peftlab to load it"
        )
    return version


def config_from_record(raw: dict, where: Path) -> PeftConfig:
    if not is_peftlab_config(raw):
        if isinstance(raw, dict) and "peft_type" in raw:
            raise AdapterFileError(f"{where} is a HF PEFT adapter (it has peft_type); load it with peftlab.import_peft")
        raise AdapterFileError(f"{where} has no 'config' object; is it a peftlab adapter?")
    check_format_version(raw, where)
    cfg = dict(raw["config"])
    cfg.setdefault("method", raw.get("method"))
    return PeftConfig.from_dict(cfg)


def read_adapter_config(path: str | Path) -> tuple[PeftConfig, dict[str, Any]]:
    """(config, raw json) of a saved peftlab adapter; unknown methods, keys or versions are clear errors."""
    path = Path(path)
    config_path = plain_name_in(path, CONFIG_NAME)
    if not config_path.is_file() and path.is_dir():
        raise AdapterFileError(
            f"{path} holds no {CONFIG_NAME}; expected a folder written by peftlab.save_adapter "
            f"(or, for a HF PEFT folder, use peftlab.import_peft)"
        )
    raw = read_json(config_path)
    return config_from_record(raw, config_path), raw


def _upgrade_v1(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Format 1 (one adapter per model) keyed prefix tables as ``peftlab_prefix_<name>.``."""
    return {re.sub(r"^peftlab_prefix_[^.]+\.", "peftlab_prefix.", k): v for k, v in tensors.items()}


@dataclass
class Staged:
    """One adapter read and checked, not yet on a model: ``config`` (with its final name), ``tensors``,
    ``shapes`` to check, a ``transform`` run once the adapter is wrapped (HF import), and where it came from."""

    config: PeftConfig
    tensors: dict[str, torch.Tensor]
    shapes: dict = field(default_factory=dict)
    transform: Any = None
    source: str = ""


def _stage_record(folder: Path, raw: dict, where: Path, check: bool) -> Staged:
    config = config_from_record(raw, where)
    weights = plain_name_in(folder, raw.get("weights", WEIGHTS_NAME), "weights file name")
    tensors = read_safetensors(weights)
    if raw.get("format_version", 1) < 2:
        tensors = _upgrade_v1(tensors)
    if check:
        check_finite(tensors, str(weights))
    name = raw.get("adapter_name") or config.adapter_name
    return Staged(config.replace(adapter_name=name), tensors, raw.get("shapes") or {}, source=str(folder))


def _stage_folder(path: Path, adapter_name: str | None, check: bool) -> tuple[list[Staged], list[str] | None]:
    """Every adapter in ``path`` read and checked (and the saved active set of a manifest)."""
    if layout(path) == "single":
        config_path = plain_name_in(path, CONFIG_NAME)
        if not config_path.is_file():
            read_adapter_config(path)  # the clear "no adapter here" error
        raw = read_json(config_path)
        staged = _stage_record(path, raw, config_path, check)
        if adapter_name is not None:
            staged.config = staged.config.replace(adapter_name=adapter_name)
        return [staged], None
    index_path = plain_name_in(path, INDEX_NAME)
    index = read_json(index_path)
    check_format_version({"format_version": index.get("format_version", 2)}, index_path)
    names = index.get("adapters")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise AdapterFileError(f"{index_path}: 'adapters' must be a list of adapter names")
    entries = _index_entries(index)
    if adapter_name is not None:
        if adapter_name not in entries:
            raise AdapterFileError(f"{path} has no adapter {adapter_name!r}; it has: {', '.join(names)}")
        entries = {adapter_name: entries[adapter_name]}
    out = []
    for name, entry in entries.items():
        folder = plain_name_in(path, entry["folder"], "adapter sub-folder")
        if entry["record"] is not None:
            staged = _stage_record(folder, entry["record"], index_path, check)
        else:  # an older manifest: the sub-folder's own config
            raw = read_json(plain_name_in(folder, CONFIG_NAME))
            staged = _stage_record(folder, raw, folder / CONFIG_NAME, check)
        staged.config = staged.config.replace(adapter_name=name)
        out.append(staged)
    active = index.get("active") if adapter_name is None else None
    return out, [n for n in active if n in entries] if isinstance(active, list) else None


def _stage_consistent(path: Path, adapter_name: str | None, check: bool, attempts: int = 5):
    """:func:`_stage_folder`, consistent under a concurrent save: a save commits new files, then removes the
    old ones, so a reader that read the old config may find its file gone; then the folder changed: read
    it again. A file that is missing while nothing changed is an error."""
    for attempt in range(attempts):
        before = _fingerprint(path)
        try:
            return _stage_folder(path, adapter_name, check)
        except AdapterFileError:
            if attempt == attempts - 1 or _fingerprint(path) == before:
                raise
    raise AssertionError("unreachable")


def _fingerprint(path: Path) -> tuple:
    """The bytes of the folder's config and manifest (what a concurrent save changes on commit)."""
    out = []
    for name in (CONFIG_NAME, INDEX_NAME):
        try:
            out.append((path / name).read_bytes())
        except OSError:
            out.append(None)
    return tuple(out)


# ---- attaching -------------------------------------------------------------------------------------


def _snapshot(model: nn.Module):
    """Active adapters with their weights, and every parameter's ``requires_grad``."""
    weights: dict[str, float] = {}
    for _, layer in adapter_layers(model):
        for n, w in getattr(layer, "weights", {}).items():
            weights.setdefault(n, w)
    active = active_adapters(model)
    return active, [weights.get(n, 1.0) for n in active], {n: p.requires_grad for n, p in model.named_parameters()}


def _restore(model: nn.Module, snap) -> None:
    active, weights, grads = snap
    if adapters(model):
        set_active_adapters(model, active, weights)
    params = dict(model.named_parameters())
    for n, flag in grads.items():
        if n in params:
            params[n].requires_grad_(flag)


def attach(model: nn.Module, staged: list[Staged], trainable: bool = False, active: list[str] | None = None) -> None:
    """Add every staged adapter to ``model``, all or nothing: names are checked first, and if adapter n
    fails, adapters 1..n-1 are removed again and the model is exactly as before.

    On a model without adapters the saved active set (else the first) becomes active; on a model that
    has some, the new ones are added inactive, so loading never changes what the model computes.
    """
    names = [s.config.adapter_name for s in staged]
    clash = [n for n in names if n in adapters(model)]
    if clash or len(set(names)) != len(names):
        taken = clash or [n for n in names if names.count(n) > 1]
        raise AdapterFileError(
            f"this model already has an adapter named {taken[0]!r} (adapters: {', '.join(adapters(model)) or 'none'}); "
            f"pass adapter_name='<new name>' to load it beside, or delete_adapter(model, {taken[0]!r}) first"
        )
    for s in staged:
        check_shapes(model, s.shapes)
    fresh = not adapters(model)
    snap = _snapshot(model)
    added: list[str] = []
    try:
        for s in staged:
            wrap_and_load(model, s.config, s.tensors, s.transform, trainable=trainable)
            added.append(s.config.adapter_name)
        if fresh:
            set_active_adapters(model, [n for n in (active or []) if n in names] or names[:1])
    except BaseException:
        for name in reversed(added):
            delete_adapter(model, name, force=True)
        _restore(model, snap)
        raise


def wrap_and_load(
    model: nn.Module,
    config: PeftConfig,
    tensors: dict[str, torch.Tensor],
    transform=None,
    trainable: bool = False,
) -> None:
    """Add the adapter ``config`` to ``model`` and load ``tensors``; on any failure the model is as before.

    The first adapter on a model becomes active; a further one is added inactive (switch with
    :func:`peftlab.set_active_adapters`), and the active ones keep their weights.
    """
    previous = bool(adapters(model))
    snap = _snapshot(model)
    wrap(model, config)
    try:
        if transform is not None:
            tensors = transform(tensors)
        load_adapter_tensors(model, tensors, config.adapter_name)
    except BaseException:
        delete_adapter(model, config.adapter_name, force=True)
        if previous:
            _restore(model, snap)
        raise
    if previous:
        _restore(model, snap)
    for tensor in adapter_tensors(model, config.adapter_name).values():
        if isinstance(tensor, nn.Parameter) and tensor.is_floating_point():
            tensor.requires_grad_(trainable)


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

    Everything is read and checked before the model changes; the first adapter on a model becomes
    active, further ones are added inactive.
    """
    path = Path(path)
    if not path.exists():
        raise AdapterFileError(f"{path} does not exist; expected a folder written by peftlab.save_adapter")
    staged, active = _stage_consistent(path, adapter_name, check_finite)
    attach(model, staged, trainable=trainable, active=active)
    return model
