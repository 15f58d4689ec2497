r"""Multi-adapter LoRA kernels (Triton): SGMV for segments of rows, BGMV for one token per row.

A mixed batch routes every token to one adapter (or to none). The adapters of a layer are stacked
into two tables padded to the largest rank R:

    A_tab: (n_adapters, R, K)      row a holds A_a (r_a × K), zero below r_a
    B_tab: (n_adapters, R, N)      row a holds B_aᵀ (r_a × N), zero below r_a

and the LoRA term of token m routed to adapter a is ``y_m += s_a · (x_m A_aᵀ) B_aᵀ``, done as a
*shrink* to rank R and an *expand* back to N:

* **SGMV** (segmented gather matrix-vector, Punica's form, for prefill): the tokens are grouped by
  adapter without moving them: sorted position i holds token ``perm[i]`` and segment g covers sorted
  positions ``[seg_start[g], seg_start[g] + seg_len[g])``, all with adapter ``seg_adapter[g]``
  (-1: no adapter, skipped). One launch covers every segment: grid axis 0 is the segment, axis 1
  the BLOCK_M tiles inside it (tiles past the segment's end return at once), so each adapter's A
  and B tiles are read once per tile of its own tokens.

      shrink:  t[i, :r_a] = x[perm[i]] A_aᵀ                   t: (M, R) fp32, sorted order
      expand:  y[perm[i]] += s_a · t[i, :r_a] B_aᵀ[:r_a]      y: (M, N), in place

* **BGMV** (batched gather matrix-vector, for decode with one token per row): every row gathers
  its own adapter ``idx[m]`` (-1: none):

      shrink:  t[m, :r_a] = x[m] A_{idx[m]}ᵀ                  t: (M, R) fp32, row order
      expand:  y[m] += s_a · t[m] B_{idx[m]}ᵀ

Ranks may differ per adapter (``ranks``: (n_adapters,) int32, each ≤ R; columns at or past an
adapter's rank are neither read nor written); ``scales`` (n_adapters,) fp32 multiplies each
adapter's expand (None: 1, e.g. when the scale is folded into B_tab). Accumulation is fp32;
fp32 inputs use IEEE products (no TF32), so a row matches the single-adapter computation to fp32
rounding. Pure-torch references: :mod:`peftlab.kernels.reference` (``sgmv_shrink`` ...). The
interpreter (``TRITON_INTERPRET=1``) runs the same kernels on CPU tensors for the tests.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
#: Tiles: SGMV rows per program, K step of the shrink, N tile of the expand; BGMV N tile and K step.
SGMV_BLOCK_M = 16 if INTERPRET else 32
SGMV_BLOCK_K = 32 if INTERPRET else 64  # 128 bytes of a half row; fp32 takes half as many (no spills)
SGMV_BLOCK_N = 32 if INTERPRET else 64
BGMV_BLOCK_K = 32 if INTERPRET else 128
BGMV_BLOCK_N = 32 if INTERPRET else 128
MAX_RANK = 128


def block_r(rank: int) -> int:
    """The rank tile: the next power of two ≥ max(rank, 16) (tl.dot needs 16)."""
    return max(16, triton.next_power_of_2(int(rank)))


# ---- SGMV -----------------------------------------------------------------------------------------


@triton.jit
def _sgmv_shrink_kernel(X, A, T, PERM, SEG_START, SEG_LEN, SEG_ADAPTER, RANKS, K, R,
                        sxm, sxk, san, sar, sak, stm, str_,
                        HAS_PERM: tl.constexpr, HAS_RANKS: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    seg = tl.program_id(0)
    tile = tl.program_id(1)
    rb = tl.program_id(2)
    length = tl.load(SEG_LEN + seg)
    adapter = tl.load(SEG_ADAPTER + seg)
    if (tile * BLOCK_M >= length) | (adapter < 0):
        return
    rank = R
    if HAS_RANKS:
        rank = tl.load(RANKS + adapter)
    if rb * BLOCK_R >= rank:
        return
    lm = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = lm < length
    pos = tl.load(SEG_START + seg) + lm
    rows = pos
    if HAS_PERM:
        rows = tl.load(PERM + pos, mask=m_ok, other=0)
    rk = tl.arange(0, BLOCK_K)
    rr = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rr < rank
    x_ptrs = X + rows.to(tl.int64)[:, None] * sxm + rk[None, :] * sxk
    a_ptrs = A + adapter.to(tl.int64) * san + (rk[:, None] * sak + rr[None, :] * sar)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(x.to(a.dtype), a, input_precision="tf32x3")
        else:
            acc += tl.dot(x.to(a.dtype), a)
        x_ptrs += BLOCK_K * sxk
        a_ptrs += BLOCK_K * sak
    t_ptrs = T + pos.to(tl.int64)[:, None] * stm + rr[None, :] * str_
    tl.store(t_ptrs, acc, mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _sgmv_expand_kernel(T, B, Y, PERM, SEG_START, SEG_LEN, SEG_ADAPTER, RANKS, SCALES, N, R,
                        stm, str_, sbn, sbr, sbc, sym, syn,
                        HAS_PERM: tl.constexpr, HAS_RANKS: tl.constexpr, HAS_SCALES: tl.constexpr,
                        IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    seg = tl.program_id(0)
    tile = tl.program_id(1)
    nb = tl.program_id(2)
    length = tl.load(SEG_LEN + seg)
    adapter = tl.load(SEG_ADAPTER + seg)
    if (tile * BLOCK_M >= length) | (adapter < 0):
        return
    rank = R
    if HAS_RANKS:
        rank = tl.load(RANKS + adapter)
    lm = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = lm < length
    pos = tl.load(SEG_START + seg) + lm
    rows = pos
    if HAS_PERM:
        rows = tl.load(PERM + pos, mask=m_ok, other=0)
    cn = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):  # ranks in steps of BLOCK_R: the padding past r_a is never read
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < rank
        t = tl.load(T + pos.to(tl.int64)[:, None] * stm + rr[None, :] * str_, mask=m_ok[:, None] & r_ok[None, :],
                    other=0.0)
        b = tl.load(B + adapter.to(tl.int64) * sbn + (rr[:, None] * sbr + cn[None, :] * sbc),
                    mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(t.to(b.dtype), b, input_precision="tf32x3")
        else:
            acc += tl.dot(t.to(b.dtype), b)
    if HAS_SCALES:
        acc = acc * tl.load(SCALES + adapter)
    y_ptrs = Y + rows.to(tl.int64)[:, None] * sym + cn[None, :] * syn
    mask = m_ok[:, None] & n_ok[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=mask)


# ---- BGMV -----------------------------------------------------------------------------------------


@triton.jit
def _bgmv_shrink_kernel(X, A, T, IDX, RANKS, K, R, sxm, sxk, san, sar, sak, stm, str_,
                        HAS_RANKS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    row = tl.program_id(0)
    rb = tl.program_id(1)
    adapter = tl.load(IDX + row)
    rr = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    t_ptrs = T + row.to(tl.int64) * stm + rr * str_
    if adapter < 0:  # no adapter: the row of t is zero (t is not zero-filled beforehand)
        tl.store(t_ptrs, tl.zeros((BLOCK_R,), dtype=tl.float32), mask=rr < R)
        return
    rank = R
    if HAS_RANKS:
        rank = tl.load(RANKS + adapter)
    r_ok = rr < rank
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = X + row.to(tl.int64) * sxm + rk * sxk
    a_ptrs = A + adapter.to(tl.int64) * san + (rr[:, None] * sar + rk[None, :] * sak)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        x = tl.load(x_ptrs, mask=k_ok, other=0.0).to(tl.float32)
        a = tl.load(a_ptrs, mask=r_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(a * x[None, :], axis=1)
        x_ptrs += BLOCK_K * sxk
        a_ptrs += BLOCK_K * sak
    tl.store(t_ptrs, acc, mask=rr < R)  # zero past the adapter's rank


@triton.jit
def _bgmv_expand_kernel(T, B, Y, IDX, RANKS, SCALES, N, R, stm, str_, sbn, sbr, sbc, sym, syn,
                        HAS_RANKS: tl.constexpr, HAS_SCALES: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    row = tl.program_id(0)
    nb = tl.program_id(1)
    adapter = tl.load(IDX + row)
    if adapter < 0:
        return
    rank = R
    if HAS_RANKS:
        rank = tl.load(RANKS + adapter)
    cn = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cn < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):  # ranks in steps of BLOCK_R: the padding past r_a is never read
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < rank
        t = tl.load(T + row.to(tl.int64) * stm + rr * str_, mask=r_ok, other=0.0)
        b = tl.load(B + adapter.to(tl.int64) * sbn + (rr[:, None] * sbr + cn[None, :] * sbc),
                    mask=r_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(t[:, None] * b, axis=0)
    if HAS_SCALES:
        acc = acc * tl.load(SCALES + adapter)
    y_ptrs = Y + row.to(tl.int64) * sym + cn * syn
    y = tl.load(y_ptrs, mask=n_ok, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=n_ok)


# ---- host wrappers --------------------------------------------------------------------------------


def _check_tables(x_or_t, table, what: str, inner: int) -> None:
    if table.ndim != 3 or table.shape[2] != inner:
        raise ValueError(f"{what}: the table must be (n_adapters, R, {inner}), got {tuple(table.shape)}")
    if table.shape[1] > MAX_RANK:
        raise ValueError(f"{what}: rank {table.shape[1]} > {MAX_RANK} is not supported")
    if table.device != x_or_t.device:
        raise ValueError(f"{what}: tensors on different devices ({x_or_t.device}, {table.device})")


def _int32(t: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if t is None else t.to(device=device, dtype=torch.int32).contiguous()


def _ieee(*tensors) -> bool:
    return all(t.dtype == torch.float32 for t in tensors)


def sgmv_shrink(x: torch.Tensor, a_table: torch.Tensor, seg_start: torch.Tensor, seg_len: torch.Tensor,
                seg_adapter: torch.Tensor, max_len: int, perm: torch.Tensor | None = None,
                ranks: torch.Tensor | None = None) -> torch.Tensor:
    """t (M, R) fp32 in sorted order: ``t[i, :r_a] = x[perm[i]] A_aᵀ`` for i in segment g (a = seg_adapter[g]).

    x: (M, K); a_table: (n, R, K); seg_*: (S,) ints; ``max_len`` ≥ every seg_len (host int, sizes
    the grid); perm: (M,) ints or None (identity). Positions outside every run segment stay 0.
    """
    _check_tables(x, a_table, "sgmv_shrink", x.shape[1])
    M, K = x.shape
    R = a_table.shape[1]
    t = torch.zeros(M, R, device=x.device, dtype=torch.float32)
    S = seg_len.numel()
    if S == 0 or max_len <= 0 or M == 0:
        return t
    dev = x.device
    seg_start, seg_len, seg_adapter = _int32(seg_start, dev), _int32(seg_len, dev), _int32(seg_adapter, dev)
    perm_t, ranks_t = _int32(perm, dev), _int32(ranks, dev)
    br = min(block_r(R), 64)  # rank tiles of ≤ 64 (fp32 spills at 128); x is read once per tile
    grid = (S, triton.cdiv(max_len, SGMV_BLOCK_M), triton.cdiv(R, br))
    _sgmv_shrink_kernel[grid](
        x, a_table, t, perm_t if perm_t is not None else seg_len, seg_start, seg_len, seg_adapter,
        ranks_t if ranks_t is not None else seg_len, K, R,
        x.stride(0), x.stride(1), a_table.stride(0), a_table.stride(1), a_table.stride(2), t.stride(0), t.stride(1),
        HAS_PERM=perm_t is not None, HAS_RANKS=ranks_t is not None, IEEE=_ieee(a_table),
        BLOCK_M=SGMV_BLOCK_M, BLOCK_K=SGMV_BLOCK_K if a_table.element_size() < 4 else 32, BLOCK_R=br,
    )
    return t


def sgmv_expand(y: torch.Tensor, t: torch.Tensor, b_table: torch.Tensor, seg_start: torch.Tensor,
                seg_len: torch.Tensor, seg_adapter: torch.Tensor, max_len: int, perm: torch.Tensor | None = None,
                ranks: torch.Tensor | None = None, scales: torch.Tensor | None = None) -> torch.Tensor:
    """In place: ``y[perm[i]] += s_a · t[i, :r_a] B_aᵀ`` for i in segment g; returns y.

    y: (M, N), any float dtype (fp32 accumulation); t: (M, R) from :func:`sgmv_shrink`;
    b_table: (n, R, N) = the stacked Bᵀ; scales: (n,) fp32 or None.
    """
    _check_tables(y, b_table, "sgmv_expand", y.shape[1])
    M, N = y.shape
    R = b_table.shape[1]
    if t.shape != (M, R):
        raise ValueError(f"sgmv_expand: t must be ({M}, {R}), got {tuple(t.shape)}")
    S = seg_len.numel()
    if S == 0 or max_len <= 0 or M == 0:
        return y
    dev = y.device
    seg_start, seg_len, seg_adapter = _int32(seg_start, dev), _int32(seg_len, dev), _int32(seg_adapter, dev)
    perm_t, ranks_t = _int32(perm, dev), _int32(ranks, dev)
    scales_t = None if scales is None else scales.to(device=dev, dtype=torch.float32).contiguous()
    grid = (S, triton.cdiv(max_len, SGMV_BLOCK_M), triton.cdiv(N, SGMV_BLOCK_N))
    _sgmv_expand_kernel[grid](
        t, b_table, y, perm_t if perm_t is not None else seg_len, seg_start, seg_len, seg_adapter,
        ranks_t if ranks_t is not None else seg_len, scales_t if scales_t is not None else t, N, R,
        t.stride(0), t.stride(1), b_table.stride(0), b_table.stride(1), b_table.stride(2), y.stride(0), y.stride(1),
        HAS_PERM=perm_t is not None, HAS_RANKS=ranks_t is not None, HAS_SCALES=scales_t is not None,
        IEEE=_ieee(b_table), BLOCK_M=SGMV_BLOCK_M, BLOCK_N=SGMV_BLOCK_N, BLOCK_R=16,
    )
    return y


def bgmv_shrink(x: torch.Tensor, a_table: torch.Tensor, idx: torch.Tensor,
                ranks: torch.Tensor | None = None) -> torch.Tensor:
    """t (M, R) fp32: ``t[m, :r_a] = x[m] A_{idx[m]}ᵀ``, zero elsewhere and on rows with idx -1. x: (M, K); idx: (M,)."""
    _check_tables(x, a_table, "bgmv_shrink", x.shape[1])
    M, K = x.shape
    R = a_table.shape[1]
    t = torch.empty(M, R, device=x.device, dtype=torch.float32)  # every entry written by the kernel
    if M == 0:
        return t
    if idx.numel() != M:
        raise ValueError(f"bgmv_shrink: idx must have one entry per row ({M}), got {idx.numel()}")
    idx_t, ranks_t = _int32(idx, x.device), _int32(ranks, x.device)
    br = 16
    grid = (M, triton.cdiv(R, br))
    _bgmv_shrink_kernel[grid](
        x, a_table, t, idx_t, ranks_t if ranks_t is not None else idx_t, K, R,
        x.stride(0), x.stride(1), a_table.stride(0), a_table.stride(1), a_table.stride(2), t.stride(0), t.stride(1),
        HAS_RANKS=ranks_t is not None, BLOCK_K=BGMV_BLOCK_K, BLOCK_R=br,
    )
    return t


def bgmv_expand(y: torch.Tensor, t: torch.Tensor, b_table: torch.Tensor, idx: torch.Tensor,
                ranks: torch.Tensor | None = None, scales: torch.Tensor | None = None) -> torch.Tensor:
    """In place: ``y[m] += s_a · t[m, :r_a] B_aᵀ`` with a = idx[m] (-1: untouched); returns y."""
    _check_tables(y, b_table, "bgmv_expand", y.shape[1])
    M, N = y.shape
    R = b_table.shape[1]
    if t.shape != (M, R):
        raise ValueError(f"bgmv_expand: t must be ({M}, {R}), got {tuple(t.shape)}")
    if M == 0:
        return y
    idx_t, ranks_t = _int32(idx, y.device), _int32(ranks, y.device)
    scales_t = None if scales is None else scales.to(device=y.device, dtype=torch.float32).contiguous()
    grid = (M, triton.cdiv(N, BGMV_BLOCK_N))
    _bgmv_expand_kernel[grid](
        t, b_table, y, idx_t, ranks_t if ranks_t is not None else idx_t, scales_t if scales_t is not None else t,
        N, R, t.stride(0), t.stride(1), b_table.stride(0), b_table.stride(1), b_table.stride(2),
        y.stride(0), y.stride(1),
        HAS_RANKS=ranks_t is not None, HAS_SCALES=scales_t is not None, BLOCK_N=BGMV_BLOCK_N, BLOCK_R=16,
    )
    return y


# ---- ahead-of-time compilation (peftlab.kernels.aot): how the wrappers above launch each kernel ----


def _aot_launches():
    from .aot import Launch

    ints = ("K", "N", "R")
    seg_ptrs = {"PERM": "*i32", "SEG_START": "*i32", "SEG_LEN": "*i32", "SEG_ADAPTER": "*i32", "RANKS": "*i32"}
    flags = {"HAS_PERM": True, "HAS_RANKS": True}
    rank_tiles = [16, 32, 64]
    return [
        *(
            Launch(f"sgmv.shrink{tag}", _sgmv_shrink_kernel,
                   {"X": "*{dtype}", "A": "*{dtype}", "T": "*fp32", **seg_ptrs},
                   {**flags, "IEEE": ieee, "sxk": 1, "sak": 1, "str_": 1},
                   [({"BLOCK_M": 32, "BLOCK_K": bk, "BLOCK_R": br}, 4, 2) for br in rank_tiles],
                   tensor_cores="mma", unhinted=ints, dtypes=dtypes)
            for tag, ieee, bk, dtypes in (("", False, 64, ("bf16", "fp16")), ("/fp32", True, 32, ("fp32",)))
        ),
        *(
            Launch(f"sgmv.expand{tag}", _sgmv_expand_kernel,
                   {"T": "*fp32", "B": "*{dtype}", "Y": "*{dtype}", "SCALES": "*fp32", **seg_ptrs},
                   {**flags, "HAS_SCALES": False, "IEEE": ieee, "str_": 1, "sbc": 1, "syn": 1},
                   [({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_R": 16}, 4, 2)],
                   tensor_cores="mma", unhinted=ints, dtypes=dtypes)
            for tag, ieee, dtypes in (("", False, ("bf16", "fp16")), ("/fp32", True, ("fp32",)))
        ),
        Launch("bgmv.shrink", _bgmv_shrink_kernel,
               {"X": "*{dtype}", "A": "*{dtype}", "T": "*fp32", "IDX": "*i32", "RANKS": "*i32"},
               {"HAS_RANKS": True, "sxk": 1, "sak": 1, "str_": 1},
               [({"BLOCK_K": 128, "BLOCK_R": 16}, 4, 1)], unhinted=ints),
        Launch("bgmv.expand", _bgmv_expand_kernel,
               {"T": "*fp32", "B": "*{dtype}", "Y": "*{dtype}", "IDX": "*i32", "RANKS": "*i32", "SCALES": "*fp32"},
               {"HAS_RANKS": True, "HAS_SCALES": False, "str_": 1, "sbc": 1, "syn": 1},
               [({"BLOCK_N": 128, "BLOCK_R": 16}, 4, 1)], unhinted=ints),
    ]


AOT_LAUNCHES = _aot_launches()
