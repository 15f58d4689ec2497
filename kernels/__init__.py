"""Fused LoRA kernels (Triton), shipped as ``peftlab.kernels``.

``triton_available()`` tells whether the Triton path can run; ``lora_linear`` is the fused
LoRA linear (see :mod:`peftlab.kernels.lora`, imported lazily so that importing peftlab never
needs Triton); ``supports`` (:mod:`peftlab.kernels.support`) and :func:`lora_linear_or_none` are what
``use_kernel="auto"`` dispatches with: unsupported tensors or a Triton compile/launch error fall
back to the torch path with a one-time warning. :mod:`peftlab.kernels.sgmv` (multi-adapter SGMV/BGMV) and
:mod:`peftlab.kernels.sgmv_backward` (its backward, for training with per-row adapters) serve mixed batches.
:mod:`peftlab.kernels.reference` holds pure-torch
references of every kernel; :mod:`peftlab.kernels.aot` compiles every kernel for sm_80/sm_90
without a GPU.
"""

from .support import is_disabled, kernel_failed, supports, unsupported, warn_once

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


def lora_linear_or_none(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, seed=None, strict=False):
    """The fused kernel's y = x Wᵀ + b + s·(D(x) Aᵀ) Bᵀ, or None where the torch path must run.

    None (with a one-time warning) when :func:`~peftlab.kernels.support.unsupported` names a reason, or when compiling or
    launching the kernel fails. ``strict=True`` (``use_kernel="triton"``) raises in both cases.
    """
    problem = unsupported(x, weight, bias, lora_A, lora_B)
    if problem is not None:
        if strict:
            raise problem[0](problem[2])
        warn_once(problem[1], problem[2])
        return None
    if not strict and is_disabled(x, lora_A, dropout_p):
        return None
    from .lora import lora_linear_checked

    try:
        return lora_linear_checked(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fallback=not strict)
    except Exception as exc:  # noqa: BLE001 - any compile or launch error: the torch path still works
        if strict:
            raise
        kernel_failed(x, lora_A, dropout_p, exc, "forward")
        return None
