r"""What the fused LoRA kernel supports, and the fallback that makes ``use_kernel="auto"`` never fail.

:func:`unsupported` names why the kernel cannot take given tensors (None when it can). With
``use_kernel="auto"`` the layer then runs the torch path and warns once per reason
(:func:`peftlab.kernels.lora_linear_or_none`); a Triton compile or launch error does the same, and disables the
kernel for that (device, dtype) for the rest of the process. ``use_kernel="triton"`` raises instead.

Importing this module never imports Triton.
"""

from __future__ import annotations

import os
import warnings

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_RANK = 128

_warned: set[str] = set()
_disabled: set[tuple] = set()


def unsupported(x, weight, bias, lora_A, lora_B) -> tuple[type[Exception], str, str] | None:
    """None if the fused kernel takes these tensors, else (error type, reason kind, message).

    Shapes: x (..., K), weight (N, K) frozen in x's dtype, bias (N,) or None, lora_A (R, K),
    lora_B (N, R) in fp32 or x's dtype, R ≤ 128, every tensor on one CUDA device (or on the CPU
    under ``TRITON_INTERPRET=1``).
    """
    tensors = [t for t in (x, weight, bias, lora_A, lora_B) if t is not None]
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        return ValueError, "device", f"lora_linear: all tensors must be on one device, got {devices}"
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return ValueError, "device", f"lora_linear: the kernel needs CUDA tensors, got {x.device}"
    if x.dtype not in DTYPES:
        return TypeError, "dtype", f"lora_linear: x must be fp32, fp16 or bf16, got {x.dtype}"
    if weight.dtype != x.dtype:
        return TypeError, "dtype", f"lora_linear: weight dtype {weight.dtype} must equal x dtype {x.dtype}"
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if t.dtype not in (torch.float32, x.dtype):
            return TypeError, "dtype", f"lora_linear: {name} must be fp32 or {x.dtype}, got {t.dtype}"
    K = x.shape[-1]
    if weight.ndim != 2 or weight.shape[1] != K:
        return ValueError, "shape", f"lora_linear: weight must be (N, {K}), got {tuple(weight.shape)}"
    N = weight.shape[0]
    R = lora_A.shape[0]
    if lora_A.ndim != 2 or lora_B.ndim != 2 or lora_A.shape != (R, K) or lora_B.shape != (N, R):
        return (
            ValueError,
            "shape",
            (
                f"lora_linear: need A (R, {K}) and B ({N}, R), got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}"
            ),
        )
    if R > MAX_RANK:
        return ValueError, "rank", f"lora_linear: rank {R} > {MAX_RANK} is not supported by the fused kernel"
    if bias is not None and bias.shape != (N,):
        return ValueError, "shape", f"lora_linear: bias must be ({N},), got {tuple(bias.shape)}"
    if x.numel() == 0 or N == 0 or K == 0 or R == 0:
        return (
            ValueError,
            "shape",
            f"lora_linear: empty operand (x {tuple(x.shape)}, W {tuple(weight.shape)}, r={R})",
        )
    if weight.requires_grad:
        return (
            ValueError,
            "weight",
            "lora_linear: the kernel never computes a weight gradient; W must be frozen",
        )
    return None


def supports(x, weight, bias, lora_A, lora_B) -> bool:
    """True when the fused kernel takes these tensors (see :func:`unsupported`)."""
    return unsupported(x, weight, bias, lora_A, lora_B) is None


def warn_once(kind: str, message: str) -> None:
    """One warning per kind of fallback for the life of the process."""
    if kind in _warned:
        return
    _warned.add(kind)
    warnings.warn(
        f"peftlab: the fused LoRA kernel is not used ({message}); running the torch path instead. "
        "Later cases of this kind fall back silently.",
        RuntimeWarning,
        stacklevel=4,
    )


def _key(x, lora_A, dropout_p: float) -> tuple:
    return (x.device.type, x.device.index, x.dtype, lora_A.dtype, dropout_p > 0)


def is_disabled(x, lora_A, dropout_p: float) -> bool:
    """Whether an earlier failure switched the kernel off for this (device, dtype, adapter dtype, dropout)."""
    return _key(x, lora_A, dropout_p) in _disabled


def kernel_failed(x, lora_A, dropout_p: float, exc: BaseException, where: str) -> None:
    """Disable the kernel for this (device, dtype, adapter dtype, dropout) and warn once."""
    _disabled.add(_key(x, lora_A, dropout_p))
    warn_once(f"error:{where}", f"Triton {where} failed: {type(exc).__name__}: {str(exc).strip()[:300]}")
