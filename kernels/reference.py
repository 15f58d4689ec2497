r"""Pure-torch references of every kernel in :mod:`peftlab.kernels.lora` (tests and documentation).

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
