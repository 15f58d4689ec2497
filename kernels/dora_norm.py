r"""DoRA's weight norm ‖W + s·B A‖ per output unit, fused: one pass over W, never forming W + s·B A.

Shapes (peftlab's (d_out, d_in) convention; the DoRA paper's "column norm" of its (d_in, d_out) matrix
is this row norm): W (N, K) frozen base weight, A (R, K), B (N, R), s a float. Row i of the adapted
weight is V_i = W_i + s·B_i A (B_i the 1×R row i of B), so

    ‖V_i‖² = ‖W_i‖² + 2s·B_i (A W_iᵀ) + s²·B_i (A Aᵀ) B_iᵀ
           = ‖W_i‖²  +  2s·Σ_r B_ir C_ir  +  s²·Σ_r B_ir (B G)_ir

    with  C = W Aᵀ   (N, R)     the cross products (one thin GEMM over W)
          G = A Aᵀ   (R, R)     the Gram of A (R²·K FLOPs, A only)
          ‖W‖²_row   (N,)       accumulated from the same W tiles as C

    n_i = sqrt(max(‖V_i‖², 0))     (N,) fp32; the clamp only absorbs rounding (‖V_i‖² ≥ 0 exactly).

The fused kernel (:mod:`peftlab.kernels.dora_norm_triton`) reads every W tile once and accumulates
‖W‖²_row and C from it (W's bytes dominate: N·K elements against (N + K)·R for A and B); the epilogue
loads B's rows and G, forms the three terms and writes n (and ‖W‖²_row, which DoRA caches). The unfused
torch path it replaces (:func:`torch_row_norm`, what ``peftlab.methods.dora.lora_row_norm`` computes)
reads W twice (‖W‖² and W Aᵀ) and writes C and B G to memory; HF PEFT forms the dense W + s·B A.

Entry points (importing this module never imports Triton):

* :func:`dora_row_norm` (``use_kernel="auto" | "triton" | "torch"``): the norm, through the kernel when
  :func:`unsupported` allows it and Triton works, else the torch path: with ``"auto"`` a compile or
  launch error warns once and disables the kernel for that (device, dtype) (as :mod:`.support` does for
  the LoRA kernel), so it never fails a user; ``"triton"`` raises instead.
* :func:`dora_row_norm_or_none`: the kernel's result or None (the caller runs its own torch path).
* :func:`reference_dense` (fp64 ground truth: forms W + s·B A) and :func:`torch_row_norm` (the
  thin-product equation above in torch) for tests and benchmarks.

The norm is a constant in DoRA's backward (paper §4.3), so there is no backward here.
"""

from __future__ import annotations

import os
import warnings

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_RANK = 128

_warned: set[str] = set()
_disabled: set[tuple] = set()


def _f(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


@torch.no_grad()
def reference_dense(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """‖W + s·B A‖_row (N,) by forming the dense (N, K) matrix (HF PEFT's way); fp64 given fp64, else fp32."""
    w = _f(weight)
    return torch.linalg.vector_norm(w + scaling * (_f(lora_B) @ _f(lora_A)).to(w.dtype), dim=1)


@torch.no_grad()
def torch_row_norm(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    weight_norm_sq: torch.Tensor | None = None,
    return_wsq: bool = False,
):
    """The module's equation with torch ops (the unfused path): n (N,) fp32, or (n, ‖W‖²_row) with ``return_wsq``.

    W Aᵀ runs in W's dtype (fp32 accumulation) for a half-precision W, as the fused kernel does;
    ``weight_norm_sq`` (N,) fp32 skips the ‖W‖² pass (DoRA caches it per frozen weight).
    """
    if weight_norm_sq is None:
        wsq = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
        step = max(1, (1 << 24) // max(1, weight.shape[1]))  # no full fp32 copy of W
        for i in range(0, weight.shape[0], step):
            wsq[i : i + step] = _f(weight[i : i + step]).pow(2).sum(1)
    else:
        wsq = weight_norm_sq
    a, b = lora_A.detach().float(), lora_B.detach().float()
    if a.shape[0] == 0:
        norm = wsq.clamp_min(0).sqrt()
    else:
        if weight.dtype in (torch.float32, torch.float64):
            cross = weight.float() @ a.t()  # C = W Aᵀ (N, R)
        else:
            cross = (weight @ a.t().to(weight.dtype)).float()
        gram = a @ a.t()  # G (R, R)
        inner = torch.addmm(cross, b, gram, beta=2.0 * scaling, alpha=scaling * scaling)  # 2s·C + s²·B G
        norm = (wsq + (b * inner).sum(1)).clamp_min_(0).sqrt_()
    return (norm, wsq) if return_wsq else norm


def unsupported(weight, lora_A, lora_B) -> tuple[type[Exception], str, str] | None:
    """None when the fused kernel takes these tensors, else (error type, reason kind, message).

    Needs: W (N, K) fp32/fp16/bf16, A (R, K) and B (N, R) in fp32 or W's dtype, 1 ≤ R ≤ 128, N, K ≥ 1,
    all on one CUDA device (or the CPU under ``TRITON_INTERPRET=1``).
    """
    devices = {t.device for t in (weight, lora_A, lora_B)}
    if len(devices) != 1:
        return ValueError, "device", f"dora_row_norm: all tensors must be on one device, got {devices}"
    if not weight.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return ValueError, "device", f"dora_row_norm: the kernel needs CUDA tensors, got {weight.device}"
    if weight.dtype not in DTYPES:
        return TypeError, "dtype", f"dora_row_norm: W must be fp32, fp16 or bf16, got {weight.dtype}"
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if t.dtype not in (torch.float32, weight.dtype):
            return TypeError, "dtype", f"dora_row_norm: {name} must be fp32 or {weight.dtype}, got {t.dtype}"
    if weight.ndim != 2 or lora_A.ndim != 2 or lora_B.ndim != 2:
        return ValueError, "shape", "dora_row_norm: W, A and B must be 2-D"
    N, K = weight.shape
    R = lora_A.shape[0]
    if lora_A.shape != (R, K) or lora_B.shape != (N, R):
        return (ValueError, "shape",
                f"dora_row_norm: need A (R, {K}) and B ({N}, R), got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
    if R > MAX_RANK:
        return ValueError, "rank", f"dora_row_norm: rank {R} > {MAX_RANK} is not supported by the fused kernel"
    if N == 0 or K == 0 or R == 0:
        return ValueError, "shape", f"dora_row_norm: empty operand (W {tuple(weight.shape)}, r={R})"
    return None


def _warn_once(kind: str, message: str) -> None:
    if kind in _warned:
        return
    _warned.add(kind)
    warnings.warn(
        f"peftlab: the fused DoRA norm kernel is not used ({message}); running the torch path instead. "
        "Later cases of this kind fall back silently.",
        RuntimeWarning,
        stacklevel=4,
    )


def _key(weight) -> tuple:
    return (weight.device.type, weight.device.index, weight.dtype)


def dora_row_norm_or_none(weight, lora_A, lora_B, scaling: float, return_wsq: bool = False, strict: bool = False):
    """The fused kernel's n (N,) fp32 (or (n, ‖W‖²_row)), or None where the caller must run the torch path.

    None, with one warning per reason, when :func:`unsupported` names a reason, Triton does not import,
    or compiling/launching fails (which also disables the kernel for that device and dtype).
    ``strict=True`` raises in every one of those cases instead.
    """
    problem = unsupported(weight, lora_A, lora_B)
    if problem is not None:
        if strict:
            raise problem[0](problem[2])
        _warn_once(problem[1], problem[2])
        return None
    if not strict and _key(weight) in _disabled:
        return None
    try:
        from .dora_norm_triton import dora_norm

        norm, wsq = dora_norm(weight, lora_A, lora_B, scaling)
    except Exception as exc:  # noqa: BLE001 - ImportError, compile or launch error: torch still works
        if strict:
            raise
        _disabled.add(_key(weight))
        _warn_once(f"error:{type(exc).__name__}", f"Triton failed: {type(exc).__name__}: {str(exc).strip()[:300]}")
        return None
    return (norm, wsq) if return_wsq else norm


def dora_row_norm(weight, lora_A, lora_B, scaling: float, use_kernel: str = "auto", return_wsq: bool = False):
    """n = ‖W + s·B A‖_row (N,) fp32 (module docstring); ``(n, ‖W‖²_row)`` with ``return_wsq``.

    ``use_kernel``: ``"auto"`` (the fused kernel where it works, else torch, never an error from the
    kernel), ``"triton"`` (the kernel or an error), ``"torch"`` (:func:`torch_row_norm`).
    """
    if use_kernel not in ("auto", "triton", "torch"):
        raise ValueError(f"use_kernel must be 'auto', 'triton' or 'torch', got {use_kernel!r}")
    if use_kernel != "torch":
        out = dora_row_norm_or_none(weight, lora_A, lora_B, scaling, return_wsq, strict=use_kernel == "triton")
        if out is not None:
            return out
    return torch_row_norm(weight, lora_A, lora_B, scaling, return_wsq=return_wsq)
