r"""The fused DoRA norm in Triton: n = ‖W + s·B A‖_row from ‖W‖²_row, C = W Aᵀ and G = A Aᵀ (one pass over W).

Equation, shapes and the fallback: :mod:`peftlab.kernels.dora_norm` (import that module, not this one:
this one needs Triton). One kernel, ``_dora_norm_kernel``; program p owns rows [p·BLOCK_N, (p+1)·BLOCK_N):

    for each K tile k:                       W tile (BLOCK_N, BLOCK_K) in W's dtype, read once
        wsq  += Σ_k W_ik²                    fp32, (BLOCK_N,)
        C    += W_tile · Aᵀ_tile             (BLOCK_N, BLOCK_R) fp32 accumulator, tensor cores
    epilogue (B rows (BLOCK_N, BLOCK_R) fp32, G (R, R) fp32 from the host):
        t1    = Σ_r B_ir C_ir
        t2    = Σ_r B_ir (B G)_ir            in rank chunks of 16 (G's columns), so no (R, R) tile in registers
        n_i   = sqrt(max(wsq_i + 2s·t1 + s²·t2, 0)),  and wsq_i is written too (DoRA caches ‖W‖²_row)

G = A Aᵀ (R²·K FLOPs over A alone) is one small torch GEMM before the launch: computed inside, every
program would repeat it and hold an (R, R) accumulator beside C. A half-precision W meets Aᵀ cast to its
dtype on the host (fp32 accumulation: the same rounding as the torch path ``W @ Aᵀ.to(W.dtype)``); an fp32 W uses
tf32x3 products (``IEEE``) while ``torch.get_float32_matmul_precision() == "highest"``, and the epilogue's
fp32 B·G product always does (it is R/K of the work).

``DOT_F32`` exists for Triton's CPU interpreter only, which cannot run a bf16 ``tl.dot`` (numpy has no
bfloat16): there the bf16 tiles are widened to fp32 before the product, which is the same arithmetic
(a bf16×bf16 product is exact in fp32, and tensor cores accumulate in fp32), so the interpreter tests
cover the bf16 loads, masks, norms and epilogue; the bf16 MMA itself runs in the CUDA tests.

Tiles: BLOCK_K = 128 bytes of a W row; BLOCK_N ∈ {16, 32, 64} picked by the host from N so that a
1024-row projection still launches ≥ 64 programs (:func:`block_n`); BLOCK_R = next power of two ≥ max(R, 16).
Every launch is declared in ``AOT_LAUNCHES`` (:mod:`peftlab.kernels.aot`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
#: Rank chunk of the epilogue's B·G product.
EPI_R = 16


@triton.jit
def _dora_norm_kernel(W, A, B, G, NORM, WSQ, N, K, R, swn, swk, sar, sak, sbn, sbr, sgr, sgc, scaling,
                      IEEE: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                      EPI: tl.constexpr):
    row0 = tl.program_id(0) * BLOCK_N
    ln = tl.arange(0, BLOCK_N)
    rn = row0 + ln
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    n_in = rn < N
    # int64 row offset: N·K passes 2³¹ for a 262144-row embedding-sized weight; in-tile offsets stay int32
    w_ptrs = W + row0.to(tl.int64) * swn + (ln[:, None] * swn + rk[None, :] * swk)
    a_ptrs = A + rk[:, None] * sak + rr[None, :] * sar  # the Aᵀ tile (BLOCK_K, BLOCK_R)
    wsq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    cross = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_in = rk < K - k0
        w = tl.load(w_ptrs, mask=n_in[:, None] & k_in[None, :], other=0.0)
        at = tl.load(a_ptrs, mask=k_in[:, None] & (rr[None, :] < R), other=0.0)  # in W's dtype (host cast)
        wf = w.to(tl.float32)
        wsq += tl.sum(wf * wf, axis=1)
        if DOT_F32:  # the interpreter's bf16 stand-in: bf16 products are exact in fp32, as on tensor cores
            cross = tl.dot(wf, at.to(tl.float32), cross, input_precision="ieee")
        elif IEEE:
            cross = tl.dot(w, at, cross, input_precision="tf32x3")
        else:
            cross = tl.dot(w, at, cross)
        w_ptrs += BLOCK_K * swk
        a_ptrs += BLOCK_K * sak
    # epilogue: t1 = Σ_r B C, t2 = Σ_r B (B G) with G's columns EPI at a time
    b_ptrs = B + row0.to(tl.int64) * sbn + (ln[:, None] * sbn + rr[None, :] * sbr)
    b = tl.load(b_ptrs, mask=n_in[:, None] & (rr[None, :] < R), other=0.0).to(tl.float32)
    t1 = tl.sum(b * cross, axis=1)
    re = tl.arange(0, EPI)
    t2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c0 in range(0, R, EPI):
        c_in = re < R - c0
        g = tl.load(G + rr[:, None] * sgr + (c0 + re[None, :]) * sgc, mask=(rr[:, None] < R) & c_in[None, :], other=0.0)
        bg = tl.dot(b, g, input_precision="tf32x3")  # (BLOCK_N, EPI) = (B G)[:, c0:c0+EPI]
        bc = tl.load(B + row0.to(tl.int64) * sbn + (ln[:, None] * sbn + (c0 + re[None, :]) * sbr),
                     mask=n_in[:, None] & c_in[None, :], other=0.0).to(tl.float32)
        t2 += tl.sum(bg * bc, axis=1)
    sq = wsq + (2.0 * scaling) * t1 + (scaling * scaling) * t2
    tl.store(NORM + rn, tl.sqrt(tl.maximum(sq, 0.0)), mask=n_in)
    tl.store(WSQ + rn, wsq, mask=n_in)


# ---- host side ---------------------------------------------------------------------------------


def block_r(rank: int) -> int:
    """The rank tile: next power of two ≥ max(rank, 16) (tl.dot needs 16)."""
    return max(16, triton.next_power_of_2(int(rank)))


def block_k(dtype: torch.dtype) -> int:
    """128 bytes of a W row: 64 half-precision or 32 fp32 elements (32 under the interpreter)."""
    return 32 if INTERPRET or dtype == torch.float32 else 64


def block_n(n: int) -> int:
    """Rows per program: 64 when that still gives ≥ 256 programs (N ≥ 16384), 32 from N ≥ 4096, else 16.

    The kernel is bound by reading W once; an H100/H200 has 132 SMs, and a 1024-row projection (Llama's
    k/v) at 64 rows a program would leave most of them idle.
    """
    if INTERPRET:
        return 16
    return 64 if n >= 16384 else 32 if n >= 4096 else 16


def num_warps(bn: int, br: int) -> int:
    """4, or 8 for the 128-rank tile over ≥ 32 rows (with 4 warps it spills 16-32 bytes on sm_90; aot_resources.md)."""
    return 8 if br >= 128 and bn >= 32 else 4


def ieee(weight: torch.Tensor) -> bool:
    """fp32 W products as tf32x3 (fp32 accuracy) unless torch allows TF32, as :func:`peftlab.kernels.lora.ieee`."""
    return weight.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"


@torch.no_grad()
def dora_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float):
    """(n, ‖W‖²_row), both (N,) fp32, for W (N, K), A (R, K), B (N, R); tensors already checked by
    :func:`peftlab.kernels.dora_norm.unsupported`."""
    N, K = weight.shape
    R = lora_A.shape[0]
    a32 = lora_A.detach().float()
    gram = a32 @ a32.t()  # G (R, R) fp32
    a = lora_A.detach().to(weight.dtype)  # Aᵀ meets W in W's dtype (R·K elements: a negligible copy)
    b = lora_B.detach().float()
    norm = torch.empty(N, device=weight.device, dtype=torch.float32)
    wsq = torch.empty(N, device=weight.device, dtype=torch.float32)
    bn, br = block_n(N), block_r(R)
    _dora_norm_kernel[(triton.cdiv(N, bn),)](
        weight, a, b, gram, norm, wsq, N, K, R,
        weight.stride(0), weight.stride(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        gram.stride(0), gram.stride(1), float(scaling),
        IEEE=ieee(weight), DOT_F32=INTERPRET and weight.dtype == torch.bfloat16, BLOCK_N=bn, BLOCK_K=block_k(weight.dtype), BLOCK_R=br, EPI=EPI_R,
        num_warps=num_warps(bn, br), num_stages=3,
    )  # fmt: skip
    return norm, wsq


# ---- ahead-of-time compilation (peftlab.kernels.aot) ---------------------------------------------


def _aot_launches():
    from .aot import DTYPES, IS_FP32, Launch

    types = {"W": "*{dtype}", "A": "*{dtype}", "B": "*fp32", "G": "*fp32", "NORM": "*fp32", "WSQ": "*fp32",
             "scaling": "fp32"}  # fmt: skip
    launches = []
    for dtype in DTYPES:
        bk = 32 if dtype == "fp32" else 64
        tiles = [({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_R": br, "EPI": EPI_R}, num_warps(bn, br), 3)
                 for bn in (16, 32, 64) for br in (16, 32, 64, 128)]  # fmt: skip
        # W row-major (swk = 1), A (R, K) row-major (sak = 1), B (N, R) row-major (sbr = 1), G contiguous
        launches.append(Launch("dora.norm", _dora_norm_kernel, types,
                               {"IEEE": IS_FP32, "DOT_F32": False, "swk": 1, "sak": 1, "sbr": 1, "sgc": 1},
                               tiles, tensor_cores="mma", unhinted=("N", "K", "R"), dtypes=(dtype,)))  # fmt: skip
    return launches


AOT_LAUNCHES = _aot_launches()
