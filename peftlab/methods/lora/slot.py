r"""LoRA: Low-Rank Adaptation (Hu et al., 2021, arXiv:2106.09685).

::

            x ──────────────► W (frozen) ─────────────┐
            │                                          ▼
            └─► dropout ─► A (r×d_in) ─► B (d_out×r) ─► × s ─► (+) ─► h

    h = W x + b + s · B A dropout(x),   s = alpha / r   (rsLoRA: s = alpha / sqrt(r))

A is Kaiming-uniform and B is zero, so a freshly wrapped model computes exactly the base
model. ``merge`` folds s·B A into W; ``unmerge`` subtracts it again.

Shapes: x (..., d_in); A (r, d_in); B (d_out, r); h (..., d_out). GPT-2 ``Conv1D`` stores its
weight transposed (d_in, d_out); the layer handles both through :mod:`peftlab.core.layer`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...backends.lora_ops import lora_delta, lora_dropout_input, lora_forward
from ...core.layer import AdapterLayer, Slot, is_conv1d, layer_dims


def adapter_tensor_kwargs(base_layer: nn.Module) -> dict:
    """``device``/``dtype`` keyword arguments for new adapter tensors of ``base_layer`` (see :func:`adapter_dtype`)."""
    weight = getattr(base_layer, "weight", None)
    return {"device": weight.device if weight is not None else None, "dtype": adapter_dtype(base_layer)}


class LowRankTensors:
    """``lora_A`` / ``lora_B`` of a slot, read from its layer's role dicts (shared by the LoRA-family slots)."""

    @property
    def lora_A(self) -> nn.Parameter:
        return self.layer.lora_A[self.name]

    @property
    def lora_B(self) -> nn.Parameter:
        return self.layer.lora_B[self.name]


def adapter_dtype(base_layer: nn.Module) -> torch.dtype:
    """Adapter weights train in fp32 when the base is half precision, float8 or quantized (as HF PEFT)."""
    weight = getattr(base_layer, "weight", None)
    if weight is None or not weight.is_floating_point() or weight.element_size() < 4:  # half, float8 (FP8 bases)
        return torch.float32
    return weight.dtype


class LoraSlot(LowRankTensors, Slot):
    """One LoRA adapter on a linear-like layer (``nn.Linear``, ``Conv1D``, bitsandbytes linears).

    Tensors (in the layer's per-role dicts, keyed by adapter name): ``lora_A`` (r, d_in),
    Kaiming-uniform; ``lora_B`` (d_out, r), zero. Contribution: ``result + w·s·(D(x) Aᵀ) Bᵀ``.
    As the only running slot with weight 1 it takes the fused path (:func:`lora_forward`: the
    lean autograd function on the CPU, the Triton kernel on CUDA), which computes the base term too.

    Args:
        layer: the owning :class:`~peftlab.core.layer.AdapterLayer`; name: the adapter name.
        r, alpha, scaling: rank, alpha and the resulting scale s.
        dropout: dropout probability on the adapter input.
        use_kernel: "auto", "triton" or "torch" (see :class:`LoraConfig`).
    """

    roles = ("lora_A", "lora_B")
    method = "lora"

    def __init__(
        self, layer, name: str, r: int, alpha: float, scaling: float, dropout: float = 0.0, use_kernel: str = "auto"
    ) -> None:
        super().__init__(layer, name)
        self.in_features, self.out_features = layer_dims(layer.base_layer)
        self.r, self.alpha, self.scaling = r, alpha, scaling
        self.dropout_p = float(dropout)
        self.use_kernel = use_kernel
        self.fan_in_fan_out = is_conv1d(layer.base_layer)

    @staticmethod
    def make_tensors(base_layer: nn.Module, r: int) -> dict[str, nn.Parameter]:
        """Fresh ``lora_A`` (r, d_in), Kaiming-uniform(a=√5) as nn.Linear, and ``lora_B`` (d_out, r) = 0."""
        d_in, d_out = layer_dims(base_layer)
        kw = adapter_tensor_kwargs(base_layer)
        lora_a = nn.Parameter(torch.empty(r, d_in, **kw))
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
        return {"lora_A": lora_a, "lora_B": nn.Parameter(torch.zeros(d_out, r, **kw))}

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A (r, d_in), B (d_out, r), s): the contribution is s·(x Aᵀ) Bᵀ."""
        return self.lora_A, self.lora_B, self.scaling

    def dropout_input(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(x ⊙ m, 1/(1-p)) with m drawn as :func:`lora_forward` draws it (one seed from the CPU generator)."""
        p = self.dropout_p if self.training else 0.0
        return lora_dropout_input(x, p) if p > 0 else (x, 1.0)

    def delta_weight(self) -> torch.Tensor:
        """s · B A, shape (d_out, d_in), fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def fused_forward(self, x: torch.Tensor, weight: float) -> torch.Tensor | None:
        if weight != 1.0:
            return None

        return lora_forward(self, x)

    def contribute(self, x: torch.Tensor, result: torch.Tensor, weight: float) -> torch.Tensor:
        return (result + lora_delta(self, x, self.scaling * weight)).to(result.dtype)

    def describe(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, dropout={self.dropout_p:g}"


def lora_layer(
    base_layer: nn.Module,
    r: int = 8,
    alpha: float = 16,
    scaling: float | None = None,
    dropout: float = 0.0,
    use_kernel: str = "auto",
    name: str = "default",
) -> AdapterLayer:
    """A standalone :class:`~peftlab.core.layer.AdapterLayer` around ``base_layer`` with one active LoRA slot.

    For using LoRA on a single module outside :func:`peftlab.wrap`; ``layer.slots[name]`` is the slot.
    """
    layer = AdapterLayer(base_layer)
    scale = alpha / r if scaling is None else scaling
    layer.add_slot(LoraSlot(layer, name, r, alpha, scale, dropout, use_kernel), LoraSlot.make_tensors(base_layer, r))
    layer.active = [name]
    return layer


# ---- HF PEFT interop ---------------------------------------------------------------------------


