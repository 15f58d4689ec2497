"""Saving a merged model that is sharded (FSDP2): gather on every rank, rebuild unsharded on rank 0, save there."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..api import wrap
from ..core.state import adapters
from ..util.dist import _check_not_fsdp1, full_tensor, gather_state_dict, is_main_process, rank_zero_write
from ..util.errors import ConfigError


def _unsharded_class(model: nn.Module) -> type:
    """The model's own class (FSDP2 swaps in a subclass named ``FSDP<Name>``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return type(model)
    for cls in type(model).__mro__:
        if not issubclass(cls, FSDPModule):
            return cls
    return type(model)  # pragma: no cover


def unsharded_copy(model: nn.Module) -> nn.Module | None:
    """An unsharded, wrapped replica of a sharded transformers model on rank 0 (None on other ranks).

    Every rank gathers the full state dict (a collective); rank 0 builds the model class from
    ``model.config`` on the meta device, wraps it with the same adapter configs and assigns the gathered
    tensors. Memory: one full copy of the model on rank 0's CPU.
    """
    _check_not_fsdp1(model)
    if not hasattr(model, "config"):
        raise ConfigError(
            f"save_merged on a sharded {type(model).__name__} needs a transformers model (with .config) to rebuild"
        )
    state = gather_state_dict(model.state_dict())
    if not is_main_process():
        return None
    with torch.device("meta"):
        replica = _unsharded_class(model)(copy.deepcopy(model.config))
    for adapter in adapters(model).values():
        wrap(replica, copy.deepcopy(adapter.config))
    result = replica.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(
            f"could not rebuild the sharded model unsharded: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    for name, buf in list(replica.named_buffers()):  # non-persistent buffers (not in the state dict)
        if buf.is_meta:
            source = model.get_buffer(name)
            owner, _, leaf = name.rpartition(".")
            module = replica.get_submodule(owner) if owner else replica
            module.register_buffer(leaf, full_tensor(source).detach().to("cpu").clone(), persistent=False)
    return replica


def save_merged_sharded(model: nn.Module, path, save_merged: Callable[..., Any], **save_kwargs: Any):
    """``save_merged`` for a sharded model: gather on every rank, rebuild and save merged on rank 0."""
    replica = unsharded_copy(model)
    return rank_zero_write(lambda: save_merged(replica, path, **save_kwargs), sync=True)
