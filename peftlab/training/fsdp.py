"""FSDP2 sharding of a wrapped model: ``fully_shard`` per transformer block, then the root.

FSDP2 shards frozen and trainable parameters alike and keeps each parameter's dtype, so a bf16 frozen base
with fp32 adapters works (FSDP2 only needs the *trainable* parameters of one block to share a dtype). On a
CPU this runs with the gloo backend, which accelerate's FSDP plugin does not support. A method that cannot
train sharded says so through its :class:`~peftlab.core.registry.Method` (``unshardable_reason``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.registry import get_method
from ..core.state import adapters
from ..util.dist import is_distributed
from ..util.errors import ConfigError


#: methods whose training cannot run on FSDP-sharded parameters, with the reason
def check_shardable(model: nn.Module) -> None:
    """Raise a :class:`ConfigError` when an adapter method on ``model`` cannot train sharded."""
    for name, state in adapters(model).items():
        reason = get_method(state.config.method).unshardable_reason
        if reason is not None:
            raise ConfigError(f"adapter {name!r} ({state.config.method}) cannot train under FSDP: {reason}")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP wraps one by one: instances of the model's ``_no_split_modules`` classes (the
    transformer blocks, as accelerate's ``TRANSFORMER_BASED_WRAP``), else the entries of the longest
    ``nn.ModuleList``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard_model(
    model: nn.Module, param_dtype: torch.dtype | None = None, reshard_after_forward: bool = True
) -> nn.Module:
    """FSDP2-shard ``model`` in place over all ranks: ``fully_shard`` per transformer block, then the root.

    Args:
        param_dtype: compute dtype of the all-gathered parameters (e.g. torch.bfloat16 for mixed precision;
            gradients are reduced in fp32). None keeps each parameter's own dtype.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not is_distributed():
        raise ConfigError(
            "shard_model needs an initialised process group (launch with torchrun or accelerate launch)"
        )
    check_shardable(model)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for block in transformer_blocks(model):
        fully_shard(block, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model
