r"""DoRA's row norm on the GPU hot path: the fused Triton kernel of :mod:`peftlab.kernels.dora_norm`.

For W (N, K), A (R, K), B (N, R) and scale s, one pass over W gives both

    ‖W_i + s·B_i A‖² = ‖W_i‖² + 2s·Σ_r B_ir (W Aᵀ)_ir + s²·Σ_r B_ir (B G)_ir,   G = A Aᵀ (R, R)

and ‖W_i‖², without forming W + s·B A. :func:`fused_row_norm` returns ``(n (N,), ‖W‖²_row (N,))`` in fp32, or
None where the torch path must run (a CPU tensor, ``use_kernel="torch"``, an unsupported shape or dtype, or a
kernel that failed once: the kernel module warns once and falls back, it never fails a user).
"""

from __future__ import annotations

import torch

from ..kernels.dora_norm import dora_row_norm_or_none


def fused_row_norm(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, use_kernel: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(‖W + s·B A‖_row, ‖W‖²_row) from the fused kernel on CUDA, else None (see the module docstring)."""
    if use_kernel == "torch" or not weight.is_cuda:
        return None
    with torch.no_grad():  # DoRA treats the norm as a constant in backward
        return dora_row_norm_or_none(weight, lora_A, lora_B, scaling, return_wsq=True, strict=use_kernel == "triton")
