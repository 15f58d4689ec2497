r"""LoRA forward paths: the fused Triton kernel (CUDA), a lean torch autograd function, a generic path.

The lean torch path computes, for x of shape (M, d_in) (leading dims flattened):

    y  = x Wᵀ + b + s · (D(x) Aᵀ) Bᵀ          D = dropout with a seeded mask
    xa = D(x) Aᵀ                               (M, r), saved for the backward

and its backward

    dX = dY W + s · ((dY B) A) ⊙ mask / (1 - p)
    dA = s · (dY B)ᵀ D(x)        dB = s · dYᵀ xa        db = Σ_M dY

It saves only ``x`` (which dA needs anyway) and the thin ``xa``; the dropout mask is
regenerated from a seed in backward, so no dropped copy of x is ever stored. W never gets
a gradient. Bases that are not plain float linears (bitsandbytes, W with requires_grad)
use the generic path: ``base_layer(x) + s · B(A(dropout(x)))``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import is_conv1d


def _dropout_mask(shape, p: float, seed: int, device, dtype) -> torch.Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    keep = torch.rand(shape, generator=gen, device=device) >= p
    return keep.to(dtype) / (1.0 - p)


class LoraLinearFunction(torch.autograd.Function):
    """Autograd function for y = x Wᵀ + b + s·(D(x) Aᵀ) Bᵀ with W frozen. Shapes as module docstring."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, p: float, seed: int):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        out_dtype = x.dtype
        # the base term exactly as nn.Linear computes it, so an adapter at init is bit-identical
        y = torch.nn.functional.linear(x2, weight, None if bias is None else bias.to(out_dtype))
        xin = x2 if x2.dtype == lora_A.dtype else x2.to(lora_A.dtype)
        if p > 0:
            xin = xin * _dropout_mask(xin.shape, p, seed, xin.device, xin.dtype)
        xa = xin @ lora_A.t()  # (M, r)
        if y.dtype == lora_B.dtype:
            y.addmm_(xa, lora_B.t(), alpha=scaling)
        else:
            y = (y.float() + scaling * (xa @ lora_B.t()).float()).to(out_dtype)
        ctx.save_for_backward(x2, weight, lora_A, lora_B, xa)
        ctx.scaling, ctx.p, ctx.seed = scaling, p, seed
        ctx.has_bias = bias is not None
        ctx.bias_needs_grad = bias is not None and bias.requires_grad
        ctx.in_shape = shape
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x2, weight, lora_A, lora_B, xa = ctx.saved_tensors
        s, p = ctx.scaling, ctx.p
        g = grad_y.reshape(-1, grad_y.shape[-1])
        g_lora = g if g.dtype == lora_B.dtype else g.to(lora_B.dtype)
        gb = g_lora @ lora_B  # (M, r)
        grad_x = grad_A = grad_B = grad_bias = None
        mask = None
        if p > 0 and (ctx.needs_input_grad[0] or ctx.needs_input_grad[3]):
            mask = _dropout_mask(x2.shape, p, ctx.seed, x2.device, lora_A.dtype)
        if ctx.needs_input_grad[0]:
            grad_lora_x = (gb @ lora_A) * s
            if mask is not None:
                grad_lora_x = grad_lora_x * mask
            if grad_lora_x.dtype == g.dtype:
                grad_x = torch.addmm(grad_lora_x, g, weight)
            else:
                grad_x = (g @ weight).float().add_(grad_lora_x.float()).to(x2.dtype)
            grad_x = grad_x.reshape(ctx.in_shape)
        if ctx.needs_input_grad[3]:
            xin = x2 if x2.dtype == lora_A.dtype else x2.to(lora_A.dtype)
            if mask is not None:
                xin = xin * mask
            grad_A = (gb.t() @ xin) * s
        if ctx.needs_input_grad[4]:
            grad_B = (g_lora.t() @ xa) * s
        if ctx.bias_needs_grad:
            grad_bias = g.sum(0)
        return grad_x, None, grad_bias, grad_A, grad_B, None, None, None


def _plain_weight(base: nn.Module) -> torch.Tensor | None:
    """(out, in) weight of a plain float linear whose weight is frozen; None otherwise."""
    weight = getattr(base, "weight", None)
    if type(base) is nn.Linear or is_conv1d(base):
        if weight is not None and weight.is_floating_point() and not weight.requires_grad:
            return weight.t() if is_conv1d(base) else weight
    return None


def _use_triton(layer, x: torch.Tensor) -> bool:
    if layer.use_kernel == "torch" or not x.is_cuda:
        if layer.use_kernel == "triton" and not x.is_cuda:
            raise RuntimeError("use_kernel='triton' needs CUDA tensors; use 'auto' or 'torch' on the CPU")
        return False
    try:
        from ..kernels import triton_available
    except ImportError:
        triton_available = None
    available = bool(triton_available and triton_available())
    if layer.use_kernel == "triton" and not available:
        raise RuntimeError("use_kernel='triton' but Triton is not importable; pip install 'peftlab[triton]'")
    return available


def lora_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """Forward of an active :class:`~peftlab.methods.lora.LoraLinear`."""
    base = layer.base_layer
    weight = _plain_weight(base)
    if weight is not None and weight.dtype == x.dtype:
        bias = base.bias
        p = layer.dropout_p if layer.training else 0.0
        if _use_triton(layer, x):
            from ..kernels import lora_linear

            return lora_linear(x, weight, bias, layer.lora_A, layer.lora_B, layer.scaling, p)
        seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else 0
        return LoraLinearFunction.apply(x, weight, bias, layer.lora_A, layer.lora_B, layer.scaling, p, seed)
    # generic path (quantized or trainable base): the base layer's own forward + the LoRA term
    result = base(x)
    xin = layer.lora_dropout(x.to(layer.lora_A.dtype))
    lora = (xin @ layer.lora_A.t()) @ layer.lora_B.t()
    return (result + lora * layer.scaling).to(result.dtype)
