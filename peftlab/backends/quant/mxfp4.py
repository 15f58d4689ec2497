r"""MXFP4 (OCP microscaling FP4, GPT-OSS's format) as a frozen LoRA base.

A weight (d_out, d_in) is cut along d_in into blocks of 32 values; each block stores 32 FP4 **e2m1** codes
(1 sign, 2 exponent, 1 mantissa bit: magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}) and one shared **e8m0**
scale byte s (a power of two, 2^(s − 127)):

    Ŵ_ij = e2m1(code_ij) · 2^(s_{i, j // 32} − 127)

Layout as GPT-OSS checkpoints store ``*_blocks`` / ``*_scales`` (transformers' ``integrations/mxfp4.py``):
``weight`` (d_out, G · 16) uint8, G = ⌈d_in / 32⌉ (the checkpoint's (d_out, G, 16) blocks, kept 2-D so that
no expert-stack logic mistakes it for a 3-D MoE parameter), element 2t in the low and element 2t + 1 in the high
nibble of byte t; code bit 3 is the sign, bits 0–2 index the magnitude; ``weight_scale`` (d_out, G) uint8, the biased
exponent. 4 + 8/32 = 4.25 bits per weight. A d_in that is not a multiple of 32 is zero-padded in the last block.

Quantizing (:func:`quantize_mxfp4`) picks each block's scale among the two powers of two around amax / 6 (the
OCP rule and the round-up rule of the triton kernels GPT-OSS was converted with), whichever stores the block with
the smaller squared error, and rounds each value to the nearest e2m1 level, ties to the even code. :class:`Mxfp4Linear` (an ``nn.Linear`` subclass, so HF
PEFT wraps it as a plain linear) dequantizes in its forward, on any device; the LoRA ops dequantize inside their
autograd function, one layer at a time, so no dense copy outlives its layer.
"""

from __future__ import annotations

import torch
from torch import nn

from ...util.errors import ConfigError
from .base import QuantBackend, register_backend

BLOCK = 32
#: e2m1 magnitudes by the code's low 3 bits (bit 3 is the sign).
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E8M0_BIAS = 127


def _lut(device, dtype=torch.float32) -> torch.Tensor:
    """The 16 code values: codes 0-7 positive, 8-15 their negatives (−0 for code 8)."""
    mags = torch.tensor(E2M1, dtype=dtype, device=device)
    return torch.cat([mags, -mags])


def _codes(weight: torch.Tensor) -> torch.Tensor:
    """(d_out, G·32) codes 0..15 of packed ``weight`` (d_out, G·16)."""
    lo, hi = weight & 15, weight >> 4
    return torch.stack([lo, hi], dim=-1).reshape(weight.shape[0], -1)


def _scale_grid(scale: torch.Tensor, d_in: int) -> torch.Tensor:
    """(d_out, d_in) per-element power-of-two scale of the e8m0 bytes ``scale`` (d_out, G) (a temporary)."""
    exp = scale.to(torch.int32) - E8M0_BIAS
    return torch.ldexp(torch.ones(exp.shape, device=scale.device), exp).repeat_interleave(BLOCK, 1)[:, :d_in]


def dequantize_mxfp4(weight: torch.Tensor, scale: torch.Tensor, d_in: int, dtype=torch.float32) -> torch.Tensor:
    """Dense (d_out, d_in) weight of packed ``weight`` (d_out, G·16) and e8m0 ``scale`` (d_out, G); exact in
    fp32 and bf16 (a 2-bit significand times a power of two)."""
    values = _lut(weight.device)[_codes(weight).long()][:, :d_in]
    return (values * _scale_grid(scale, d_in)).to(dtype)


def _encode(values: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 of values already divided by their scale (|v| ≤ 6): nearest e2m1 level, ties to the even
    code (the one with a zero mantissa bit); a value rounding to zero gets code 0, so a requantization of the
    same values stores the same bytes."""
    mags = torch.tensor(E2M1, device=values.device)
    mids = (mags[1:] + mags[:-1]) / 2
    a = values.abs().contiguous()
    k = torch.bucketize(a, mids)  # a == mids[i] -> i (the lower level): a tie
    tie = (k < len(mids)) & (a == mids[k.clamp_max(len(mids) - 1)]) & (k % 2 == 1)
    k = k + tie.long()
    return (k + 8 * ((values < 0) & (k > 0)).long()).to(torch.uint8)  # zero is always code 0 (never −0)


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """(d_out, G·16) uint8 of codes (d_out, G·32)."""
    pairs = codes.reshape(codes.shape[0], -1, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()


def _candidate(blocks: torch.Tensor, exp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (d_out, G·32), squared error per block (d_out, G)) of ``blocks`` (d_out, G, 32) with the block
    scales 2^exp (d_out, G); values above 6 · scale saturate to ±6."""
    scale = torch.ldexp(torch.ones_like(blocks[..., 0]), exp)
    codes = _encode((blocks / scale[..., None]).clamp(-6.0, 6.0).reshape(blocks.shape[0], -1))
    values = _lut(blocks.device)[codes.long()].view_as(blocks) * scale[..., None]
    return codes, (values - blocks).square().sum(-1)


@torch.no_grad()
def quantize_mxfp4(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed weight (d_out, G·16) uint8, e8m0 scale (d_out, G) uint8) of dense (d_out, d_in).

    Each block's scale is the one of two powers of two that stores the block with the smaller squared error:
    2^(⌊log2 amax⌋ − 2) (the OCP MX rule: amax / scale in [4, 8), values above 6 · scale saturate) or the next
    one up, 2^⌈log2(amax / 6)⌉ when it differs (the round-up rule of the triton kernels GPT-OSS was converted with:
    nothing saturates). Besides a lower error than either rule alone, this keeps a merge stable: W + ΔW with a
    small ΔW keeps the block scales of W, where a round-up rule alone doubles a block's scale as soon as ΔW pushes
    its largest value past 6 · scale.
    """
    d_out, d_in = dense.shape
    groups = -(-d_in // BLOCK)
    padded = dense.float().new_zeros(d_out, groups * BLOCK)
    padded[:, :d_in] = dense.float()
    blocks = padded.view(d_out, groups, BLOCK)
    amax = blocks.abs().amax(dim=-1)
    mant, exp = torch.frexp(amax)  # amax = mant · 2^exp, mant in [0.5, 1): ⌊log2 amax⌋ = exp − 1
    low = (exp - 3).clamp(-E8M0_BIAS, E8M0_BIAS)
    high = (low + 1).clamp_max(E8M0_BIAS)
    codes_low, err_low = _candidate(blocks, low)
    codes_high, err_high = _candidate(blocks, high)
    pick_low = (err_low < err_high) | (amax == 0)
    exp = torch.where(pick_low, low, high)
    codes = torch.where(pick_low.repeat_interleave(BLOCK, 1), codes_low, codes_high)
    return _pack(codes), (exp + E8M0_BIAS).to(torch.uint8)


class Mxfp4Linear(nn.Linear):
    """A frozen linear holding an MXFP4 weight (the GPT-OSS layout, see the module docstring); its forward
    dequantizes, on any device. An ``nn.Linear`` subclass so that HF PEFT targets it as a plain linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        groups = -(-in_features // BLOCK)
        self.weight = nn.Parameter(
            torch.zeros(out_features, groups * BLOCK // 2, dtype=torch.uint8, device=device), requires_grad=False
        )
        self.weight_scale = nn.Parameter(
            torch.full((out_features, groups), E8M0_BIAS, dtype=torch.uint8, device=device), requires_grad=False
        )
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    def dense_weight(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_mxfp4(self.weight, self.weight_scale, self.in_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.dense_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mxfp4 (e2m1, 32-blocks, e8m0)"


class Mxfp4Backend(QuantBackend):
    name = "mxfp4"
    schemes = ("mxfp4",)

    def owns(self, module: nn.Module) -> bool:
        return isinstance(module, Mxfp4Linear)

    def scheme(self, module):
        return "mxfp4"

    def check_options(self, scheme, opts):
        super().check_options(scheme, opts)
        if opts.get("bits", 4) != 4:
            raise ConfigError(f"backend 'mxfp4' stores 4-bit (e2m1) weights; bits must be 4, got {opts['bits']!r}")

    def quantize_linear(self, weight, bias, scheme, opts):
        device = torch.device(opts.get("device") or weight.device)
        d_out, d_in = weight.shape
        with torch.device("meta"):
            layer = Mxfp4Linear(d_in, d_out, bias=bias is not None)
        q, scale = quantize_mxfp4(weight.to(device))
        layer.weight = nn.Parameter(q, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(device, opts.get("dtype") or torch.float32), requires_grad=False)
        return layer

    def dequantize(self, module):
        return module.dense_weight()

    def forward(self, module, x2):
        return module(x2)

    def input_grad(self, module, g):
        return g @ module.dense_weight(g.dtype)

    def fusable(self, module):
        bias = module.bias
        return bias is None or not bias.requires_grad

    def requantize(self, module, dense):
        q, scale = quantize_mxfp4(dense)
        module.weight = nn.Parameter(q, requires_grad=False)
        module.weight_scale = nn.Parameter(scale, requires_grad=False)

    def snapshot(self, module):
        return {"weight": module.weight, "weight_scale": module.weight_scale}

    def rounding_grid(self, module):
        scale = _scale_grid(module.weight_scale, module.in_features)
        return scale, _lut(scale.device).unique()  # sorted; ±0 collapse into one

    def write_levels(self, module, codes):
        _, levels = self.rounding_grid(module)
        d_out, groups = module.weight_scale.shape
        values = levels[codes]
        padded = values.new_zeros(d_out, groups * BLOCK)
        padded[:, : module.in_features] = values
        module.weight.data.copy_(_pack(_encode(padded)))

    def weight_bytes(self, module):
        return module.weight.numel() + module.weight_scale.numel()

    def bytes_for(self, d_out, d_in, scheme="mxfp4", **opts):
        return d_out * -(-d_in // BLOCK) * (BLOCK // 2 + 1)


MXFP4_BACKEND = register_backend(Mxfp4Backend())
