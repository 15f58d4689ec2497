r"""LoRA forward paths: the fused Triton kernel (CUDA), a lean torch autograd function, a generic path.

The lean torch path computes, for x of shape (M, d_in) (leading dims flattened), with
m ∈ {0, 1}^(M, d_in) the keep-mask (P(m = 0) = p) and s' = s / (1 - p):

    y  = x Wᵀ + b + s' · ((x ⊙ m) Aᵀ) Bᵀ       (= x Wᵀ + b + s · (D(x) Aᵀ) Bᵀ, inverted dropout D)
    xa = (x ⊙ m) Aᵀ                             (M, r), saved for the backward

and its backward, with gb = s' · dY B of shape (M, r) (every scale lands on the thin side):

    dX = dY W + (gb A) ⊙ m
    dA = gbᵀ (x ⊙ m)        dB = s' · dYᵀ xa        db = Σ_M dY

It saves only ``x`` (which dA needs anyway) and the thin ``xa``; the dropout mask is
regenerated from a seed in backward, so no dropped copy of x is ever stored. W never gets
a gradient. A frozen 4-bit (NF4/FP4) base in training runs the same equations in
:class:`DequantLoraLinearFunction`, which dequantizes W inside forward and again inside backward
(no dense weight outlives the layer). Other bases (int8, W with requires_grad, 4-bit at inference)
use the generic path: ``base_layer(x) + s · (D(x) Aᵀ) Bᵀ``, whose LoRA branch is the same
lean autograd function without the base term (:class:`LoraBranchFunction`): it too saves x
and xa and regenerates the mask, where ``nn.Dropout`` would keep a dropped copy of x.

Dtypes: the thin products run in :func:`lora_dtype`: the adapter's dtype (fp32) on a CPU, the
activations' dtype on CUDA when bf16/fp16 activations meet fp32 adapters (fp32 accumulation, as under
autocast; no fp32 copies of x, dY or (M, d) outputs). Parameters and their gradients stay fp32.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from ..core.layer import is_conv1d
from ..kernels import lora_linear_or_none, triton_available
from .quant.base import backend_of

_MASK_LEVELS = 1 << 16  # dropout decisions are 16-bit: P(drop) = round(p · 2¹⁶) / 2¹⁶


def _effective_p(p: float) -> float:
    """The drop probability the 16-bit mask realises (within 7.7e-6 of ``p``); 1/(1-p) uses it."""
    return round(p * _MASK_LEVELS) / _MASK_LEVELS


def _dropout_drop(shape, p: float, seed: int, device) -> torch.Tensor:
    """Boolean mask (shape) of the dropped entries, P(drop) = _effective_p(p), reproducible from ``seed``.

    One 64-bit draw of the generator gives four 16-bit uniforms, so the mask costs a quarter of the
    draws of ``torch.rand(shape) < p`` (half the time on a CPU). It is applied with ``masked_fill``
    (no float copy of the mask); inverted dropout's 1/(1-p) is folded into the scaling s.
    """
    numel = math.prod(shape)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(1 << 63), (1 << 63) - 1, generator=gen)
    threshold = round(p * _MASK_LEVELS) - (1 << 15)  # int16 view spans [-2¹⁵, 2¹⁵)
    return (words.view(torch.int16)[:numel] < threshold).view(shape)


def _dropout_mask(shape, p: float, seed: int, device, dtype) -> torch.Tensor:
    """The inverted-dropout multiplier keep / (1 - p) that the autograd paths apply (for tests)."""
    return (~_dropout_drop(shape, p, seed, device)).to(dtype) / (1.0 - _effective_p(p))


#: Devices where half-precision activations over fp32 adapters take the thin products in the activations'
#: dtype (see :func:`lora_dtype`).
HALF_PRODUCT_DEVICES = ("cuda",)


def lora_dtype(x: torch.Tensor, lora_A: torch.Tensor) -> torch.dtype:
    """The dtype of the thin LoRA products (xa, gb, dA, dB) for activations x and adapter A.

    On a CPU, the adapter's own (fp32 A, B over a bf16 model: exact, and a CPU's bf16 GEMMs are no faster).
    On CUDA with bf16/fp16 activations and fp32 adapters: the activations' dtype, with fp32 accumulation in
    the GEMMs (what autocast runs). The fp32 route copies x, dY and two (M, d)-sized outputs per layer and
    direction to fp32; the H200 profile (benchmarks/results/gpu/2026-11-26_NVIDIA-H200) put those copies at
    a quarter of a LoRA linear's GPU time. The parameters, their gradients and the optimizer stay fp32.
    """
    if x.dtype in (torch.bfloat16, torch.float16) and lora_A.dtype == torch.float32 and x.device.type in HALF_PRODUCT_DEVICES:
        return x.dtype
    return lora_A.dtype


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _lora_down(x2: torch.Tensor, lora_A: torch.Tensor, scaling: float, p: float, seed: int):
    """xa = (x ⊙ m) Aᵀ of shape (M, r) in :func:`lora_dtype` and the scale s' = s / (1 - p) that goes with it."""
    dtype = lora_dtype(x2, lora_A)
    xin, lora_A = _as(x2, dtype), _as(lora_A, dtype)
    if p > 0:
        xin = xin.masked_fill(_dropout_drop(xin.shape, p, seed, xin.device), 0)
        scaling = scaling / (1.0 - _effective_p(p))
    return xin @ lora_A.t(), scaling


def _lora_grads(ctx, g_lora, x2, lora_A, lora_B, xa, need_x: bool, need_A: bool, need_B: bool):
    """(gb A) ⊙ m, dA, dB of the LoRA term (module docstring); None where not needed.

    ``ctx`` carries the forward's s' (``scaling``), ``p`` and ``seed``; the mask is regenerated here.
    The products run in xa's dtype (:func:`lora_dtype`; ``g_lora`` is in it too); dA and dB come back
    in the parameters' dtypes.
    """
    s = ctx.scaling
    dtype = xa.dtype
    a_dtype, b_dtype = lora_A.dtype, lora_B.dtype
    lora_A, lora_B = _as(lora_A, dtype), _as(lora_B, dtype)
    gb = (g_lora @ lora_B).mul_(s)  # s'·dY B, (M, r): scaling on the thin side, not on (M, d_in)
    drop = None
    if ctx.p > 0 and (need_x or need_A):
        drop = _dropout_drop(x2.shape, ctx.p, ctx.seed, x2.device)
    grad_lora_x = grad_A = grad_B = None
    if need_x:
        grad_lora_x = gb @ lora_A
        if drop is not None:
            grad_lora_x.masked_fill_(drop, 0)
    if need_A:
        xin = _as(x2, dtype)
        if drop is not None:
            xin = xin.masked_fill(drop, 0)
        grad_A = _as(gb.t() @ xin, a_dtype)
    if need_B:
        grad_B = _as((g_lora.t() @ xa).mul_(s), b_dtype)
    return grad_lora_x, grad_A, grad_B


def _rows(y: torch.Tensor) -> torch.Tensor:
    """The (M, d_out) view of a contiguous (..., d_out) output, for writing the LoRA term into it in place.

    The autograd functions return the (..., d_out) tensor itself, never a reshaped view of a 2-D result:
    autograd forbids in-place ops on a view made inside a custom Function, and models do write into
    projection outputs (Wav2Vec2's SpecAugment, Longformer's ``query /= √d``)."""
    return y.view(-1, y.shape[-1])


def _linear_into(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lead) -> torch.Tensor:
    """x2 Wᵀ + b, computed as ``F.linear`` on (M, d_in) computes it (addmm / mm), returned as a
    (*lead, d_out) tensor that is not a view (``_unsafe_view``, as ``torch.matmul`` folds batches).

    No ``out=``: under selective activation checkpointing the recomputation returns the cached GEMM result
    instead of writing into ``out``, which would leave the recomputed output uninitialised."""
    y2 = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())
    return _unview(y2, (*lead, weight.shape[0]))


def _unview(y2: torch.Tensor, shape) -> torch.Tensor:
    """y2 (M, d_out) reshaped to ``shape`` without a view relationship (``y._base is None``), so callers may
    write into the returned output in place."""
    return torch.ops.aten._unsafe_view(y2, tuple(shape))


def _exact_dtypes(fn):
    """Run an autograd function's forward/backward with autocast off: every dtype in it is explicit.

    Under autocast the caller casts x and W to the autocast dtype first (:func:`_autocast_dtype`), so the
    base GEMM still runs in bf16/fp16 while the thin LoRA products run in :func:`lora_dtype`, and
    backward sees exactly the dtypes forward saved (no fp32 gradient meeting a bf16 activation).
    """

    @functools.wraps(fn)
    def wrapper(ctx, tensor, *args):
        with torch.autocast(tensor.device.type, enabled=False):
            return fn(ctx, tensor, *args)

    return wrapper


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype for x's device when autocast is on there, else None."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


class LoraLinearFunction(torch.autograd.Function):
    """Autograd function for y = x Wᵀ + b + s·(D(x) Aᵀ) Bᵀ with W frozen. Shapes as module docstring."""

    @staticmethod
    @_exact_dtypes
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, p: float, seed: int):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        out_dtype = x.dtype
        # the base term exactly as nn.Linear computes it (one addmm / mm), so an adapter at init is bit-identical
        y = _linear_into(x2, weight, None if bias is None else bias.to(out_dtype), shape[:-1])
        xa, scaling = _lora_down(x2, lora_A, scaling, p, seed)
        if y.dtype == xa.dtype:
            _rows(y).addmm_(xa, _as(lora_B, xa.dtype).t(), alpha=scaling)  # in place, through a (M, d_out) view
        else:
            y32 = y.float()
            _rows(y32).add_((xa @ lora_B.t()).float(), alpha=scaling)
            y = y32.to(out_dtype)
        ctx.save_for_backward(x2, weight, lora_A, lora_B, xa)
        ctx.scaling, ctx.p, ctx.seed = scaling, p, seed
        ctx.bias_needs_grad = bias is not None and bias.requires_grad
        ctx.in_shape = shape
        return y

    @staticmethod
    @_exact_dtypes
    def backward(ctx, grad_y):
        x2, weight, lora_A, lora_B, xa = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])
        g_lora = _as(g, xa.dtype)
        need = ctx.needs_input_grad
        grad_lora_x, grad_A, grad_B = _lora_grads(
            ctx, g_lora, x2, lora_A, lora_B, xa, need[0], need[3], need[4]
        )
        grad_x = grad_bias = None
        if need[0]:
            if grad_lora_x.dtype == g.dtype:
                grad_x = torch.addmm(grad_lora_x, g, weight)
            else:
                grad_x = (g @ weight).float().add_(grad_lora_x.float()).to(x2.dtype)
            grad_x = grad_x.reshape(ctx.in_shape)
        if ctx.bias_needs_grad:
            grad_bias = g.sum(0)
        return grad_x, None, grad_bias, grad_A, grad_B, None, None, None


class LoraBranchFunction(torch.autograd.Function):
    """The LoRA branch alone, s·(D(x) Aᵀ) Bᵀ in A's dtype, for bases with their own autograd.

    x: (..., d_in) in any float dtype; returns (..., d_out). Saves x and xa (M, r) only.
    """

    @staticmethod
    @_exact_dtypes
    def forward(ctx, x, lora_A, lora_B, scaling: float, p: float, seed: int):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xa, scaling = _lora_down(x2, lora_A, scaling, p, seed)
        # (xa Bᵀ)·s as HF PEFT rounds it; not in place: selective checkpointing caches the GEMM output, and an
        # in-place op after it would run a second time on the cached tensor during recomputation
        out = _unview(torch.mm(xa, _as(lora_B, xa.dtype).t()).mul(scaling), (*shape[:-1], lora_B.shape[0]))
        ctx.save_for_backward(x2, lora_A, lora_B, xa)
        ctx.scaling, ctx.p, ctx.seed, ctx.in_shape = scaling, p, seed, shape
        return out

    @staticmethod
    @_exact_dtypes
    def backward(ctx, grad_out):
        x2, lora_A, lora_B, xa = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(xa.dtype)
        need = ctx.needs_input_grad
        grad_x, grad_A, grad_B = _lora_grads(ctx, g, x2, lora_A, lora_B, xa, need[0], need[1], need[2])
        if grad_x is not None:
            grad_x = grad_x.to(x2.dtype).reshape(ctx.in_shape)
        return grad_x, grad_A, grad_B, None, None, None


class DequantLoraLinearFunction(torch.autograd.Function):
    """y = x·deq(W)ᵀ + b + s·(D(x) Aᵀ) Bᵀ for a frozen quantized base, in one autograd function.

    The base term and its input gradient come from the base's backend (:mod:`peftlab.backends.quant.base`:
    ``forward`` and ``input_grad``; bitsandbytes 4-bit, torchao, FP8 block-scaled), never a library type.

    The dense W (d_out, d_in) exists only inside forward and inside backward (dequantized again there, as
    bitsandbytes' own backward does), so no dense weight outlives a layer. Against the generic path
    (the base layer's own forward, the LoRA branch, their sum; in backward, two input gradients summed)
    it saves one full-size add and one full-size gradient accumulation per layer and direction: the LoRA
    term goes into the base GEMM's output (addmm_) and the LoRA input gradient into dX = dY·W (addmm).
    The GEMM runs in the layer's compute dtype as ``Linear4bit`` does. Saves x and xa only.
    """

    @staticmethod
    @_exact_dtypes
    def forward(ctx, x, lora_A, lora_B, scaling: float, p: float, seed: int, base):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        backend = backend_of(base)
        dtype = backend.compute_dtype(base, x)
        y = backend.forward(base, x.to(dtype))  # (..., d_out): F.linear's result itself, not a view
        xa, scaling = _lora_down(x2, lora_A, scaling, p, seed)
        if y.dtype == xa.dtype:
            _rows(y).addmm_(xa, _as(lora_B, xa.dtype).t(), alpha=scaling)
        else:
            y = y.float()
            _rows(y).add_((xa @ lora_B.t()).float(), alpha=scaling)
        ctx.save_for_backward(x2, lora_A, lora_B, xa)
        ctx.scaling, ctx.p, ctx.seed, ctx.base, ctx.dtype, ctx.in_shape = scaling, p, seed, base, dtype, shape
        ctx.backend = backend
        return y.to(x.dtype)

    @staticmethod
    @_exact_dtypes
    def backward(ctx, grad_y):
        x2, lora_A, lora_B, xa = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])
        need = ctx.needs_input_grad
        g_lora = _as(g, xa.dtype)
        grad_lora_x, grad_A, grad_B = _lora_grads(ctx, g_lora, x2, lora_A, lora_B, xa, need[0], need[1], need[2])
        grad_x = None
        if need[0]:
            base_grad = ctx.backend.input_grad(ctx.base, g.to(ctx.dtype))
            if grad_lora_x.dtype == base_grad.dtype:
                grad_x = base_grad.add_(grad_lora_x)
            else:
                grad_x = base_grad.float().add_(grad_lora_x.float())
            grad_x = grad_x.to(x2.dtype).reshape(ctx.in_shape)
        return grad_x, grad_A, grad_B, None, None, None, None


def _plain_weight(base: nn.Module) -> torch.Tensor | None:
    """(out, in) weight of a plain float linear whose weight is frozen; None otherwise."""
    weight = getattr(base, "weight", None)
    if (type(base) is nn.Linear and backend_of(base) is None) or is_conv1d(base):  # not a torchao tensor
        if weight is not None and weight.is_floating_point() and not weight.requires_grad:
            return weight.t() if is_conv1d(base) else weight
    return None


def _use_triton(slot, x: torch.Tensor) -> bool:
    if slot.use_kernel == "torch" or not x.is_cuda:
        if slot.use_kernel == "triton" and not x.is_cuda:
            raise RuntimeError("use_kernel='triton' needs CUDA tensors; use 'auto' or 'torch' on the CPU")
        return False
    available = triton_available()
    if slot.use_kernel == "triton" and not available:
        raise RuntimeError("use_kernel='triton' but Triton is not importable; pip install 'peftlab[triton]'")
    return available


def _fusable_4bit(base: nn.Module) -> bool:
    """True for a frozen quantized base whose backend runs the fused training function (bitsandbytes 4-bit,
    torchao, FP8 block-scaled; not bitsandbytes int8, which keeps its own autograd)."""
    backend = backend_of(base)
    return backend is not None and backend.fusable(base)


def _native_inference(base: nn.Module, x: torch.Tensor) -> bool:
    """False when a quantized base's own forward cannot run on x's device (FP8 kernels on a CPU)."""
    backend = backend_of(base)
    return backend is None or backend.native_inference(base, x)


def lora_forward(slot, x: torch.Tensor) -> torch.Tensor:
    """base(x) + LoRA of a slot that runs alone on its layer (the fast path).

    ``slot``: anything with ``base_layer``, ``lora_A`` (r, d_in), ``lora_B`` (d_out, r), ``scaling``,
    ``dropout_p``, ``training`` and ``use_kernel`` (a :class:`~peftlab.methods.lora.LoraSlot`, or the stacked
    view of a residual slot); x (..., d_in) -> (..., d_out).
    """
    base = slot.base_layer
    weight = _plain_weight(base)
    p = slot.dropout_p if slot.training else 0.0
    autocast = _autocast_dtype(x) if weight is not None else None
    if autocast is not None and weight.dtype != autocast:  # as nn.Linear under autocast: GEMM in the autocast dtype
        with torch.autocast(x.device.type, enabled=False):  # (the fused kernel too: not fp32 under bf16 autocast)
            x, weight = x.to(autocast), weight.to(autocast)
    if weight is not None and weight.dtype == x.dtype and _use_triton(slot, x):
        y = lora_linear_or_none(x, weight, base.bias, slot.lora_A, slot.lora_B, slot.scaling, p,
                                strict=slot.use_kernel == "triton")
        if y is not None:
            return y
    seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else 0  # the mask is regenerated from it
    if weight is not None and weight.dtype == x.dtype:
        return LoraLinearFunction.apply(
            x, weight, base.bias, slot.lora_A, slot.lora_B, slot.scaling, p, seed
        )
    if weight is None and _fusable_4bit(base) and (
        (slot.training and torch.is_grad_enabled()) or not _native_inference(base, x)
    ):
        # quantized base in training: the backend's frozen forward and input gradient inside one function
        # (inference keeps the library's own kernels, e.g. bitsandbytes' 4-bit gemv, where they run)
        return DequantLoraLinearFunction.apply(x, slot.lora_A, slot.lora_B, slot.scaling, p, seed, base)
    # generic path (int8, trainable or other bases): the base layer's own forward + the LoRA branch
    result = base(x)
    lora = LoraBranchFunction.apply(x, slot.lora_A, slot.lora_B, slot.scaling, p, seed)
    return (result + lora).to(result.dtype)


def lora_delta(slot, x: torch.Tensor, scaling: float) -> torch.Tensor:
    """The LoRA branch alone, ``scaling · (D(x) Aᵀ) Bᵀ`` (lean: saves x and xa, regenerates the mask).

    Used when a slot is not the only one running (several active adapters, weighted combination).
    """
    p = slot.dropout_p if slot.training else 0.0
    seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else 0
    return LoraBranchFunction.apply(x, slot.lora_A, slot.lora_B, scaling, p, seed)


def lora_dropout_input(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """(x ⊙ m, 1/(1-p)): the dropped input of :func:`lora_forward` / :func:`lora_delta` for x (..., d_in), the
    mask drawn as they draw it (one seed from the CPU generator, the mask of x's flattened (M, d_in) shape)."""
    seed = int(torch.randint(0, 2**62, (1,)).item())
    drop = _dropout_drop((x.numel() // x.shape[-1], x.shape[-1]), p, seed, x.device).view(x.shape)
    return x.masked_fill(drop, 0), 1.0 / (1.0 - _effective_p(p))


# ---- memory accounting rules: peftlab.estimator counts with these; tests/estimator/test_estimate.py checks them ----------
# ---- against what the autograd functions above actually save (keep the two in step) ---------------------------


def lora_saved_bytes(m: int, d_in: int, r: int, x_bytes: int, a_bytes: int) -> dict[str, int]:
    """What :class:`LoraLinearFunction` and :class:`LoraBranchFunction` save for backward besides parameters.

    x: (M, d_in) in the input dtype (a view of the layer input: shared with any other op that saves it) and
    xa = D(x) Aᵀ: (M, r) in :func:`lora_dtype` (``a_bytes``). The dropout mask is regenerated from a seed,
    so p > 0 adds nothing.
    """
    return {"x": m * d_in * x_bytes, "xa": m * r * a_bytes}


def lora_gemm_outputs(m: int, d_out: int, r: int, out_bytes: int, a_bytes: int, fused_base: bool) -> int:
    """Bytes of the GEMM outputs of one LoRA forward (what selective checkpointing keeps, see peftlab.training.memory).

    Fused path (plain float base, :class:`LoraLinearFunction`; 4-bit base in training,
    :class:`DequantLoraLinearFunction`): y = x Wᵀ (M, d_out), into which the LoRA term is added in place
    (addmm_), and xa (M, r). Generic path (int8 base): the base layer's own GEMM output (M, d_out), xa, and
    the branch output xa Bᵀ (M, d_out) in A's dtype.
    """
    if fused_base:
        return m * d_out * out_bytes + m * r * a_bytes
    return m * d_out * out_bytes + m * r * a_bytes + m * d_out * a_bytes
