"""Interop with Hugging Face PEFT's on-disk format, both ways.

``export_peft`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` that
``peft.PeftModel.from_pretrained(base, path)`` loads; ``import_peft`` reads a folder saved by
``peft`` (``save_pretrained``) into a peftlab-wrapped model. The key and config mapping is
method-specific and lives in each method file (:class:`peftlab.core.registry.Method`); an HF option a
method does not implement is refused by name there, never applied as something else.

Both share ``adapter_config.json`` with peftlab's own format, so neither writes over the other: export
into a folder holding a peftlab adapter (or save into one holding a HF PEFT adapter) is refused with the
fix (a sub-folder). An export records the sub-folders it wrote in ``peftlab_export.json``; the next export
into that folder removes the ones it no longer writes, and an import reads exactly the listed ones. Every
adapter is prepared and checked before anything is written; an import reads every adapter before any is
attached. Folder names read from disk are confined to the folder (:func:`peftlab.util.files.plain_name_in`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..core.layer import SLOT_ROLES, AdapterLayer
from ..core.registry import get_method, method_for_peft_type
from ..core.state import adapters, get_state
from ..core.structure import head_module_names, name_matches, structure, task_type
from ..core.tensors import adapter_state_dict
from ..core.tensors import check_finite as check_tensors_finite
from ..util.dist import gather_state_dict, is_main_process
from ..util.errors import AdapterFileError, ConfigError
from ..util.files import FolderWriter, plain_name_in, read_json, read_safetensors, remove_empty_dir
from .format import INDEX_NAME, Staged, attach, is_hf_peft_config, is_peftlab_config

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
#: what our last export into a folder wrote (its sub-folders), so a newer export removes the stale ones
#: and an import reads exactly what the export wrote
EXPORT_MANIFEST = "peftlab_export.json"


#: Tasks whose head HF PEFT always trains and saves (its PeftModelFor... adds ``classifier``/``score``/``qa_outputs``).
HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")


def _plain_head_state(module: nn.Module) -> dict:
    """A head module's own tensors as a plain module would name them (peftlab wrappers spliced out)."""
    out = {}
    for key, value in module.state_dict().items():
        parts = key.split(".")
        if any(p in SLOT_ROLES for p in parts):
            continue
        out[key.replace("base_layer.", "")] = value.detach()
    return out


def _with_heads(model: nn.Module, tensors: dict, state, listed) -> tuple[dict, list[str] | None]:
    """Add every classification-head module (the top-level modules outside the backbone:
    ``classifier``, ``score``, ``pre_classifier``, ``pooler``, ``classification_head``...) to an export.

    HF PEFT wraps the modules named in ``modules_to_save`` (plus ``classifier``/``score``) and loads their
    weights from the file; a freshly loaded base has a newly initialised head, so the export carries
    each head module's current weights (the adapter's trained copy, or the base's) and names exactly
    those modules, and ``PeftModel.from_pretrained`` then reproduces our logits.
    """
    saved = list(listed or [])
    out = dict(tensors)
    output_heads = head_module_names(model)
    for head in structure(model).head:
        module = model.get_submodule(head)
        if head not in output_heads and any(isinstance(m, AdapterLayer) for m in module.modules()):
            continue  # it holds adapted modules: a backbone without attention blocks (ConvNeXt), not a head
        if isinstance(module, AdapterLayer):
            if head in state.modules_to_save:  # the trained copy is in the tensors already
                if head not in saved:
                    saved.append(head)
                continue
            module = module.base_layer
        # every tensor of the head (some may be in already, e.g. a bias trained with bias="all")
        out.update({f"{head}.{k}": v for k, v in _plain_head_state(module).items() if f"{head}.{k}" not in out})
        if head not in saved:
            saved.append(head)
    return out, saved or None


def _heads_in_file(model: nn.Module, raw: dict, ours: dict) -> list[str]:
    """The ``modules_to_save`` to recreate on import: the listed names and the model's head modules that
    the file holds tensors for other than adapter tensors (HF PEFT lists ``classifier`` and ``score`` whether or
    not the model has them; an attention-free backbone such as ConvNeXt's holds the LoRA tensors, no copy)."""
    names = list(dict.fromkeys([*(raw.get("modules_to_save") or []), *structure(model).head]))
    paths = [p for p, _ in model.named_modules() if p]
    keep = []
    for name in names:
        hits = [p for p in paths if name_matches(p, name)]
        if hits and any(k.startswith(h + ".") and not SLOT_ROLES & set(k.split(".")) for h in hits for k in ours):
            keep.append(name)
    return keep


def export_peft(
    model: nn.Module, path: str | Path, adapter_name: str | None = None, check_finite: bool = True
) -> Path:
    """Write adapters in HF PEFT's layout into ``path``.

    One adapter (``adapter_name``, or the model's only one) goes to ``path`` itself. With several
    (``adapter_name=None``), HF PEFT's multi-adapter layout: the adapter named ``default`` (else the
    first) at ``path``, every other in ``path/<name>/``; so ``PeftModel.from_pretrained(base, path)``
    followed by ``.load_adapter(f"{path}/{name}", adapter_name=name)`` reproduces each of them.
    Sub-folders a previous export wrote and this one does not are removed; nothing else is.

    Raises:
        ConfigError: a method without a HF PEFT equivalent (nothing is written).
        AdapterFileError: NaN/inf tensors (``check_finite=False`` exports anyway), or ``path`` (or a
            sub-folder) holds a peftlab adapter: export into another folder or a sub-folder.
    """
    path = Path(path)
    names = list(adapters(model))
    if adapter_name is not None or len(names) <= 1:
        names = [get_state(model, adapter_name).name]
    root = "default" if "default" in names else names[0]
    prepared = {name: _prepare(model, name, check_finite) for name in names}  # all checked before any write
    if not is_main_process():  # rank 0 writes
        return path
    subs = [n for n in names if n != root]
    with FolderWriter(path) as w:
        previous = _previous_export(path)
        w.recover(set())
        _check_target(path)  # every target checked before anything is written
        for name in subs:
            _check_target(plain_name_in(path, name, "adapter name (sub-folder)"))
        for name in subs:
            folder = plain_name_in(path, name, "adapter name (sub-folder)")
            with FolderWriter(folder) as sw:
                sw.recover(set())
                _write_hf(sw, folder, *prepared[name])
        _write_hf(w, path, *prepared[root])
        w.write_json(EXPORT_MANIFEST, {"root": root, "sub_folders": subs})
        w.commit()
        for name in previous:
            if name not in subs:
                _remove_export(path, name)
    return path


def _prepare(model: nn.Module, adapter_name: str, check_finite: bool) -> tuple[dict, dict]:
    """(HF config, HF-keyed tensors) of one adapter; every rank gathers (FSDP2)."""
    state = get_state(model, adapter_name)
    method = get_method(state.config.method)
    if method.to_peft_config is None or method.to_peft_key is None:
        raise ConfigError(
            f"method {state.config.method!r} (adapter {adapter_name!r}) has no HF PEFT export (HF PEFT has no "
            f"equivalent); save it with peftlab.save_adapter"
        )
    tensors = adapter_state_dict(model, adapter_name)
    if method.prepare_export is not None:
        tensors = method.prepare_export(model, tensors, state)
    state.info.setdefault("task_type", task_type(model))
    config = method.to_peft_config(state.config, state)
    if config.get("task_type") is None:
        config["task_type"] = task_type(model)
    if config["task_type"] in HEAD_TASKS:
        tensors, config["modules_to_save"] = _with_heads(model, tensors, state, config.get("modules_to_save"))
    tensors = gather_state_dict(tensors)
    tensors = {method.to_peft_key(k): v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    if check_finite:
        for key, value in tensors.items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise AdapterFileError(
                    f"refusing to export adapter {adapter_name!r}: tensor {key} has NaN/inf values (a diverged "
                    f"training run?). Reset or retrain it, or pass check_finite=False to export it anyway"
                )
    return config, tensors


def _check_target(folder: Path) -> None:
    """Refuse to write HF PEFT's files over a peftlab adapter (they share ``adapter_config.json``)."""
    config = folder / PEFT_CONFIG_NAME
    raw = None
    if config.is_file() and not config.is_symlink():
        try:
            raw = read_json(config)
        except AdapterFileError:
            raw = None
    ours = is_peftlab_config(raw) or (folder / INDEX_NAME).is_file()
    if ours or ((config.exists() or config.is_symlink()) and not is_hf_peft_config(raw)):
        what = "a peftlab adapter" if ours else f"an {PEFT_CONFIG_NAME} that is not HF PEFT's"
        raise AdapterFileError(
            f"{folder} holds {what}; writing HF PEFT's format there would overwrite it. Export into another folder "
            f"or a sub-folder, e.g. {folder / 'peft'}"
        )


def _write_hf(writer: FolderWriter, folder: Path, config: dict, tensors: dict) -> None:
    _check_target(folder)
    writer.write_safetensors(PEFT_WEIGHTS_NAME, tensors, {"format": "pt"})
    writer.write_json(PEFT_CONFIG_NAME, config)


def _previous_export(path: Path) -> list[str]:
    """The sub-folders our previous export into ``path`` wrote (none if ``path`` has no manifest of ours)."""
    try:
        raw = read_json(path / EXPORT_MANIFEST) if (path / EXPORT_MANIFEST).is_file() else {}
    except AdapterFileError:
        return []
    subs = raw.get("sub_folders")
    return [s for s in subs if isinstance(s, str)] if isinstance(subs, list) else []


def _remove_export(path: Path, name: str) -> None:
    """Remove the HF PEFT files an older export wrote into ``path/name`` (then the folder, if empty)."""
    try:
        folder = plain_name_in(path, name, "exported sub-folder")
    except AdapterFileError:
        return
    if not folder.is_dir() or folder.is_symlink():
        return
    try:
        raw = read_json(folder / PEFT_CONFIG_NAME)
    except AdapterFileError:
        return
    if not is_hf_peft_config(raw):
        return
    with FolderWriter(folder) as w:
        w.recover({PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME})
        w.remove({PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME})
    remove_empty_dir(folder)


def import_peft(
    model: nn.Module,
    path: str | Path,
    adapter_name: str | None = None,
    trainable: bool = False,
    check_finite: bool = True,
) -> nn.Module:
    """Add adapters saved by HF PEFT in ``path`` to ``model`` (plain or wrapped) and load their weights.

    ``adapter_name=None``: the adapter at ``path`` as ``default`` plus every adapter in a sub-folder
    ``path/<name>/`` (HF PEFT's multi-adapter layout) under its folder's name; for a folder written by
    :func:`export_peft`, exactly the sub-folders it wrote. With a name: only the adapter at ``path`` (or,
    if ``path`` has none, in ``path/<adapter_name>/``), under that name.

    Every adapter is read and checked before the model changes; if one fails, none is attached.
    """
    path = Path(path)
    if not path.is_dir():
        _missing(path)
    has_root = plain_name_in(path, PEFT_CONFIG_NAME).is_file()
    if adapter_name is None:
        if (path / EXPORT_MANIFEST).is_file():
            subs = [plain_name_in(path, s, "exported sub-folder") for s in _previous_export(path)]
        else:
            subs = []
            for p in sorted(path.iterdir()):
                if (p / PEFT_CONFIG_NAME).is_file():
                    subs.append(plain_name_in(path, p.name, "adapter sub-folder"))
        if not has_root and not subs:
            _missing(path)
        todo = ([(path, "default")] if has_root else []) + [(sub, sub.name) for sub in subs]
    else:
        if not has_root and plain_name_in(path, adapter_name, "adapter name (sub-folder)").is_dir():
            path = path / adapter_name
        todo = [(path, adapter_name)]
    staged = [_stage_one(model, folder, name, check_finite) for folder, name in todo]
    attach(model, staged, trainable=trainable)
    return model


def _missing(path: Path) -> None:
    if not path.exists():
        raise AdapterFileError(f"{path} does not exist; expected a folder saved by peft's save_pretrained")
    found = sorted(p.name for p in path.iterdir())[:10] if path.is_dir() else [path.name]
    hint = ""
    if any(f.endswith(".bin") for f in found):
        hint = (
            " It has a .bin (pickle) file: peftlab reads safetensors only; re-save it with "
            "peft's save_pretrained(safe_serialization=True)"
        )
    raise AdapterFileError(
        f"{path} holds no {PEFT_CONFIG_NAME} + {PEFT_WEIGHTS_NAME} (found: {', '.join(found) or 'nothing'}).{hint}"
    )


def _stage_one(model: nn.Module, path: Path, adapter_name: str, check_finite: bool) -> Staged:
    """One HF PEFT adapter read, mapped and checked; nothing on the model changes."""
    config_path = plain_name_in(path, PEFT_CONFIG_NAME)
    weights_path = plain_name_in(path, PEFT_WEIGHTS_NAME)
    if not config_path.is_file():
        _missing(path)
    raw = read_json(config_path)
    if "peft_type" not in raw:
        hint = " (it is a peftlab adapter: load it with peftlab.load_adapter)" if is_peftlab_config(raw) else ""
        raise AdapterFileError(f"{config_path} has no 'peft_type'; is it a HF PEFT adapter?{hint}")
    method = method_for_peft_type(raw["peft_type"])
    config = method.from_peft_config(raw).replace(adapter_name=adapter_name)  # unsupported options refused here
    if not weights_path.is_file():
        _missing(path)
    tensors = read_safetensors(weights_path)
    if check_finite:
        check_tensors_finite(tensors, str(weights_path))
    ours = {method.from_peft_key(k): v for k, v in tensors.items()}
    heads = _heads_in_file(model, raw, ours)
    if heads or config.modules_to_save:
        config = config.replace(modules_to_save=heads or None)

    def transform(tensors):
        if method.prepare_import is None:
            return tensors
        return method.prepare_import(model, tensors, get_state(model, adapter_name))

    return Staged(config, ours, transform=transform, source=str(path))
