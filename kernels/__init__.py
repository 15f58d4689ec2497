"""Fused LoRA kernels (Triton), shipped as ``peftlab.kernels``.

``triton_available()`` tells whether the Triton path can run; ``lora_linear`` is the fused
LoRA linear (see :mod:`peftlab.kernels.lora`, imported lazily so that importing peftlab never
needs Triton); ``supports`` / ``lora_linear_or_none`` (:mod:`peftlab.kernels.support`) are what
``use_kernel="auto"`` dispatches with: unsupported tensors or a Triton compile/launch error fall
back to the torch path with a one-time warning. :mod:`peftlab.kernels.reference` holds pure-torch
references of every kernel; :mod:`peftlab.kernels.aot` compiles every kernel for sm_80/sm_90
without a GPU.
"""

from .support import lora_linear_or_none, supports, unsupported

__all__ = ["lora_linear", "lora_linear_or_none", "supports", "triton_available", "unsupported"]


def triton_available() -> bool:
    """True when Triton imports (the kernels also need CUDA tensors, or TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, seed=None, kernel_backward=False):
    """y = x Wᵀ + b + s · (D(x) Aᵀ) Bᵀ with the fused Triton kernels; see :func:`peftlab.kernels.lora.lora_linear`."""
    from .lora import lora_linear as fused

    return fused(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, kernel_backward=kernel_backward)
