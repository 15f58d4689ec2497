"""``transformers.Trainer`` integration: per-step hooks (AdaLoRA) and adapter-only checkpoints.

``Trainer(model=wrapped, ..., callbacks=[peftlab.PeftlabCallback()])``:

* after each optimizer step (before gradients are zeroed) :func:`peftlab.on_train_step` runs, once per
  optimizer step, not per micro-batch (AdaLoRA's rank allocation);
* ``trainer.save_model(out)`` and every ``checkpoint-N/`` hold the adapter, not the whole model:
  ``adapter_config.json`` + its weights file (loadable with :func:`peftlab.load_adapter`), optionally
  HF PEFT's format in ``peft/`` (``PeftlabCallback(peft_format=True)``), plus what resuming needs:
  ``peftlab_train_state.safetensors`` (the adapter tensors keyed by their path in the model, a second small
  copy, and AdaLoRA's importance EMAs and final rank pattern) and a ``model.safetensors.index.json``
  pointing to it;
* ``trainer.train(resume_from_checkpoint=...)`` therefore restores the adapter through the Trainer's own
  sharded-checkpoint loader (``load_state_dict(strict=False)``; no base weights are read), the optimizer,
  scheduler and RNG states as usual, and the AdaLoRA allocator state (a ``load_state_dict`` pre-hook takes
  the ``peftlab_train_state.*`` keys).

How: when the Trainer is built the callback replaces ``save_pretrained`` on that model instance with an
adapter writer (the Trainer saves through ``model.save_pretrained``, as it does for HF PEFT models). A model
that is no longer wrapped saves normally. A merged adapter is saved as its own tensors (merging never
changes them), so a checkpoint of a merged model reloads exactly; the full-model save it used to fall back
to wrote wrapper keys that a plain model cannot load. ``peftlab.save_merged`` still writes the full merged
model. The index is the one file the Trainer's resume path needs besides the adapter; without a
``config.json`` ``from_pretrained(checkpoint)`` fails loudly instead of silently dropping the adapter.

This module imports ``transformers.TrainerCallback``; ``peftlab`` loads it lazily.
"""

from __future__ import annotations

import logging
import re
import types
import weakref
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ..api import on_train_step
from ..core.registry import get_method
from ..core.state import adapters
from ..core.tensors import adapter_state_dict
from ..persist.format import CONFIG_NAME, save_adapter
from ..persist.hf_peft import export_peft
from ..util.dist import gather_state_dict
from ..util.files import FolderWriter, plain_name_in, read_json

TRAIN_STATE_NAME = "peftlab_train_state.safetensors"
TRAIN_STATE_PREFIX = "peftlab_train_state."
INDEX_NAME = "model.safetensors.index.json"
PEFT_SUBFOLDER = "peft"
_ORIGINAL = "_peftlab_original_save_pretrained"


# ---- method training state (AdaLoRA's allocator) ---------------------------------------------------


def train_state_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Per-adapter training state that is not a parameter, from each method's ``train_state`` hook (AdaLoRA:
    importance averages and final rank pattern), keyed ``peftlab_train_state.<adapter>.<key>``."""
    out: dict[str, torch.Tensor] = {}
    for name, state in adapters(model).items():
        hook = get_method(state.config.method).train_state
        if hook is not None:
            out.update({f"{TRAIN_STATE_PREFIX}{name}.{k}": v for k, v in hook(model, state).items()})
    return out


def load_train_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`train_state_tensors` (keys that are not ``peftlab_train_state.*`` are ignored)."""
    for name, state in adapters(model).items():
        hook = get_method(state.config.method).load_train_state
        prefix = f"{TRAIN_STATE_PREFIX}{name}."
        own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if hook is not None and own:
            hook(model, state, own)


def _train_state_pre_hook(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """``load_state_dict`` pre-hook: take the ``peftlab_train_state.*`` entries out and restore them."""
    keys = [k for k in state_dict if k.startswith(prefix + TRAIN_STATE_PREFIX)]
    if keys:
        load_train_state(module, {k[len(prefix) :]: state_dict.pop(k) for k in keys})


# ---- adapter-only save_pretrained ----------------------------------------------------------------


def adapter_weights_name(folder: str | Path) -> str:
    """The weights file a saved peftlab adapter's config points to (a plain name inside ``folder``)."""
    name = read_json(Path(folder) / CONFIG_NAME).get("weights", "adapter.safetensors")
    return plain_name_in(folder, name, "weights file name").name


def _named_adapter_tensors(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """One adapter's tensors keyed by their path in ``model`` (what ``model.load_state_dict`` takes)."""
    try:
        return adapter_state_dict(model, name, named=True)
    except TypeError:  # an io without the ``named`` switch keys by model path already
        return adapter_state_dict(model, name)


def save_checkpoint_files(
    model: torch.nn.Module, save_directory: str | Path, peft_format: bool = False
) -> Path:
    """Write the adapter files of every adapter on ``model`` into ``save_directory`` (see the module doc): one
    adapter at the top, several in ``<name>/`` subfolders (:func:`peftlab.save_adapter`), and for the Trainer's
    resume ``peftlab_train_state.safetensors`` (the adapter tensors keyed by model path, AdaLoRA's allocator
    state) with the index that points the Trainer's loader to it."""
    out = Path(save_directory)
    names = list(adapters(model))
    resume: dict[str, torch.Tensor] = {}
    for name in names:
        folder = out if len(names) == 1 else out / name
        save_adapter(model, folder, name)
        if peft_format:
            export_peft(model, folder / PEFT_SUBFOLDER, name)
        resume.update(gather_state_dict(_named_adapter_tensors(model, name)))
    resume.update(train_state_tensors(model))
    with FolderWriter(out) as writer:  # staged + renamed, under the folder's lock; a killed save's temporaries go
        writer.recover(set())
        writer.write_safetensors(TRAIN_STATE_NAME, resume, {"format": "pt"})
        writer.write_json(INDEX_NAME, _resume_index(resume))
    return out


def _resume_index(resume: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The ``model.safetensors.index.json`` that points the Trainer's resume loader to the train-state file."""
    return {
        "metadata": {
            "format": "peftlab-adapter",
            "note": "adapter-only checkpoint written by peftlab.PeftlabCallback: load it with "
            "peftlab.load_adapter(base_model, this_folder); the base model's weights are not here. "
            f"{TRAIN_STATE_NAME} holds the trainable tensors and allocator state for trainer.train(resume_from_checkpoint)",
        },
        "weight_map": dict.fromkeys(resume, TRAIN_STATE_NAME),
    }


def _adapter_save_pretrained(self, save_directory, *args: Any, is_main_process: bool = True, **kwargs: Any):
    """``save_pretrained`` of a model trained with PeftlabCallback: the adapter files only."""
    original = getattr(self, _ORIGINAL)
    if not adapters(self):  # unwrapped since: a plain model saves normally
        return original(save_directory, *args, is_main_process=is_main_process, **kwargs)
    callback = getattr(self, "_peftlab_callback", None)
    if is_main_process:
        save_checkpoint_files(self, save_directory, peft_format=bool(callback and callback.peft_format))
    return None


def install_adapter_checkpoints(model: torch.nn.Module, callback: PeftlabCallback | None = None) -> None:
    """Make ``model.save_pretrained`` write adapter-only checkpoints and ``load_state_dict`` restore the
    AdaLoRA train state (idempotent). Undone by :func:`uninstall_adapter_checkpoints`."""
    if _ORIGINAL not in model.__dict__:
        model.__dict__[_ORIGINAL] = model.save_pretrained
        model.__dict__["save_pretrained"] = types.MethodType(_adapter_save_pretrained, model)
        model.__dict__["_peftlab_load_hook"] = model.register_load_state_dict_pre_hook(_train_state_pre_hook)
    if callback is not None:
        model.__dict__["_peftlab_callback"] = callback
    _QuietResume.install(model)


def uninstall_adapter_checkpoints(model: torch.nn.Module) -> None:
    if _ORIGINAL in model.__dict__:
        del model.__dict__["save_pretrained"]
        del model.__dict__[_ORIGINAL]
        model.__dict__.pop("_peftlab_load_hook").remove()
        model.__dict__.pop("_peftlab_callback", None)


class _QuietResume(logging.Filter):
    """Drops the Trainer's resume warnings that an adapter-only checkpoint makes meaningless: "missing keys"
    when every missing key is a frozen (base) parameter of a model we installed on, and "unexpected keys"
    when all are our ``peftlab_train_state.*`` keys."""

    models: weakref.WeakSet = weakref.WeakSet()
    installed = False

    @classmethod
    def install(cls, model) -> None:
        cls.models.add(model)
        if not cls.installed:
            logging.getLogger("transformers.trainer").addFilter(cls())
            cls.installed = True

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "keys in the checkpoint model loaded" not in message:
            return True
        keys = set(re.findall(r"'([^']+)'", message))
        if message.startswith("There were unexpected keys"):
            return not all(k.startswith(TRAIN_STATE_PREFIX) for k in keys)
        for model in list(self.models):
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            if keys and not keys & trainable and keys <= set(model.state_dict()):
                return False
        return True


# ---- the callback --------------------------------------------------------------------------------


class PeftlabCallback(TrainerCallback):
    """Calls :func:`peftlab.on_train_step` after each optimizer step, before gradients are zeroed, and makes
    the Trainer's checkpoints and ``save_model`` adapter-only (see :mod:`peftlab.training.callbacks`).

    ``Trainer(model=wrapped, ..., callbacks=[peftlab.PeftlabCallback()])``; needed for AdaLoRA.

    Args:
        adapter_checkpoints: save only the adapter (default True); False keeps the Trainer's full-model saves.
        peft_format: also write HF PEFT's format into ``peft/`` of every checkpoint.
    """

    def __init__(self, adapter_checkpoints: bool = True, peft_format: bool = False) -> None:
        self.adapter_checkpoints = adapter_checkpoints
        self.peft_format = peft_format

    def _install(self, model) -> None:
        if self.adapter_checkpoints and model is not None and adapters(model):
            install_adapter_checkpoints(model, self)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._install(model)
        return control

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._install(model)  # a callback added after the Trainer was built
        return control

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            on_train_step(model, state.global_step)
        return control


