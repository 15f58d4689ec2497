"""More than one process: rank queries, full tensors from sharded (FSDP2) models, rank-0 writes, sharding.

Every helper here is safe in a single process (no ``torch.distributed`` process group): then it does
the plain thing (no gather, write directly).

Sharded saving. Under FSDP2 (``torch.distributed.fsdp.fully_shard``) each parameter is a ``DTensor``
whose local part is a slice of dim 0 (``Shard(0)``): a LoRA ``A`` of shape (r, in) is held as
(⌈r / world⌉, in) on each rank, and ranks past the end hold (0, in). Handing such parameters to
safetensors crashes (invalid storage) or, with other sharders (ZeRO-3, FSDP1 flat parameters), silently
writes empty ``torch.Size([0])`` tensors. :func:`gather_state_dict` turns every ``DTensor`` into its full
tensor (``DTensor.full_tensor()``, an all-gather, so every rank must call it, in the same key order),
checks that no tensor came back empty, and :func:`rank_zero_write` writes the files once, on rank 0.

Sharding. :func:`shard_model` applies FSDP2 the way accelerate's FSDP2 plugin does on GPUs: one
``fully_shard`` per transformer block (the classes in the model's ``_no_split_modules``), then one on
the root. FSDP2 shards frozen and trainable parameters alike and keeps each parameter's dtype, so a bf16
frozen base with fp32 adapters works (FSDP2 only needs the *trainable* parameters of one block to share a
dtype). On a CPU this runs with the gloo backend, which accelerate's FSDP plugin does not support.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from .errors import AdapterFileError, ConfigError

T = TypeVar("T")


# ---- ranks -------------------------------------------------------------------------------------


def is_distributed() -> bool:
    """True inside an initialised ``torch.distributed`` process group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def get_rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    """Rank 0 (or no process group at all)."""
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


# ---- sharded tensors ---------------------------------------------------------------------------


def is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def is_sharded(model: nn.Module) -> bool:
    """True when any parameter of ``model`` is a ``DTensor`` (FSDP2 / tensor parallel)."""
    return any(is_dtensor(p) for p in model.parameters())


def _check_not_fsdp1(model: nn.Module) -> None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ConfigError(
            "this model is wrapped by FSDP1 (FullyShardedDataParallel), whose flat parameters hold empty or partial "
            "views on most ranks; shard with FSDP2 instead (peftlab.training.fsdp.shard_model, or accelerate's "
            "FSDP plugin with fsdp_version=2), or save inside FSDP.state_dict_type(model, FULL_STATE_DICT)"
        )


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: ``t.full_tensor()`` for a ``DTensor`` (a collective: call on every rank), else ``t``."""
    return t.full_tensor() if is_dtensor(t) else t


def gather_state_dict(
    tensors: dict[str, torch.Tensor], device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Full, unsharded copies of ``tensors`` (e.g. an adapter state dict of a sharded model) on ``device``.

    A collective when any value is a ``DTensor``: every rank must call it with the same keys in the same order.
    Each result has its global shape (``DTensor.shape``); an empty tensor is an error (it would mean a
    sharder whose parameters we cannot gather, e.g. ZeRO-3 or FSDP1, saved as ``torch.Size([0])``).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        expected = tuple(value.shape)
        full = full_tensor(value.detach()).to(device)
        # ZeRO-3 / FSDP1 leave torch.Size([0]) placeholders; a pruned AdaLoRA triplet is a legit (0, d) tensor
        if tuple(full.shape) != expected or tuple(full.shape) == (0,):
            raise AdapterFileError(
                f"tensor {key!r} gathered with shape {list(full.shape)} (expected {list(expected)}): its parameters "
                "are sharded in a way peftlab cannot gather (ZeRO-3 or FSDP1 flat parameters); use FSDP2 "
                "(fully_shard) or DDP"
            )
        out[key] = full
    return out


def rank_zero_write(write: Callable[[], T], sync: bool | None = None) -> T | None:
    """Run ``write()`` on rank 0 only; other ranks return None.

    Args:
        sync: all ranks take part (barrier, and an error on rank 0 is raised on every rank). Default: when
            the process group is initialised. Pass ``sync=False`` where only rank 0 calls (e.g. from
            ``transformers.Trainer``'s save, which non-zero ranks skip), or the other ranks would wait forever.
    """
    if not is_distributed():
        return write()
    sync = True if sync is None else sync
    result, error = None, None
    if get_rank() == 0:
        try:
            result = write()
        except BaseException as exc:  # re-raised below, after telling the other ranks
            error = exc
    if sync:
        status = [None if error is None else f"{type(error).__name__}: {error}"]
        torch.distributed.broadcast_object_list(status, src=0)
        if error is None and status[0] is not None:
            raise RuntimeError(f"rank 0 failed to write: {status[0]}")
    if error is not None:
        raise error
    return result


# ---- sharded models: save_merged -------------------------------------------------


# ---- sharding (FSDP2) --------------------------------------------------------------------------


