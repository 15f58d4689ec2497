r"""FP8 block-scaled checkpoints (DeepSeek-V3 / Qwen3 FP8, transformers' ``FineGrainedFP8Config``) as LoRA bases.

Layout (transformers' ``FP8Linear``): ``weight`` (d_out, d_in) in ``float8_e4m3fn`` and ``weight_scale_inv``
(⌈d_out/b₀⌉, ⌈d_in/b₁⌉) fp32, one scale per b₀ × b₁ block (128 × 128), with

    Ŵ_ij = weight_ij · weight_scale_inv[i // b₀, j // b₁]

(``block_size`` None: one per-tensor scale). 8 bits + 32/(b₀·b₁) bits per weight.

Any module with that pair of attributes belongs to this backend: transformers' ``FP8Linear`` as loaded from
an FP8 checkpoint, or :class:`Fp8BlockLinear`, which ``peftlab.quantize(model, backend="fp8")`` builds. The
frozen forward and the input gradient dequantize the weight inside the LoRA autograd function, one layer at
a time (no dense copy outlives its layer); on a CPU the layer's own forward does the same, since the FP8
GEMM kernels (DeepGEMM, Triton) are CUDA-only.
"""

from __future__ import annotations

import torch
from torch import nn

from ...util.errors import ConfigError
from .base import QuantBackend, register_backend

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
BLOCK = (128, 128)


def _scale_grid(scale_inv: torch.Tensor, block_size, d_out: int, d_in: int) -> torch.Tensor:
    """The (d_out, d_in) per-element scale of a block-scaled weight (a temporary)."""
    scale = scale_inv.float()
    if block_size is None or scale.numel() == 1:
        return scale.reshape(1, 1).expand(d_out, d_in)
    b0, b1 = block_size
    return scale.repeat_interleave(b0, 0)[:d_out].repeat_interleave(b1, 1)[:, :d_in]


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block_size, dtype=torch.float32) -> torch.Tensor:
    d_out, d_in = weight.shape
    return (weight.float() * _scale_grid(scale_inv, block_size, d_out, d_in)).to(dtype)


@torch.no_grad()
def quantize_fp8(dense: torch.Tensor, block_size=BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, weight_scale_inv) of dense (d_out, d_in): each block's absmax maps to 448."""
    d_out, d_in = dense.shape
    b0, b1 = block_size
    n0, n1 = -(-d_out // b0), -(-d_in // b1)
    padded = dense.float().new_zeros(n0 * b0, n1 * b1)
    padded[:d_out, :d_in] = dense.float()
    blocks = padded.view(n0, b0, n1, b1)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(n0 * b0, n1 * b1)[:d_out, :d_in].contiguous(), scale


class Fp8BlockLinear(nn.Module):
    """A frozen linear in the FineGrainedFP8 layout whose forward dequantizes (any device)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, block_size=BLOCK) -> None:
        super().__init__()
        self.in_features, self.out_features, self.block_size = in_features, out_features, tuple(block_size)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8), requires_grad=False)
        n0, n1 = -(-out_features // block_size[0]), -(-in_features // block_size[1])
        self.weight_scale_inv = nn.Parameter(torch.ones(n0, n1), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize_fp8(self.weight, self.weight_scale_inv, self.block_size, x.dtype)
        return torch.nn.functional.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}"


class Fp8Backend(QuantBackend):
    name = "fp8"
    schemes = ("fp8",)

    def owns(self, module: nn.Module) -> bool:
        weight = module.__dict__.get("_parameters", {}).get("weight")
        return (
            weight is not None and weight.dtype == FP8 and hasattr(module, "weight_scale_inv")
            and hasattr(module, "in_features")
        )  # fmt: skip

    def scheme(self, module):
        return "fp8"

    def check_options(self, scheme, opts):
        super().check_options(scheme, opts)
        block = opts.get("fp8_block", BLOCK)
        if len(tuple(block)) != 2 or min(block) < 1:
            raise ConfigError(f"fp8_block must be two positive ints (rows, cols), got {block!r}")

    def quantize_linear(self, weight, bias, scheme, opts):
        device = torch.device(opts.get("device") or weight.device)
        block = tuple(opts.get("fp8_block", BLOCK))
        d_out, d_in = weight.shape
        with torch.device("meta"):
            layer = Fp8BlockLinear(d_in, d_out, bias=bias is not None, block_size=block)
        q, scale = quantize_fp8(weight.to(device), block)
        layer.weight = nn.Parameter(q, requires_grad=False)
        layer.weight_scale_inv = nn.Parameter(scale, requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(device, opts.get("dtype") or torch.float32), requires_grad=False)
        return layer

    def _block(self, module):
        block = getattr(module, "block_size", None)
        return None if block is None else tuple(block)

    def dequantize(self, module):
        return dequantize_fp8(module.weight, module.weight_scale_inv, self._block(module))

    def native_inference(self, module, x):
        return isinstance(module, Fp8BlockLinear) or x.device.type == "cuda"

    def fusable(self, module):
        bias = getattr(module, "bias", None)
        return bias is None or not bias.requires_grad

    def requantize(self, module, dense):
        block = self._block(module)
        if block is None:
            amax = dense.abs().max().float()
            scale = (amax / FP8_MAX if amax > 0 else torch.ones_like(amax)).reshape(module.weight_scale_inv.shape)
            q = (dense.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        else:
            q, scale = quantize_fp8(dense, block)
        module.weight = nn.Parameter(q, requires_grad=False)
        module.weight_scale_inv = nn.Parameter(scale.to(module.weight_scale_inv.dtype), requires_grad=False)

    def snapshot(self, module):
        return {"weight": module.weight, "weight_scale_inv": module.weight_scale_inv}

    def rounding_grid(self, module):
        d_out, d_in = module.weight.shape
        scale = _scale_grid(module.weight_scale_inv, self._block(module), d_out, d_in)
        codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8).float()
        levels = codes[torch.isfinite(codes)].unique()  # sorted; ±0 collapse into one
        return scale, levels.to(scale.device)

    def write_levels(self, module, codes):
        _, levels = self.rounding_grid(module)
        module.weight.data.copy_(levels[codes].to(FP8))

    def weight_bytes(self, module):
        return module.weight.numel() + module.weight_scale_inv.numel() * module.weight_scale_inv.element_size()

    def bytes_for(self, d_out, d_in, scheme="fp8", fp8_block=BLOCK, **opts):
        b0, b1 = fp8_block
        return d_out * d_in + 4 * -(-d_out // b0) * -(-d_in // b1)


FP8_BACKEND = register_backend(Fp8Backend())
