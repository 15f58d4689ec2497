"""AdaLoRA's training state that is not a parameter: the rank allocator's importance averages (Ī, Ū) and its
final rank pattern. Saved with Trainer checkpoints through the method's ``train_state`` hooks, so a resumed
run allocates ranks exactly as an uninterrupted one."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...util.dist import full_tensor


def _allocator(state) -> Any:
    objects = getattr(getattr(state, "live", None), "objects", None) or {}
    return objects.get("allocator")


def train_state(model: nn.Module, state) -> dict[str, torch.Tensor]:
    """``{"ipt.<entry>", "unc.<entry>", "final.<path>", "present"}`` tensors of one adapter's allocator."""
    allocator = _allocator(state)
    if allocator is None:
        return {}
    out: dict[str, torch.Tensor] = {}
    for kind in ("ipt", "unc"):
        for key, value in (getattr(allocator, kind, None) or {}).items():
            out[f"{kind}.{key}"] = full_tensor(value).detach().to("cpu").contiguous()
    for path, keep in (getattr(allocator, "final_pattern", None) or {}).items():
        out[f"final.{path}"] = torch.tensor(keep, dtype=torch.bool)
    out["present"] = torch.ones(1)
    return out


def load_train_state(model: nn.Module, state, tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`train_state` (``tensors`` keyed as it writes them)."""
    allocator = _allocator(state)
    if allocator is None or "present" not in tensors:
        return
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for kind in ("ipt", "unc"):
        table = getattr(allocator, kind)
        table.clear()
        for key, value in tensors.items():
            if key.startswith(f"{kind}."):
                table[key[len(kind) + 1 :]] = value.to(device)
    final = {k[len("final.") :]: v.tolist() for k, v in tensors.items() if k.startswith("final.")}
    allocator.final_pattern = final or None
    if final:
        state.config.rank_pattern = final
