r"""LoRA on ``nn.Embedding`` (HF PEFT's ``lora.Embedding``).

An embedding is the linear map of a one-hot token id, W (d × V) with the table stored as Wᵀ (V × d)::

    h = E[x] + s · (Aᵀ[x]) Bᵀ · γ       A (r × V) = 0,  B (d × r) ~ N(0, 1),  s = alpha / r

so a fresh adapter computes the base model (A starts at zero, the reverse of a linear LoRA, as in HF PEFT: only
the rows of the tokens seen get a gradient through A). γ is the module's ``embed_scale`` when it has one (Gemma's
scaled embeddings), as HF PEFT applies it. Merging adds s·(B A)ᵀ to the table. Dropout does not apply (the
input is ids).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...util.errors import ConfigError
from .slot import LoraSlot, adapter_tensor_kwargs


class EmbeddingLoraSlot(LoraSlot):
    """LoRA on an ``nn.Embedding``: ``lora_A`` (r, V) zeros, ``lora_B`` (d, r) N(0, 1); ΔW = s·B A (d, V)."""

    @staticmethod
    def make_tensors(base_layer: nn.Module, r: int) -> dict[str, nn.Parameter]:
        kw = adapter_tensor_kwargs(base_layer)
        lora_a = torch.zeros(r, base_layer.num_embeddings, **kw)
        lora_b = torch.randn(base_layer.embedding_dim, r, **kw)
        return {"lora_A": nn.Parameter(lora_a), "lora_B": nn.Parameter(lora_b)}

    def low_rank_factors(self) -> None:
        return None  # the input is token ids, not vectors: mixed batches run it per segment of rows

    def fused_forward(self, x: torch.Tensor, weight: float) -> None:
        return None

    def contribute(self, x: torch.Tensor, result: torch.Tensor, weight: float) -> torch.Tensor:
        base = self.base_layer
        rows = F.embedding(
            x, self.lora_A.t(), padding_idx=base.padding_idx, max_norm=base.max_norm, norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse,
        )  # fmt: skip
        delta = (rows @ self.lora_B.t()) * (self.scaling * weight)
        scale = getattr(base, "embed_scale", None)
        if scale is not None:
            delta = delta * (scale.to(delta.dtype) if isinstance(scale, torch.Tensor) else scale)
        return result + delta.to(result.dtype)


def check_embedding_config(config, path: str) -> None:
    """LoRA on an embedding takes the default or Gaussian init and no DoRA (HF PEFT's ``lora.Embedding``)."""
    if config.use_dora or config.init not in ("default", "gaussian"):
        raise ConfigError(
            f"LoRA on the embedding {path} takes the default init (A = 0, B ~ N(0, 1), as HF PEFT) without DoRA; got "
            f"init={config.init!r}, use_dora={config.use_dora}. Leave the embedding out of target_modules for these"
        )
