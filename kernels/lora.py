r"""Fused LoRA linear in Triton: y = x Wᵀ + b + s · (D(x) Aᵀ) Bᵀ, forward and backward.

Three jit kernels (equations and shapes in :mod:`peftlab.kernels.reference`):

* ``_thin_kernel``: out (M, R) = D(X) · Wt, the thin products x Aᵀ and dY B (R ≤ 128).
* ``_fused_kernel``: out (M, N) = X · Wt (+ bias) + s · (T · U) ⊙ D — the base GEMM with the LoRA
  term added in its epilogue, so the forward writes no full-size intermediate; the same kernel
  computes dX = dY W + s · (gb A) ⊙ mask in the backward.
* ``_da_kernel``: dA (R, K) = s · gbᵀ D(x), reducing over tokens, regenerating the dropout mask.

dB = s · dYᵀ xa reuses the saved (M, R) product (a thin GEMM left to the BLAS). The dropout
mask is never stored: every kernel regenerates keep(m, k) = rand(seed, m·K + k) ≥ p. W never
gets a gradient. Inputs in fp32, bf16 or fp16 with fp32 accumulation; the adapter weights may
be fp32 while x is half (they are cast to x's dtype for the tensor-core products).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (64, 128, 64, 4, 4),
            (128, 64, 64, 4, 4), (64, 64, 64, 4, 4),
        ]
    ]


@triton.jit
def _keep(seed, rows, cols, row_len, p):
    return tl.rand(seed, rows[:, None] * row_len + cols[None, :]) >= p


@triton.jit
def _thin_kernel(X, Wt, OUT, M, K, R, sxm, sxk, swk, swr, som, sor, p, seed,
                 HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rm[:, None] * sxm + rk[None, :] * sxk, mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        if HAS_DROPOUT:
            x = tl.where(_keep(seed, rm, rk, K, p), x / (1 - p), 0.0)
        w = tl.load(Wt + rk[:, None] * swk + rr[None, :] * swr, mask=(rk[:, None] < K) & (rr[None, :] < R), other=0.0)
        acc += tl.dot(x.to(w.dtype), w)
    tl.store(OUT + rm[:, None] * som + rr[None, :] * sor, acc, mask=(rm[:, None] < M) & (rr[None, :] < R))


@triton.autotune(configs=_configs(), key=["M", "N", "K", "R"])
@triton.jit
def _fused_kernel(X, Wt, BIAS, T, U, OUT, M, N, K, R, sxm, sxk, swk, swn, stm, str_, sur, sun, som, son,
                  scaling, p, seed, mask_row_len,
                  HAS_BIAS: tl.constexpr, MASK_EPILOGUE: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rm[:, None] * sxm + rk[None, :] * sxk, mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        w = tl.load(Wt + rk[:, None] * swk + rn[None, :] * swn, mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc += tl.dot(x, w)
    # epilogue: the LoRA term s · T U (T: (M, R) fp32, U: (R, N))
    rr = tl.arange(0, BLOCK_R)
    t = tl.load(T + rm[:, None] * stm + rr[None, :] * str_, mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
    u = tl.load(U + rr[:, None] * sur + rn[None, :] * sun, mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
    lora = tl.dot(t.to(tl.float32), u.to(tl.float32)) * scaling
    if MASK_EPILOGUE:
        lora = tl.where(_keep(seed, rm, rn, mask_row_len, p), lora / (1 - p), 0.0)
    acc += lora
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + rm[:, None] * som + rn[None, :] * son, acc.to(OUT.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _da_kernel(G, X, OUT, M, K, R, sgm, sgr, sxm, sxk, sor, sok, scaling, p, seed,
               HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        g = tl.load(G + rm[None, :] * sgm + rr[:, None] * sgr, mask=(rm[None, :] < M) & (rr[:, None] < R), other=0.0)
        x = tl.load(X + rm[:, None] * sxm + rk[None, :] * sxk, mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        if HAS_DROPOUT:
            x = tl.where(_keep(seed, rm, rk, K, p), x / (1 - p), 0.0)
        acc += tl.dot(g.to(tl.float32), x.to(tl.float32))
    tl.store(OUT + rr[:, None] * sor + rk[None, :] * sok, acc * scaling, mask=(rr[:, None] < R) & (rk[None, :] < K))


@triton.jit
def _mask_kernel(OUT, M, K, p, seed, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep(seed, rm, rk, K, p)
    tl.store(OUT + rm[:, None] * K + rk[None, :], tl.where(keep, 1.0 / (1 - p), 0.0),
             mask=(rm[:, None] < M) & (rk[None, :] < K))


# ---- host side ---------------------------------------------------------------------------------


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def thin(x: torch.Tensor, wt: torch.Tensor, p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """(M, R) fp32 = D(x) · wt for x (M, K) and wt (K, R)."""
    M, K = x.shape
    R = wt.shape[1]
    out = torch.empty(M, R, device=x.device, dtype=torch.float32)
    wt = wt.to(x.dtype) if x.dtype != torch.float32 else wt.float()
    _thin_kernel[(triton.cdiv(M, 32),)](x, wt, out, M, K, R, x.stride(0), x.stride(1), wt.stride(0), wt.stride(1),
                                         out.stride(0), out.stride(1), p, seed, HAS_DROPOUT=p > 0,
                                         BLOCK_M=32, BLOCK_K=32, BLOCK_R=_block_r(R))
    return out


def fused(x, wt, bias, t, u, scaling: float, out_dtype, p: float = 0.0, seed: int = 0, mask_epilogue: bool = False):
    """(M, N) = x · wt (+ bias) + s · (t · u) [⊙ D]; x (M, K), wt (K, N), t (M, R), u (R, N)."""
    M, K = x.shape
    N = wt.shape[1]
    R = t.shape[1]
    out = torch.empty(M, N, device=x.device, dtype=out_dtype)
    def grid(meta):
        return triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"])

    _fused_kernel[grid](
        x, wt, bias if bias is not None else out, t, u, out, M, N, K, R,
        x.stride(0), x.stride(1), wt.stride(0), wt.stride(1), t.stride(0), t.stride(1), u.stride(0), u.stride(1),
        out.stride(0), out.stride(1), scaling, p, seed, N,
        HAS_BIAS=bias is not None, MASK_EPILOGUE=mask_epilogue and p > 0, BLOCK_R=_block_r(R),
    )
    return out


def grad_a(gb: torch.Tensor, x: torch.Tensor, scaling: float, p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """(R, K) fp32 = s · gbᵀ D(x) for gb (M, R), x (M, K)."""
    M, K = x.shape
    R = gb.shape[1]
    out = torch.empty(R, K, device=x.device, dtype=torch.float32)
    _da_kernel[(triton.cdiv(K, 32),)](gb, x, out, M, K, R, gb.stride(0), gb.stride(1), x.stride(0), x.stride(1),
                                      out.stride(0), out.stride(1), scaling, p, seed, HAS_DROPOUT=p > 0,
                                      BLOCK_M=32, BLOCK_K=32, BLOCK_R=_block_r(R))
    return out


def dropout_mask(M: int, K: int, p: float, seed: int, device) -> torch.Tensor:
    """The (M, K) mask {0, 1/(1-p)} the kernels regenerate for ``seed`` (for tests and references)."""
    out = torch.empty(M, K, device=device, dtype=torch.float32)
    _mask_kernel[(triton.cdiv(M, 32), triton.cdiv(K, 32))](out, M, K, p, seed, BLOCK_M=32, BLOCK_K=32)
    return out


def _check(x, weight, bias, lora_A, lora_B) -> None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"lora_linear: x must be fp32, fp16 or bf16, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"lora_linear: weight dtype {weight.dtype} must equal x dtype {x.dtype}")
    K = x.shape[-1]
    if weight.ndim != 2 or weight.shape[1] != K:
        raise ValueError(f"lora_linear: weight must be (N, {K}), got {tuple(weight.shape)}")
    N = weight.shape[0]
    R = lora_A.shape[0]
    if lora_A.shape != (R, K) or lora_B.shape != (N, R):
        raise ValueError(f"lora_linear: need A (R, {K}) and B ({N}, R), got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
    if R > 128:
        raise ValueError(f"lora_linear: rank {R} > 128 is not supported by the fused kernel")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"lora_linear: bias must be ({N},), got {tuple(bias.shape)}")
    devices = {t.device for t in (x, weight, lora_A, lora_B) + ((bias,) if bias is not None else ())}
    if len(devices) != 1:
        raise ValueError(f"lora_linear: all tensors must be on one device, got {devices}")


class TritonLoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, p: float, seed: int):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xa = thin(x2, lora_A.t(), p, seed)  # (M, R) fp32
        b = lora_B.t()  # (R, N)
        y = fused(x2, weight.t(), bias, xa, b, scaling, x.dtype)
        ctx.save_for_backward(x2, weight, lora_A, lora_B, xa)
        ctx.scaling, ctx.p, ctx.seed, ctx.shape = scaling, p, seed, shape
        ctx.bias_needs_grad = bias is not None and bias.requires_grad
        return y.reshape(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x2, weight, lora_A, lora_B, xa = ctx.saved_tensors
        s, p, seed = ctx.scaling, ctx.p, ctx.seed
        g = grad_y.reshape(-1, grad_y.shape[-1])
        if g.stride(-1) != 1:
            g = g.contiguous()
        gb = thin(g, lora_B, 0.0, 0)  # (M, R) = dY B
        grad_x = grad_a_ = grad_b = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = fused(g, weight, None, gb, lora_A, s, x2.dtype, p, seed, mask_epilogue=True).reshape(ctx.shape)
        if ctx.needs_input_grad[3]:
            grad_a_ = grad_a(gb, x2, s, p, seed).to(lora_A.dtype)
        if ctx.needs_input_grad[4]:
            grad_b = (s * (g.t().float() @ xa)).to(lora_B.dtype)
        if ctx.bias_needs_grad:
            grad_bias = g.float().sum(0).to(weight.dtype)
        return grad_x, None, grad_bias, grad_a_, grad_b, None, None, None


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0, seed: int | None = None):
    """y = x Wᵀ + b + s · (D(x) Aᵀ) Bᵀ with the fused Triton kernels (differentiable in x, b, A, B).

    Shapes: x (..., K); weight (N, K) frozen, x's dtype; bias (N,) or None; lora_A (R, K) and
    lora_B (N, R), possibly fp32 over a half-precision x; returns (..., N) in x's dtype.
    """
    _check(x, weight, bias, lora_A, lora_B)
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if dropout_p > 0 else 0
    return TritonLoraLinear.apply(x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), seed)
