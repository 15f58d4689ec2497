r"""Pure-torch references of every kernel in :mod:`peftlab.kernels` (lora, sgmv, sgmv_backward; tests and docs).

Shapes: x (M, K), W (N, K), bias (N,), A (R, K), B (N, R), s a float, mask (M, K) of {0, 1/(1-p)}.

    xa = (x ⊙ mask) Aᵀ                       (M, R)      thin_forward
    y  = x Wᵀ + bias + s · xa Bᵀ              (M, N)      fused_forward
    gb = dY B                                 (M, R)      thin_forward on dY
    dX = dY W + s · (gb A) ⊙ mask             (M, K)      fused backward
    dA = s · gbᵀ (x ⊙ mask)                   (R, K)
    dB = s · dYᵀ xa                           (N, R)
    db = Σ_M dY                               (N,)

Everything is computed in fp32 (or fp64 when given fp64) so tests can measure the reference's
own rounding error against a higher-precision run.
"""

from __future__ import annotations

import torch


def _f(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def lora_forward(x, weight, bias, lora_A, lora_B, scaling: float, mask=None):
    """Returns (y, xa); y in fp32/fp64."""
    xd = _f(x) * mask if mask is not None else _f(x)
    xa = xd @ _f(lora_A).t()
    y = _f(x) @ _f(weight).t() + scaling * (xa @ _f(lora_B).t())
    if bias is not None:
        y = y + _f(bias)
    return y, xa


def lora_backward(grad_y, x, weight, lora_A, lora_B, scaling: float, mask=None):
    """Returns (dX, dA, dB, db)."""
    g = _f(grad_y)
    xd = _f(x) * mask if mask is not None else _f(x)
    xa = xd @ _f(lora_A).t()
    gb = g @ _f(lora_B)
    lora_dx = scaling * (gb @ _f(lora_A))
    if mask is not None:
        lora_dx = lora_dx * mask
    dx = g @ _f(weight) + lora_dx
    return dx, scaling * gb.t() @ xd, scaling * g.t() @ xa, g.sum(0)


# ---- multi-adapter LoRA (peftlab.kernels.sgmv): SGMV over segments, BGMV per row ---------------------------
#
# Tables: A_tab (n, R, K) and B_tab (n, R, N) (B_tab[a] = B_aᵀ), zero-padded to the largest rank R;
# ranks (n,) or None (all R); scales (n,) or None (all 1). Segment g covers sorted positions
# [seg_start[g], seg_start[g] + seg_len[g]), holding tokens perm[i], with adapter seg_adapter[g] (-1: none).


def _rank_mask(table, ranks):
    if ranks is None:
        return _f(table)
    keep = torch.arange(table.shape[1], device=table.device)[None, :] < ranks.to(table.device).long()[:, None]
    return _f(table) * keep[:, :, None]


def sgmv_shrink(x, a_table, seg_start, seg_len, seg_adapter, perm=None, ranks=None):
    """t (M, R), sorted order: t[i] = x[perm[i]] A_aᵀ (columns ≥ r_a zero); positions outside run segments 0."""
    a = _rank_mask(a_table, ranks)
    t = torch.zeros(x.shape[0], a.shape[1], dtype=a.dtype, device=x.device)
    for start, length, adapter in zip(seg_start.tolist(), seg_len.tolist(), seg_adapter.tolist()):
        if adapter < 0 or length == 0:
            continue
        pos = torch.arange(start, start + length, device=x.device)
        rows = perm[pos].long() if perm is not None else pos
        t[pos] = _f(x)[rows] @ a[adapter].t()
    return t


def sgmv_expand(y, t, b_table, seg_start, seg_len, seg_adapter, perm=None, ranks=None, scales=None):
    """y' (fp32/fp64 copy of y): y'[perm[i]] += s_a · t[i, :r_a] B_aᵀ for every i in a run segment."""
    b = _rank_mask(b_table, ranks)
    out = _f(y).clone()
    for start, length, adapter in zip(seg_start.tolist(), seg_len.tolist(), seg_adapter.tolist()):
        if adapter < 0 or length == 0:
            continue
        pos = torch.arange(start, start + length, device=y.device)
        rows = perm[pos].long() if perm is not None else pos
        scale = 1.0 if scales is None else float(scales[adapter])
        out[rows] += scale * (_f(t)[pos] @ b[adapter])
    return out


def bgmv_shrink(x, a_table, idx, ranks=None):
    """t (M, R): t[m] = x[m] A_{idx[m]}ᵀ; rows with idx -1 are 0."""
    a = _rank_mask(a_table, ranks)
    idx = idx.long()
    t = torch.einsum("mk,mrk->mr", _f(x), a[idx.clamp(min=0)])
    return t * (idx >= 0)[:, None]


def bgmv_expand(y, t, b_table, idx, ranks=None, scales=None):
    """y' = y + s_a · t[m] B_{idx[m]}ᵀ per row (rows with idx -1 unchanged), fp32/fp64."""
    b = _rank_mask(b_table, ranks)
    idx = idx.long()
    delta = torch.einsum("mr,mrn->mn", _f(t), b[idx.clamp(min=0)])
    if scales is not None:
        delta = delta * _f(scales.to(y.device))[idx.clamp(min=0)][:, None]
    return _f(y) + delta * (idx >= 0)[:, None]


def sgmv_backward(dy, x, a_table, b_table, seg_start, seg_len, seg_adapter, perm=None, ranks=None, scales=None):
    """(dX, dA_tab, dB_tab) of y = base + sgmv_expand(sgmv_shrink(x)) (peftlab.kernels.sgmv_backward), per segment:

        dT_a = G_a B_a      dX_a = s_a · dT_a A_a      dA_a = s_a · dT_aᵀ X_a      dB_tab[a] = s_a · T_aᵀ G_a

    with G_a, X_a the rows of dy, x in segment a's sorted order and T_a = X_a A_aᵀ. Entries past r_a, and
    adapters without rows, get zero gradients; rows of dX outside every run segment are 0.
    """
    a, b = _rank_mask(a_table, ranks), _rank_mask(b_table, ranks)
    g, xf = _f(dy), _f(x)
    dx = torch.zeros_like(xf)
    da, db = torch.zeros_like(a), torch.zeros_like(b)
    for start, length, adapter in zip(seg_start.tolist(), seg_len.tolist(), seg_adapter.tolist()):
        if adapter < 0 or length == 0:
            continue
        pos = torch.arange(start, start + length, device=x.device)
        rows = perm[pos].long() if perm is not None else pos
        scale = 1.0 if scales is None else float(scales[adapter])
        g_a, x_a = g[rows], xf[rows]
        dt = g_a @ b[adapter].t()  # (|a|, R)
        dx[rows] += scale * (dt @ a[adapter])
        da[adapter] += scale * (dt.t() @ x_a)
        db[adapter] += scale * ((x_a @ a[adapter].t()).t() @ g_a)
    return dx, da, db
