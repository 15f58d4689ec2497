"""Interop with Hugging Face PEFT's on-disk format, both ways.

``export_peft`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` that
``peft.PeftModel.from_pretrained(base, path)`` loads; ``import_peft`` reads a folder saved by
``peft`` (``save_pretrained``) into a peftlab-wrapped model. The key and config mapping is
method-specific and lives in each method file (:class:`peftlab.core.registry.Method`).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..core.layer import SLOT_ROLES, AdapterLayer
from ..core.registry import get_method, method_for_peft_type
from ..core.state import adapters, get_state
from ..core.structure import name_matches, structure, task_type
from ..core.tensors import adapter_state_dict
from ..core.tensors import check_finite as check_tensors_finite
from ..util.dist import gather_state_dict, is_main_process
from ..util.errors import AdapterFileError, ConfigError
from ..util.files import atomic_save_safetensors, atomic_write_json, folder_lock, read_json, read_safetensors
from .format import wrap_and_load

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"


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
    for head in structure(model).head:
        module = model.get_submodule(head)
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
    the file holds tensors for (HF PEFT lists ``classifier`` and ``score`` whether or not the model has them)."""
    names = list(dict.fromkeys([*(raw.get("modules_to_save") or []), *structure(model).head]))
    paths = [p for p, _ in model.named_modules() if p]
    keep = []
    for name in names:
        hits = [p for p in paths if name_matches(p, name)]
        if hits and any(k.startswith(h + ".") for h in hits for k in ours):
            keep.append(name)
    return keep


def export_peft(model: nn.Module, path: str | Path, adapter_name: str | None = None) -> Path:
    """Write adapters in HF PEFT's layout into ``path``.

    One adapter (``adapter_name``, or the model's only one) goes to ``path`` itself. With several
    (``adapter_name=None``), HF PEFT's multi-adapter layout: the adapter named ``default`` (else the
    first) at ``path``, every other in ``path/<name>/``; so ``PeftModel.from_pretrained(base, path)``
    followed by ``.load_adapter(f"{path}/{name}", adapter_name=name)`` reproduces each of them.
    """
    path = Path(path)
    names = list(adapters(model))
    if adapter_name is not None or len(names) <= 1:
        _export_one(model, path, get_state(model, adapter_name).name)
        return path
    root = "default" if "default" in names else names[0]
    _export_one(model, path, root)
    for name in names:
        if name != root:
            _export_one(model, path / name, name)
    return path


def _export_one(model: nn.Module, path: Path, adapter_name: str) -> None:
    state = get_state(model, adapter_name)
    method = get_method(state.config.method)
    if method.to_peft_config is None or method.to_peft_key is None:
        raise ConfigError(
            f"method {state.config.method!r} has no HF PEFT export (HF PEFT has no equivalent); "
            f"save it with peftlab.save_adapter"
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
    tensors = gather_state_dict(tensors)  # full tensors of sharded (FSDP2) models; every rank gathers
    if not is_main_process():  # rank 0 writes
        return
    with folder_lock(path):
        atomic_save_safetensors(
            path / PEFT_WEIGHTS_NAME, {method.to_peft_key(k): v for k, v in tensors.items()}, {"format": "pt"}
        )
        atomic_write_json(path / PEFT_CONFIG_NAME, config)


def import_peft(
    model: nn.Module,
    path: str | Path,
    adapter_name: str | None = None,
    trainable: bool = False,
    check_finite: bool = True,
) -> nn.Module:
    """Add adapters saved by HF PEFT in ``path`` to ``model`` (plain or wrapped) and load their weights.

    ``adapter_name=None``: the adapter at ``path`` as ``default`` plus every adapter in a sub-folder
    ``path/<name>/`` (HF PEFT's multi-adapter layout) under its folder's name. With a name: only the
    adapter at ``path`` (or, if ``path`` has none, in ``path/<adapter_name>/``), under that name.
    """
    path = Path(path)
    subs = sorted(p for p in path.iterdir() if (p / PEFT_CONFIG_NAME).is_file()) if path.is_dir() else []
    has_root = (path / PEFT_CONFIG_NAME).is_file()
    if adapter_name is None:
        if not has_root and not subs:
            _missing(path)
        if has_root:
            _import_one(model, path, "default", trainable, check_finite)
        for sub in subs:
            _import_one(model, sub, sub.name, trainable, check_finite)
        return model
    if not has_root and (path / adapter_name / PEFT_CONFIG_NAME).is_file():
        path = path / adapter_name
    _import_one(model, path, adapter_name, trainable, check_finite)
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


def _import_one(model: nn.Module, path: Path, adapter_name: str, trainable: bool, check_finite: bool) -> None:
    if not (path / PEFT_CONFIG_NAME).is_file():
        _missing(path)
    raw = read_json(path / PEFT_CONFIG_NAME)
    if "peft_type" not in raw:
        raise AdapterFileError(f"{path / PEFT_CONFIG_NAME} has no 'peft_type'; is it a HF PEFT adapter?")
    method = method_for_peft_type(raw["peft_type"])
    if not (path / PEFT_WEIGHTS_NAME).is_file():
        _missing(path)
    tensors = read_safetensors(path / PEFT_WEIGHTS_NAME)
    if check_finite:
        check_tensors_finite(tensors, str(path / PEFT_WEIGHTS_NAME))
    config = method.from_peft_config(raw).replace(adapter_name=adapter_name)
    ours = {method.from_peft_key(k): v for k, v in tensors.items()}
    heads = _heads_in_file(model, raw, ours)
    if heads or config.modules_to_save:
        config = config.replace(modules_to_save=heads or None)

    def transform(tensors):
        if method.prepare_import is None:
            return tensors
        return method.prepare_import(model, tensors, get_state(model, adapter_name))

    wrap_and_load(model, config, ours, transform, trainable=trainable)
