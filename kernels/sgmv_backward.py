r"""SGMV backward (Triton): training with a different LoRA adapter per row, every adapter in one launch.

The forward is :mod:`peftlab.kernels.sgmv`'s shrink/expand pair over sorted segments (same tables,
same segment metadata): for sorted position i of segment g, adapter a = seg_adapter[g], token
m = perm[i],

    t[i] = x_m A_aᵀ                           t: (M, R) fp32, sorted order (saved by the forward)
    y_m  = base_m + s_a · t[i, :r_a] B_aᵀ      A_tab[a] = A_a (R, K), B_tab[a] = B_aᵀ (R, N), zero past r_a

With G = dY (M, N) and the rows of segment a written X_a, G_a, T_a (sorted), the backward is

    dT_a = G_a B_a                 (|a|, R)   shrink of dY with B_tab:   ``sgmv_shrink(dY, B_tab)``
    dX_a = s_a · dT_a A_a          (|a|, K)   expand of dT with A_tab:   ``sgmv_expand(0, dT, A_tab, scales)``
    dA_a = s_a · dT_aᵀ X_a         (r_a, K)   grouped reduction:          :func:`sgmv_weight_grad` (dT, X)
    dB_a = s_a · T_aᵀ G_a          (r_a, N)   grouped reduction:          :func:`sgmv_weight_grad` (T, dY)

(dB_a is the gradient of the table row B_tab[a] = B_aᵀ.) The dX path reuses the forward kernels: the
shrink of dY reads B_tab exactly as the forward shrink reads A_tab (both (n, R, ·) with the reduced
dimension last), and the expand of dT writes dX with A_tab in B_tab's place. Only the two weight
gradients need a new kernel, ``_sgmv_wgrad_kernel``: one program per (adapter, K tile, rank tile) that
walks every segment of its adapter and accumulates ``T[i]ᵀ X[perm[i]]`` over the segment's rows in fp32.
It writes every entry of its adapter's gradient, zeros past r_a and for adapters with no rows (an
adapter that appears in no segment, or only in empty ones, gets a zero gradient), so the output is never
zero-filled beforehand and the reduction has no atomics: the result is deterministic, and an adapter may
appear in several segments. The scales are constants (no gradient). Pure-torch reference:
:func:`peftlab.kernels.reference.sgmv_backward`.

:func:`sgmv_lora` is the autograd op: ``y = base + Σ_a s_a (x A_aᵀ) B_aᵀ`` per segment, with this backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from . import sgmv
from .sgmv import INTERPRET, _check_tables, _ieee, _int32, block_r

#: Rows reduced per step, K (or N) tile of the weight gradient.
WGRAD_BLOCK_M = 16 if INTERPRET else 32
WGRAD_BLOCK_K = 32 if INTERPRET else 64


@triton.jit
def _sgmv_wgrad_kernel(T, X, OUT, PERM, SEG_START, SEG_LEN, SEG_ADAPTER, RANKS, SCALES, S, K, R,
                       stm, str_, sxm, sxk, son, sor, sok,
                       HAS_PERM: tl.constexpr, HAS_RANKS: tl.constexpr, HAS_SCALES: tl.constexpr,
                       IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    adapter = tl.program_id(0)
    kb = tl.program_id(1)
    rb = tl.program_id(2)
    rank = R
    if HAS_RANKS:
        rank = tl.load(RANKS + adapter)
    rr = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    ck = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    r_ok = rr < rank
    k_ok = ck < K
    lm = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    n_seg = tl.where(rb * BLOCK_R < rank, S, 0)  # a rank tile past r_a reads nothing: it writes zeros
    for g in range(0, n_seg):
        length = tl.load(SEG_LEN + g)
        length = tl.where(tl.load(SEG_ADAPTER + g) == adapter, length, 0)  # other adapters' segments: no rows
        start = tl.load(SEG_START + g)
        for m0 in range(0, length, BLOCK_M):
            m_ok = lm < length - m0
            pos = start + m0 + lm
            rows = pos
            if HAS_PERM:
                rows = tl.load(PERM + pos, mask=m_ok, other=0)
            t = tl.load(T + pos.to(tl.int64)[None, :] * stm + rr[:, None] * str_,
                        mask=r_ok[:, None] & m_ok[None, :], other=0.0)  # (BLOCK_R, BLOCK_M): Tᵀ
            x = tl.load(X + rows.to(tl.int64)[:, None] * sxm + ck[None, :] * sxk,
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
            if IEEE:
                acc += tl.dot(t.to(x.dtype), x, input_precision="tf32x3")
            else:
                acc += tl.dot(t.to(x.dtype), x)
    if HAS_SCALES:
        acc = acc * tl.load(SCALES + adapter)
    out_ptrs = OUT + adapter.to(tl.int64) * son + rr[:, None] * sor + ck[None, :] * sok
    tl.store(out_ptrs, acc, mask=(rr < R)[:, None] & k_ok[None, :])  # zeros at and past r_a


def sgmv_weight_grad(t: torch.Tensor, x: torch.Tensor, seg_start: torch.Tensor, seg_len: torch.Tensor,
                     seg_adapter: torch.Tensor, n_adapters: int, perm: torch.Tensor | None = None,
                     ranks: torch.Tensor | None = None, scales: torch.Tensor | None = None,
                     out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out (n_adapters, R, K): ``out[a, :r_a] = s_a · Σ_i t[i, :r_a]ᵀ x[perm[i]]`` over the rows i of a's segments.

    t: (M, R) in sorted order (fp32, as :func:`~peftlab.kernels.sgmv.sgmv_shrink` returns); x: (M, K) in
    token order; seg_*: (S,) ints; ranks: (n_adapters,) ints ≤ R or None (all R); scales: (n_adapters,) or
    None (all 1). Rows at and past r_a, and adapters without rows, are zero. ``out_dtype``: default x's.
    dA = ``sgmv_weight_grad(dT, x)``; dB_tab = ``sgmv_weight_grad(t, dY)`` (see the module docstring).
    """
    if t.ndim != 2 or x.ndim != 2 or t.shape[0] != x.shape[0]:
        raise ValueError(f"sgmv_weight_grad: t (M, R) and x (M, K) must have the same rows, got "
                         f"{tuple(t.shape)} and {tuple(x.shape)}")
    if t.device != x.device:
        raise ValueError(f"sgmv_weight_grad: tensors on different devices ({t.device}, {x.device})")
    M, R = t.shape
    K = x.shape[1]
    if R > sgmv.MAX_RANK:
        raise ValueError(f"sgmv_weight_grad: rank {R} > {sgmv.MAX_RANK} is not supported")
    out = torch.empty(n_adapters, R, K, device=x.device, dtype=out_dtype or x.dtype)  # every entry written
    if n_adapters == 0 or R == 0 or K == 0:
        return out
    S = seg_len.numel()
    if S == 0 or M == 0:
        return out.zero_()
    dev = x.device
    seg_start, seg_len, seg_adapter = _int32(seg_start, dev), _int32(seg_len, dev), _int32(seg_adapter, dev)
    perm_t, ranks_t = _int32(perm, dev), _int32(ranks, dev)
    scales_t = None if scales is None else scales.to(device=dev, dtype=torch.float32).contiguous()
    br = min(block_r(R), 64)
    bk = WGRAD_BLOCK_K if x.element_size() < 4 else 32
    grid = (n_adapters, triton.cdiv(K, bk), triton.cdiv(R, br))
    _sgmv_wgrad_kernel[grid](
        t, x, out, perm_t if perm_t is not None else seg_len, seg_start, seg_len, seg_adapter,
        ranks_t if ranks_t is not None else seg_len, scales_t if scales_t is not None else t, S, K, R,
        t.stride(0), t.stride(1), x.stride(0), x.stride(1), out.stride(0), out.stride(1), out.stride(2),
        HAS_PERM=perm_t is not None, HAS_RANKS=ranks_t is not None, HAS_SCALES=scales_t is not None,
        IEEE=_ieee(x), BLOCK_M=WGRAD_BLOCK_M, BLOCK_K=bk, BLOCK_R=br, num_warps=4, num_stages=2,  # as AOT_LAUNCHES
    )
    return out


def sgmv_backward(dy: torch.Tensor, x: torch.Tensor, t: torch.Tensor, a_table: torch.Tensor,
                  b_table: torch.Tensor, seg_start: torch.Tensor, seg_len: torch.Tensor, seg_adapter: torch.Tensor,
                  max_len: int, perm: torch.Tensor | None = None, ranks: torch.Tensor | None = None,
                  scales: torch.Tensor | None = None, need_dx: bool = True):
    """(dX (M, K) in x's dtype or None, dA_tab (n, R, K), dB_tab (n, R, N)) of ``y = base + sgmv(x)``.

    dy: (M, N) token order; x: (M, K) the forward's input; t: (M, R) the forward's shrink output (sorted
    order); tables and segment metadata as in :mod:`peftlab.kernels.sgmv`. The gradients have the tables'
    dtypes; rows of dX outside every run segment are zero.
    """
    _check_tables(dy, b_table, "sgmv_backward", dy.shape[1])
    _check_tables(x, a_table, "sgmv_backward", x.shape[1])
    n = a_table.shape[0]
    if b_table.shape[:2] != a_table.shape[:2]:
        raise ValueError(f"sgmv_backward: A_tab {tuple(a_table.shape)} and B_tab {tuple(b_table.shape)} must "
                         f"share (n_adapters, R)")
    dy = dy.contiguous()
    dt = sgmv.sgmv_shrink(dy, b_table, seg_start, seg_len, seg_adapter, max_len, perm, ranks)  # dY B_a, unscaled
    dx = None
    if need_dx:
        dx = torch.zeros_like(x, memory_format=torch.contiguous_format)
        sgmv.sgmv_expand(dx, dt, a_table, seg_start, seg_len, seg_adapter, max_len, perm, ranks, scales)
    da = sgmv_weight_grad(dt, x, seg_start, seg_len, seg_adapter, n, perm, ranks, scales, a_table.dtype)
    db = sgmv_weight_grad(t, dy, seg_start, seg_len, seg_adapter, n, perm, ranks, scales, b_table.dtype)
    return dx, da, db


class SgmvLoraFunction(torch.autograd.Function):
    """y = base + per-segment s_a (x A_aᵀ) B_aᵀ: forward by the SGMV pair, backward by :func:`sgmv_backward`."""

    @staticmethod
    def forward(ctx, x, a_table, b_table, base, seg_start, seg_len, seg_adapter, max_len, perm, ranks, scales):
        x = x.contiguous()
        t = sgmv.sgmv_shrink(x, a_table, seg_start, seg_len, seg_adapter, max_len, perm, ranks)
        y = base.clone(memory_format=torch.contiguous_format)
        sgmv.sgmv_expand(y, t, b_table, seg_start, seg_len, seg_adapter, max_len, perm, ranks, scales)
        ctx.save_for_backward(x, t, a_table, b_table, seg_start, seg_len, seg_adapter, perm, ranks, scales)
        ctx.max_len = max_len
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, t, a_table, b_table, seg_start, seg_len, seg_adapter, perm, ranks, scales = ctx.saved_tensors
        need_x, need_a, need_b, need_base = ctx.needs_input_grad[:4]
        dx = da = db = None
        if need_x or need_a or need_b:
            dx, da, db = sgmv_backward(dy, x, t, a_table, b_table, seg_start, seg_len, seg_adapter, ctx.max_len,
                                       perm, ranks, scales, need_dx=need_x)
        return (dx, da if need_a else None, db if need_b else None, dy if need_base else None,
                None, None, None, None, None, None, None)


def sgmv_lora(x: torch.Tensor, a_table: torch.Tensor, b_table: torch.Tensor, base: torch.Tensor,
              seg_start: torch.Tensor, seg_len: torch.Tensor, seg_adapter: torch.Tensor, max_len: int,
              perm: torch.Tensor | None = None, ranks: torch.Tensor | None = None,
              scales: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable ``y[perm[i]] = base[perm[i]] + s_a · (x[perm[i]] A_aᵀ) B_aᵀ`` for i in segment g, a = seg_adapter[g].

    x: (M, K); a_table: (n, R, K); b_table: (n, R, N) = the stacked Bᵀ; base: (M, N) (y has its dtype; rows
    outside every run segment equal base); seg_*, perm, ranks, scales as in :mod:`peftlab.kernels.sgmv`.
    Gradients flow to x, both tables and base (not to scales).
    """
    _check_tables(x, a_table, "sgmv_lora", x.shape[1])
    _check_tables(base, b_table, "sgmv_lora", base.shape[1])
    if base.shape[0] != x.shape[0]:
        raise ValueError(f"sgmv_lora: base must have x's {x.shape[0]} rows, got {tuple(base.shape)}")
    return SgmvLoraFunction.apply(x, a_table, b_table, base, seg_start, seg_len, seg_adapter, max_len, perm,
                                  ranks, scales)


# ---- ahead-of-time compilation (peftlab.kernels.aot) --------------------------------------------------------


def _aot_launches():
    """As train_rows launches it: a permutation, per-adapter ranks, no scales (folded into B_tab)."""
    from .aot import Launch

    seg_ptrs = {"PERM": "*i32", "SEG_START": "*i32", "SEG_LEN": "*i32", "SEG_ADAPTER": "*i32", "RANKS": "*i32"}
    return [
        Launch(f"sgmv.wgrad{tag}", _sgmv_wgrad_kernel,
               {"T": "*fp32", "X": "*{dtype}", "OUT": "*{dtype}", "SCALES": "*fp32", **seg_ptrs},
               {"HAS_PERM": True, "HAS_RANKS": True, "HAS_SCALES": False, "IEEE": ieee, "str_": 1, "sxk": 1,
                "sok": 1},
               [({"BLOCK_M": 32, "BLOCK_K": bk, "BLOCK_R": br}, 4, 2) for br in (16, 32, 64)],
               tensor_cores="mma", unhinted=("S", "K", "R"), dtypes=dtypes)
        for tag, ieee, bk, dtypes in (("", False, 64, ("bf16", "fp16")), ("/fp32", True, 32, ("fp32",)))
    ]


AOT_LAUNCHES = _aot_launches()
