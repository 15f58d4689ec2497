r"""Fused LoRA linear in Triton: y = x Wᵀ + b + s · (D(x) Aᵀ) Bᵀ, forward and backward.

Four jit kernels (equations and shapes in :mod:`peftlab.kernels.reference`):

* ``_thin_kernel``: out (M, R) = D(X) · Wt, the thin products x Aᵀ and dY B (R ≤ 128).
* ``_fused_kernel``: out (M, N) = s · (T · U) [⊙ D] + X · Wt (+ bias) — the LoRA term goes into the
  accumulator first (R/16 rank-16 steps; the dropout mask multiplies it alone), then the base GEMM
  accumulates on top, so the forward writes no full-size intermediate and holds one accumulator;
  the same kernel computes dX = dY W + s · (gb A) ⊙ mask in the backward.
* ``_da_kernel``: dA (R, K) = s · gbᵀ D(x), reducing over tokens, regenerating the dropout mask.
* ``_mask_kernel``: the (M, K) mask itself (tests, and the torch fallback of a failed backward).

dB = s · dYᵀ xa reuses the saved (M, R) product (a thin GEMM left to the BLAS). The dropout
mask is never stored: every kernel regenerates keep(m, k) = rand(seed, m·K + k) ≥ p. W never
gets a gradient. Inputs in fp32, bf16 or fp16 with fp32 accumulation; the adapter weights may
be fp32 while x is half (they are cast to x's dtype for the tensor-core products).

Robustness: offsets are int64 where M·K can pass 2³¹ (see the note above the kernels); the
autotune key buckets M to the next power of two (:func:`m_bucket`); :func:`prune_configs` keeps
the configs that fit the device's shared memory and do not spill. Every launch is declared in
``AOT_LAUNCHES`` for :mod:`peftlab.kernels.aot`. A failed backward kernel finishes the step in
torch when the layer asked for the fallback (``use_kernel="auto"``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .support import kernel_failed, unsupported

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


#: (BLOCK_M, BLOCK_N, num_warps, num_stages) of the fused GEMM; BLOCK_K = 128 bytes of a row (64 half
#: or 32 fp32 elements), so a stage holds the same bytes in every dtype.
TILES = [(128, 128, 8, 3), (128, 256, 8, 3), (256, 128, 8, 3), (64, 128, 4, 4), (64, 64, 4, 4)]
# (128, 64, 4, 4) left out: its dX backward spills 16 bytes on sm_80 (benchmarks/results/kernels/aot_resources.md)
#: Ranks the fused kernel's epilogue adds per step (it loops over R in chunks of this many).
FUSED_BLOCK_R = 16
#: Opt-in shared memory per block (bytes) by compute capability; targets the AOT test checks.
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def _configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, w, s in TILES
        for bk in (64, 32)
    ]


def shared_estimate(meta: dict, num_stages: int, elem_bytes: int) -> int:
    """Upper bound on the fused kernel's shared memory: the pipelined X and W tiles, ``num_stages`` deep."""
    return num_stages * (meta["BLOCK_M"] + meta["BLOCK_N"]) * meta["BLOCK_K"] * elem_bytes


def prune_configs(configs, named_args, max_shared: int | None = None, **kwargs):
    """The autotune configs that suit x's dtype (128-byte K tiles) and fit the device's shared memory.

    ``PEFTLAB_AUTOTUNE=0`` in the environment keeps one config (the smallest tile): no autotuning.
    """
    if INTERPRET:
        return configs
    elem = named_args["X"].element_size()
    runtime = max_shared is None  # the autotuner's call (the AOT table passes the target's limit)
    if runtime:
        device = named_args["X"].device
        props = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
        max_shared = props["max_shared_mem"]
    # the dropout mask's Philox rounds beside the accumulator spill past 32 accumulator values a thread
    # (every larger tile does on sm_90: aot_resources.md), so the dropout backward keeps the small tiles;
    # so do fp32 products as tf32x3 (IEEE: three MMAs and the split operands; 64 values spill on sm_80)
    acc_limit = 32 if kwargs.get("MASK_EPILOGUE") or kwargs.get("IEEE") else 128
    kept = [
        c for c in configs
        if c.kwargs["BLOCK_K"] * elem == 128
        and shared_estimate(c.kwargs, c.num_stages, elem) <= max_shared
        and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= acc_limit * 32 * c.num_warps
    ]
    kept = kept or [min(configs, key=lambda c: shared_estimate(c.kwargs, c.num_stages, elem))]
    if runtime and os.environ.get("PEFTLAB_AUTOTUNE") == "0":
        # one config, the smallest tile (tests on a GPU: each autotuned config costs a compile, ~1 s)
        return [min(kept, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    return kept


@triton.jit
def _keep(seed, rows, cols, row_len, p):
    # int64 offsets: rows · row_len passes 2³¹ once M·K does (the values below 2³¹ are unchanged)
    return tl.rand(seed, rows.to(tl.int64)[:, None] * row_len + cols[None, :]) >= p


# Offsets: every tile starts at a base pointer advanced by an int64 scalar (row0 · stride), the
# in-tile offsets stay int32 (< BLOCK · stride), and the K loop advances the pointers themselves,
# so no int32 product ever reaches M·K (which passes 2³¹ at, e.g., 8192 tokens × 262144 columns).


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    """acc + a·b; with IEEE, fp32 operands as tf32x3 (fp32 accuracy) instead of TF32 (see :func:`ieee`)."""
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _thin_kernel(X, Wt, OUT, M, K, R, sxm, sxk, swk, swr, som, sor, p, seed,
                 HAS_DROPOUT: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    row0 = tl.program_id(0) * BLOCK_M
    lm = tl.arange(0, BLOCK_M)
    rm = row0 + lm
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = X + row0.to(tl.int64) * sxm + (lm[:, None] * sxm + rk[None, :] * sxk)
    w_ptrs = Wt + rk[:, None] * swk + rr[None, :] * swr
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_in = rk < K - k0
        x = tl.load(x_ptrs, mask=(rm[:, None] < M) & k_in[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(_keep(seed, rm, k0 + rk, K, p), x / (1 - p), 0.0)
        w = tl.load(w_ptrs, mask=k_in[:, None] & (rr[None, :] < R), other=0.0)
        acc = _mma(x.to(w.dtype), w, acc, IEEE)
        x_ptrs += BLOCK_K * sxk
        w_ptrs += BLOCK_K * swk
    out_ptrs = OUT + row0.to(tl.int64) * som + (lm[:, None] * som + rr[None, :] * sor)
    tl.store(out_ptrs, acc, mask=(rm[:, None] < M) & (rr[None, :] < R))


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "R", "swk", "HAS_BIAS", "MASK_EPILOGUE", "IEEE"],
                 prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def _fused_kernel(X, Wt, BIAS, T, U, OUT, M, N, K, R, sxm, sxk, swk, swn, stm, str_, sur, sun, som, son,
                  scaling, p, seed, mask_row_len, M_BUCKET,
                  HAS_BIAS: tl.constexpr, MASK_EPILOGUE: tl.constexpr, IEEE: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # M_BUCKET (M rounded up to a power of two) is only the autotune key: one tuning per bucket,
    # not one per batch length
    row0 = tl.program_id(0) * BLOCK_M
    col0 = tl.program_id(1) * BLOCK_N
    lm = tl.arange(0, BLOCK_M)
    ln = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rm = row0 + lm
    rn = col0 + ln
    # the LoRA term s · T U first (T: (M, R) fp32, U: (R, N)), BLOCK_R ranks at a time, so that the
    # dropout mask (which multiplies this term alone) applies before the base GEMM accumulates into
    # the same registers: one (BLOCK_M, BLOCK_N) accumulator, where a second one would spill
    rr = tl.arange(0, BLOCK_R)
    t_ptrs = T + row0.to(tl.int64) * stm + (lm[:, None] * stm + rr[None, :] * str_)
    u_ptrs = U + col0.to(tl.int64) * sun + (rr[:, None] * sur + ln[None, :] * sun)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r_in = rr < R - r0
        t = tl.load(t_ptrs, mask=(rm[:, None] < M) & r_in[None, :], other=0.0).to(tl.float32) * scaling
        u = tl.load(u_ptrs, mask=r_in[:, None] & (rn[None, :] < N), other=0.0).to(tl.float32)
        acc = _mma(t, u, acc, IEEE)
        t_ptrs += BLOCK_R * str_
        u_ptrs += BLOCK_R * sur
    if MASK_EPILOGUE:
        acc = tl.where(_keep(seed, rm, rn, mask_row_len, p), acc / (1 - p), 0.0)
    # the base GEMM X · Wt, into the same accumulator
    x_ptrs = X + row0.to(tl.int64) * sxm + (lm[:, None] * sxm + rk[None, :] * sxk)
    w_ptrs = Wt + col0.to(tl.int64) * swn + (rk[:, None] * swk + ln[None, :] * swn)
    for k0 in range(0, K, BLOCK_K):
        k_in = rk < K - k0
        x = tl.load(x_ptrs, mask=(rm[:, None] < M) & k_in[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_in[:, None] & (rn[None, :] < N), other=0.0)
        acc = _mma(x, w, acc, IEEE)
        x_ptrs += BLOCK_K * sxk
        w_ptrs += BLOCK_K * swk
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    out_ptrs = OUT + row0.to(tl.int64) * som + col0.to(tl.int64) * son + (lm[:, None] * som + ln[None, :] * son)
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _da_kernel(G, X, OUT, M, K, R, sgm, sgr, sxm, sxk, sor, sok, scaling, p, seed,
               HAS_DROPOUT: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_R: tl.constexpr):
    col0 = tl.program_id(0) * BLOCK_K
    lk = tl.arange(0, BLOCK_K)
    rk = col0 + lk
    rr = tl.arange(0, BLOCK_R)
    lm = tl.arange(0, BLOCK_M)
    g_ptrs = G + lm[None, :] * sgm + rr[:, None] * sgr
    x_ptrs = X + col0.to(tl.int64) * sxk + (lm[:, None] * sxm + lk[None, :] * sxk)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        m_in = lm < M - m0
        g = tl.load(g_ptrs, mask=m_in[None, :] & (rr[:, None] < R), other=0.0)
        x = tl.load(x_ptrs, mask=m_in[:, None] & (rk[None, :] < K), other=0.0)
        if HAS_DROPOUT:
            x = tl.where(_keep(seed, m0 + lm, rk, K, p), x / (1 - p), 0.0)
        acc = _mma(g.to(tl.float32), x.to(tl.float32), acc, IEEE)
        g_ptrs += BLOCK_M * sgm
        x_ptrs += BLOCK_M * sxm
    out_ptrs = OUT + col0.to(tl.int64) * sok + (rr[:, None] * sor + lk[None, :] * sok)
    tl.store(out_ptrs, acc * scaling, mask=(rr[:, None] < R) & (rk[None, :] < K))


@triton.jit
def _mask_kernel(OUT, M, K, p, seed, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    row0 = tl.program_id(0) * BLOCK_M
    lm = tl.arange(0, BLOCK_M)
    rm = row0 + lm
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep(seed, rm, rk, K, p)
    out_ptrs = OUT + row0.to(tl.int64) * K + (lm[:, None] * K + rk[None, :])
    tl.store(out_ptrs, tl.where(keep, 1.0 / (1 - p), 0.0), mask=(rm[:, None] < M) & (rk[None, :] < K))


# ---- host side ---------------------------------------------------------------------------------


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _thin_warps(block_r: int, dropout: bool) -> int:
    """The thin kernel's warps: 8 for the 128-rank tile with dropout (4 spill 16 bytes in fp16 on sm_90),
    else 4 (8 spill 8 bytes without dropout in fp32 on sm_90); aot_resources.md has every case."""
    return 8 if block_r >= 128 and dropout else 4


def ieee(x: torch.Tensor) -> bool:
    """fp32 products to fp32 accuracy (tf32x3) for fp32 activations, unless torch allows TF32.

    ``tl.dot`` on fp32 operands rounds them to TF32 (10-bit mantissa) by default: 1e-3 relative
    error, where torch's fp32 matmul (``torch.get_float32_matmul_precision() == "highest"``) is exact
    to fp32. Half-precision activations keep plain TF32 for the fp32 LoRA term (their output is
    rounded to 8 or 11 bits anyway).
    """
    return x.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"


def m_bucket(m: int) -> int:
    """The autotune key for the token count: M rounded up to a power of two (≥ 16).

    Length-grouped batches change M on nearly every step; keyed on M itself, the autotuner would
    benchmark all configs again each time. Within a bucket the best tile differs little.
    """
    return max(16, triton.next_power_of_2(m))


def thin(x: torch.Tensor, wt: torch.Tensor, p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """(M, R) fp32 = D(x) · wt for x (M, K) and wt (K, R)."""
    M, K = x.shape
    R = wt.shape[1]
    out = torch.empty(M, R, device=x.device, dtype=torch.float32)
    wt = wt.to(x.dtype) if x.dtype != torch.float32 else wt.float()
    _thin_kernel[(triton.cdiv(M, 32),)](x, wt, out, M, K, R, x.stride(0), x.stride(1), wt.stride(0), wt.stride(1),
                                         out.stride(0), out.stride(1), p, seed, HAS_DROPOUT=p > 0, IEEE=ieee(x),
                                         BLOCK_M=32, BLOCK_K=32, BLOCK_R=_block_r(R), num_warps=_thin_warps(_block_r(R), p > 0))
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
        out.stride(0), out.stride(1), scaling, p, seed, N, m_bucket(M),
        HAS_BIAS=bias is not None, MASK_EPILOGUE=mask_epilogue and p > 0, IEEE=ieee(x), BLOCK_R=FUSED_BLOCK_R,
    )
    return out


def grad_a(gb: torch.Tensor, x: torch.Tensor, scaling: float, p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """(R, K) fp32 = s · gbᵀ D(x) for gb (M, R), x (M, K)."""
    M, K = x.shape
    R = gb.shape[1]
    out = torch.empty(R, K, device=x.device, dtype=torch.float32)
    _da_kernel[(triton.cdiv(K, 32),)](gb, x, out, M, K, R, gb.stride(0), gb.stride(1), x.stride(0), x.stride(1),
                                      out.stride(0), out.stride(1), scaling, p, seed, HAS_DROPOUT=p > 0,
                                      IEEE=ieee(x), BLOCK_M=32, BLOCK_K=32, BLOCK_R=_block_r(R))
    return out


def dropout_mask(M: int, K: int, p: float, seed: int, device) -> torch.Tensor:
    """The (M, K) mask {0, 1/(1-p)} the kernels regenerate for ``seed`` (for tests and references)."""
    out = torch.empty(M, K, device=device, dtype=torch.float32)
    _mask_kernel[(triton.cdiv(M, 32), triton.cdiv(K, 32))](out, M, K, p, seed, BLOCK_M=32, BLOCK_K=32)
    return out


def _check(x, weight, bias, lora_A, lora_B) -> None:
    problem = unsupported(x, weight, bias, lora_A, lora_B)
    if problem is not None:
        raise problem[0](problem[2])


def _torch_grads(g, x2, weight, lora_A, lora_B, xa, s, p, seed, need):
    """dX, dA, dB in torch (fp32 math) when a backward kernel fails to compile or launch."""
    mask = dropout_mask(*x2.shape, p, seed, x2.device) if p > 0 else None  # the forward's mask
    gb = s * (g.float() @ lora_B.float())  # (M, R)
    grad_x = grad_a_ = grad_b = None
    if need[0]:
        lora_dx = gb @ lora_A.float()
        if mask is not None:
            lora_dx = lora_dx * mask
        grad_x = (g @ weight).float().add_(lora_dx).to(x2.dtype)
    if need[3]:
        xd = x2.float() * mask if mask is not None else x2.float()
        grad_a_ = (gb.t() @ xd).to(lora_A.dtype)
    if need[4]:
        grad_b = (s * (g.t().float() @ xa)).to(lora_B.dtype)
    return grad_x, grad_a_, grad_b


def _dense_grads(g, x2, weight, lora_A, lora_B, xa, s, need):
    """dX, dA, dB without dropout, in the vendor GEMMs (cuBLAS): nothing here needs a regenerated mask.

    The H200 measurement (benchmarks/results/gpu/2026-11-26_NVIDIA-H200) had the Triton backward at
    1.2x HF PEFT's: its dX GEMM trails cuBLAS, and dA's reduction over M ran in one program per K tile.
    Here, in the activation dtype with fp32 accumulation (the products autocast runs):
    gb = dY B (M, R); dX = dY W + s·gb A (one GEMM, then one rank-R update in place);
    dA = s·gbᵀ X; dB = s·dYᵀ xa.
    """
    dt = x2.dtype
    gb = g @ lora_B.to(dt)
    grad_x = grad_a_ = grad_b = None
    if need[0]:
        grad_x = (g @ weight).addmm_(gb, lora_A.to(dt), alpha=s)
    if need[3]:
        grad_a_ = (gb.t() @ x2).to(lora_A.dtype).mul_(s)
    if need[4]:
        grad_b = (g.t() @ xa.to(dt)).to(lora_B.dtype).mul_(s)
    return grad_x, grad_a_, grad_b


class TritonLoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, p: float, seed: int, fallback: bool,
                kernel_backward: bool = False):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xa = thin(x2, lora_A.t(), p, seed)  # (M, R) fp32
        b = lora_B.t()  # (R, N)
        y = fused(x2, weight.t(), bias, xa, b, scaling, x.dtype)
        ctx.save_for_backward(x2, weight, lora_A, lora_B, xa)
        ctx.scaling, ctx.p, ctx.seed, ctx.shape, ctx.fallback = scaling, p, seed, shape, fallback
        ctx.kernel_backward = kernel_backward
        ctx.bias_needs_grad = bias is not None and bias.requires_grad
        ctx.bias_dtype = bias.dtype if bias is not None else None  # fp32 under autocast: its grad stays fp32
        return y.reshape(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x2, weight, lora_A, lora_B, xa = ctx.saved_tensors
        s, p, seed = ctx.scaling, ctx.p, ctx.seed
        g = grad_y.reshape(-1, grad_y.shape[-1])
        if g.stride(-1) != 1:
            g = g.contiguous()
        grad_x = grad_a_ = grad_b = grad_bias = None
        try:
            if p > 0 or ctx.kernel_backward:  # the kernels regenerate the dropout mask in-register
                grad_x, grad_a_, grad_b = _kernel_grads(ctx, g, x2, weight, lora_A, lora_B, xa)
            else:
                grad_x, grad_a_, grad_b = _dense_grads(g, x2, weight, lora_A, lora_B, xa, s, ctx.needs_input_grad)
        except Exception as exc:  # noqa: BLE001 - compile/launch error: finish this step in torch
            if not ctx.fallback:
                raise
            kernel_failed(x2, lora_A, p, exc, "backward")
            grad_x, grad_a_, grad_b = _torch_grads(g, x2, weight, lora_A, lora_B, xa, s, p, seed, ctx.needs_input_grad)
        if grad_x is not None:
            grad_x = grad_x.reshape(ctx.shape)
        if ctx.bias_needs_grad:
            grad_bias = g.float().sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, grad_a_, grad_b, None, None, None, None, None


def _kernel_grads(ctx, g, x2, weight, lora_A, lora_B, xa):
    """dX, dA, dB with the Triton kernels (dropout: the mask is regenerated from the forward's seed)."""
    s, p, seed = ctx.scaling, ctx.p, ctx.seed
    grad_x = grad_a_ = grad_b = None
    gb = thin(g, lora_B, 0.0, 0)  # (M, R) = dY B
    if ctx.needs_input_grad[0]:
        grad_x = fused(g, weight, None, gb, lora_A, s, x2.dtype, p, seed, mask_epilogue=True)
    if ctx.needs_input_grad[3]:
        grad_a_ = grad_a(gb, x2, s, p, seed).to(lora_A.dtype)
    if ctx.needs_input_grad[4]:  # dB = s·dYᵀ xa needs no mask (xa already has it)
        grad_b = (g.t() @ xa.to(g.dtype)).to(lora_B.dtype).mul_(s)
    return grad_x, grad_a_, grad_b


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0, seed: int | None = None,
                fallback: bool = False, kernel_backward: bool = False):
    """y = x Wᵀ + b + s · (D(x) Aᵀ) Bᵀ with the fused Triton kernels (differentiable in x, b, A, B).

    Shapes: x (..., K); weight (N, K) frozen, x's dtype; bias (N,) or None; lora_A (R, K) and
    lora_B (N, R), possibly fp32 over a half-precision x; returns (..., N) in x's dtype.

    Backward: with dropout, the Triton kernels (they regenerate the mask from ``seed``); without,
    the vendor GEMMs (:func:`_dense_grads`). ``kernel_backward=True`` forces the kernels (benchmarks).
    """
    _check(x, weight, bias, lora_A, lora_B)
    return lora_linear_checked(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fallback, kernel_backward)


def lora_linear_checked(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0,
                        seed: int | None = None, fallback: bool = False, kernel_backward: bool = False):
    """:func:`lora_linear` for tensors :func:`~peftlab.kernels.support.unsupported` has already passed
    (the layer's hot path checks once, not twice: ~15 µs of host time per call)."""
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if dropout_p > 0 else 0
    return TritonLoraLinear.apply(x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), seed, fallback,
                                  bool(kernel_backward))


# ---- ahead-of-time compilation (peftlab.kernels.aot): how the host code above launches each kernel ----


def _aot_prune(configs, dtype: str, max_shared: int, **constants):
    elem = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return prune_configs(configs, {"X": torch.empty(0, dtype=elem)}, max_shared=max_shared, **constants)


def _aot_launches():
    from .aot import IS_FP32, Launch

    def rank_tiles(dropout=False):
        return [({"BLOCK_M": 32, "BLOCK_K": 32, "BLOCK_R": br}, _thin_warps(br, dropout), 3) for br in (16, 32, 64, 128)]

    floats = {"scaling": "fp32", "p": "fp32"}
    fused_types = {"X": "*{dtype}", "Wt": "*{dtype}", "BIAS": "*{dtype}", "T": "*fp32", "U": "*fp32",
                   "OUT": "*{dtype}", **floats}
    fused = {"kernel": _fused_kernel, "types": fused_types, "prune": _aot_prune, "tensor_cores": "gemm"}
    thin_types = {"X": "*{dtype}", "Wt": "*{dtype}", "OUT": "*fp32", "p": "fp32"}
    da_types = {"G": "*fp32", "X": "*{dtype}", "OUT": "*fp32", **floats}
    launches = [
        # y = x Wᵀ + b + s·xa Bᵀ: fused(x, weight.t(), bias, xa, lora_B.t())
        Launch("lora.fused/forward", constants={"HAS_BIAS": True, "MASK_EPILOGUE": False, "IEEE": IS_FP32, "BLOCK_R": FUSED_BLOCK_R,
               "sxk": 1, "swk": 1, "str_": 1, "sur": 1, "son": 1}, **fused),
        # dX = dY W + s·(gb A) [⊙ mask]: fused(g, weight, None, gb, lora_A)
        Launch("lora.fused/backward", constants={"HAS_BIAS": False, "MASK_EPILOGUE": False, "IEEE": IS_FP32, "BLOCK_R": FUSED_BLOCK_R,
               "sxk": 1, "swn": 1, "str_": 1, "sun": 1, "son": 1}, **fused),
        Launch("lora.fused/backward-dropout", constants={"HAS_BIAS": False, "MASK_EPILOGUE": True, "IEEE": IS_FP32,
               "BLOCK_R": FUSED_BLOCK_R, "sxk": 1, "swn": 1, "str_": 1, "sun": 1, "son": 1}, **fused),
    ]
    for dropout in (False, True):
        tag = "-dropout" if dropout else ""
        launches += [
            # xa = D(x) Aᵀ: thin(x, lora_A.t()); gb = dY B: thin(g, lora_B)
            Launch(f"lora.thin/forward{tag}", _thin_kernel, thin_types,
                   {"HAS_DROPOUT": dropout, "IEEE": IS_FP32, "sxk": 1, "swk": 1, "sor": 1}, rank_tiles(dropout), tensor_cores="mma"),
            # dA = s·gbᵀ D(x)
            Launch(f"lora.da{tag}", _da_kernel, da_types, {"HAS_DROPOUT": dropout, "IEEE": IS_FP32, "sgr": 1, "sxk": 1, "sok": 1},
                   rank_tiles(), tensor_cores="mma"),
        ]
    launches += [
        Launch("lora.thin/backward", _thin_kernel, thin_types, {"HAS_DROPOUT": False, "IEEE": IS_FP32, "sxk": 1, "swr": 1, "sor": 1},
               rank_tiles(), tensor_cores="mma"),
        Launch("lora.mask", _mask_kernel, {"OUT": "*fp32", "p": "fp32"}, {},
               [({"BLOCK_M": 32, "BLOCK_K": 32}, 4, 3)], dtypes=("fp32",)),
    ]
    return launches


AOT_LAUNCHES = _aot_launches()
