"""The bitsandbytes backend: LLM.int8 (``Linear8bitLt``) and 4-bit NF4/FP4 (``Linear4bit``) behind
:class:`~peftlab.backends.quant.base.QuantBackend`. The layer code itself is :mod:`peftlab.backends.quant.bnb`,
unchanged; this module only answers the interface with it.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import QuantBackend, register_backend
from .bnb import (
    bnb_available,
    check_quant_args,
    dequantize_weight,
    fusable_4bit,
    is_bnb_linear,
    make_4bit_linear,
    make_8bit_linear,
    quant_bits,
    requantize_weight,
    require_bnb,
)


def _absmax(state) -> torch.Tensor:
    """The fp32 per-block absmax of a 4-bit quant state (double quantization undone)."""
    if getattr(state, "nested", False):
        bnb = require_bnb()
        return bnb.functional.dequantize_blockwise(state.absmax, state.state2).float() + state.offset
    return state.absmax.float()


class BitsAndBytesBackend(QuantBackend):
    name = "bitsandbytes"
    schemes = ("nf4", "fp4", "int8")
    install_hint = "pip install 'peftlab[quant]' (or pip install bitsandbytes)"

    def available(self) -> bool:
        return bnb_available()

    def owns(self, module: nn.Module) -> bool:
        return is_bnb_linear(module)

    def scheme(self, module: nn.Module) -> str:
        if quant_bits(module) == 8:
            return "int8"
        return getattr(module.weight, "quant_type", None) or "nf4"

    def check_options(self, scheme: str, opts: dict) -> None:
        super().check_options(scheme, opts)
        check_quant_args(8 if scheme == "int8" else 4, scheme if scheme != "int8" else "nf4", opts.get("blocksize", 64))

    def quantize_linear(self, weight, bias, scheme, opts):
        if scheme == "int8":
            return make_8bit_linear(
                weight, bias, threshold=opts.get("int8_threshold", 6.0), device=opts.get("device"),
                bias_dtype=opts.get("compute_dtype") or opts.get("dtype"),
            )  # fmt: skip
        return make_4bit_linear(
            weight, bias, quant_type=scheme, double_quant=opts.get("double_quant", True),
            compute_dtype=opts.get("compute_dtype"), blocksize=opts.get("blocksize", 64), device=opts.get("device"),
        )  # fmt: skip

    def dequantize(self, module):
        return dequantize_weight(module)

    def compute_dtype(self, module, x):
        return getattr(module, "compute_dtype", None) or x.dtype

    def fusable(self, module):
        return fusable_4bit(module)  # int8 keeps bitsandbytes' own forward and backward

    def requantize(self, module, dense):
        requantize_weight(module, dense)

    def snapshot(self, module):
        if quant_bits(module) == 8:
            return {"weight": module.weight, "state": module.state}
        return {"weight": module.weight, "quant_state": getattr(module, "quant_state", None)}

    # -- accurate requantization: the grid of the stored weight ---------------------------------------
    def rounding_grid(self, module):
        d_out, d_in = module.out_features, module.in_features
        if quant_bits(module) == 8:
            scb = module.weight.SCB if getattr(module.weight, "SCB", None) is not None else module.state.SCB
            scale = (scb.float() / 127.0)[:, None].expand(d_out, d_in)
            return scale, torch.arange(-127, 128, dtype=torch.float32, device=scb.device)
        weight = module.weight
        state = weight.quant_state
        if weight.data.dtype != torch.uint8 or getattr(state, "packing_format_for_cpu", False):
            return None
        absmax = _absmax(state)
        n = d_out * d_in
        scale = absmax.repeat_interleave(state.blocksize)[:n].view(d_out, d_in)
        code = state.code.float()
        levels = code.unique()  # sorted; FP4's +0 / -0 collapse into one level
        # index into the sorted levels -> the first code index holding that value
        order = (code[None, :] == levels[:, None]).float().argmax(1)
        module._peftlab_level_order = order
        return scale, levels

    def write_levels(self, module, codes):
        if quant_bits(module) == 8:
            cb = (codes - 127).to(torch.int8)
            module.weight.data.copy_(cb)
            if getattr(module.weight, "CB", None) is not None and module.weight.CB is not module.weight.data:
                module.weight.CB.copy_(cb)
            return
        order = module.__dict__.pop("_peftlab_level_order")
        idx = order.to(codes.device)[codes].flatten().to(torch.uint8)
        if idx.numel() % 2:
            idx = torch.cat([idx, idx.new_zeros(1)])
        packed = (idx[0::2] << 4) | idx[1::2]
        module.weight.data.copy_(packed.view_as(module.weight.data))

    # -- bytes -----------------------------------------------------------------------------------------
    def weight_bytes(self, module):
        weight = module.weight
        if quant_bits(module) == 8:
            scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
            return weight.numel() * weight.element_size() + (0 if scb is None else scb.numel() * scb.element_size())
        total = weight.numel() * weight.element_size()
        state = weight.quant_state
        extra = [state.absmax, state.code, getattr(state, "offset", None)]
        if getattr(state, "state2", None) is not None:
            extra += [state.state2.absmax, state.state2.code]
        return total + sum(t.numel() * t.element_size() for t in extra if isinstance(t, torch.Tensor))

    def bytes_for(self, d_out, d_in, scheme, double_quant=True, blocksize=64, **opts):
        n = d_out * d_in
        if scheme == "int8":
            return n + 4 * d_out
        blocks = -(-n // blocksize)
        absmax = blocks + 4 * -(-blocks // 256) + 256 * 4 if double_quant else 4 * blocks
        return -(-n // 2) + absmax


BITSANDBYTES = register_backend(BitsAndBytesBackend())
