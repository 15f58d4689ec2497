r"""The torchao backend: PyTorch's own quantized tensors as frozen LoRA bases.

Schemes (``peftlab.quantize(model, backend="torchao", scheme=...)``):

* ``"int8"``: int8 weight-only, ``Int8WeightOnlyConfig``: per-row symmetric, ``Ŵ_ij = q_ij · s_i``, q in
  [−128, 127] (8 bits + 40/d_in bits per weight: an fp32 scale and an int8 zero point per row). CPU and CUDA.
* ``"int4"``: int4 weight-only, groups of ``group_size`` along d_in with a scale and a zero point each
  (``Ŵ = (q − 8) · s + z``, tinygemm's asymmetric form; 4 bits + 64/group_size bits per weight). On a CPU
  the packed layout of ``aten._weight_int4pack_mm_for_cpu`` (torchao's ``Int4OpaqueTensor``); on CUDA
  ``Int4WeightOnlyConfig`` (tile-packed, bf16). The CPU layout has no dequantize and no backward in torchao, so
  :meth:`TorchAoBackend.dequantize` unpacks it itself (:func:`_unpack_cpu_int4`; the row-block size, which
  depends on the CPU's vector width, is found once by packing a probe), or, if no known layout fits, reads
  the dense weight through the packed kernel: ``Ŵᵀ = I · Ŵᵀ`` (exact: each output is one weight times 1 plus
  zeros), a temporary costing one d_in × d_in × d_out GEMM. The accurate merge re-rounds the CPU layout on
  the plain requantization's group scales and zero points (levels q − 8, offset Z: :meth:`rounding_offset`)
  and packs the chosen q with ``aten._convert_weight_to_int4pack_for_cpu``, as torchao's ``from_hp`` does.
* ``"float8"``: float8 e4m3 weights with per-row scales and dynamically quantized float8 activations
  (``Float8DynamicActivationFloat8WeightConfig``). CUDA with compute capability 8.9 or later only (H100, L4,
  RTX 40xx); refused elsewhere with a clear error. Not tested on this project's CPU runners.

The LoRA ops run the layer's own quantized GEMM for the forward and ``dY · Ŵ`` (dequantized per call) for
the input gradient, inside one autograd function (:mod:`peftlab.backends.lora_ops`), so no dense weight
outlives its layer. A model quantized by transformers (``TorchAoConfig``) holds the same tensors and wraps
as it is.
"""

from __future__ import annotations

import functools
import importlib.util
import sys

import torch
from torch import nn

from ...util.errors import ConfigError
from .base import MissingDependencyError, QuantBackend, register_backend

INSTALL_HINT = "pip install torchao (peftlab is tested with torchao 0.18)"
INT4_GROUP_SIZES = (32, 64, 128, 256)


@functools.lru_cache(maxsize=1)
def torchao_available() -> bool:
    return importlib.util.find_spec("torchao") is not None


def require_torchao():
    if not torchao_available():
        raise MissingDependencyError(f"the torchao backend needs torchao, which is not installed: {INSTALL_HINT}")
    import torchao

    return torchao


def _is_ao_tensor(t) -> bool:
    if t is None or "torchao" not in sys.modules:
        return False
    from torchao.utils import TorchAOBaseTensor

    return isinstance(t, TorchAOBaseTensor)


def _int4_cpu(weight) -> bool:
    return type(weight).__name__ == "Int4OpaqueTensor"


def _float8_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)


def _config(scheme: str, group_size: int, device: torch.device):
    require_torchao()
    if scheme == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return Int8WeightOnlyConfig()
    if scheme == "int4":
        if device.type == "cpu":
            from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

            return PrototypeInt4WeightOnlyConfig(group_size=group_size, set_inductor_config=False)
        from torchao.quantization import Int4WeightOnlyConfig

        return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")
    if not _float8_supported(device):
        raise ConfigError(
            "torchao float8 (weight and dynamic activation) needs a CUDA GPU with compute capability 8.9 or later "
            f"(H100, L4, RTX 40xx); got device {device}. Use scheme 'int8' or 'int4' here"
        )
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def _unpack_cpu_int4(packed: torch.Tensor, n: int, k: int, block_n: int) -> torch.Tensor:
    """The (n, k) int4 values 0..15 of ``aten._convert_weight_to_int4pack_for_cpu``'s layout: rows in blocks of
    ``block_n`` (the CPU's vector width: 64 with AVX-512, 32 with AVX2), each stored column-major with row d in
    the low and row d + block_n/2 in the high nibble; a last, shorter block pairs rows (2d, 2d + 1)."""
    flat = packed.reshape(-1)
    full = n // block_n
    parts = []
    if full:
        blk = flat[: full * k * block_n // 2].view(full, k, block_n // 2)
        vals = torch.cat([blk & 15, blk >> 4], dim=-1)  # (full, k, block_n)
        parts.append(vals.permute(0, 2, 1).reshape(full * block_n, k))
    rest = n - full * block_n
    if rest:
        blk = flat[full * k * block_n // 2 : full * k * block_n // 2 + k * rest // 2].view(k, rest // 2)
        parts.append(torch.stack([blk & 15, blk >> 4], dim=-1).view(k, rest).t())
    return torch.cat(parts) if len(parts) > 1 else parts[0]


@functools.lru_cache(maxsize=1)
def _cpu_int4_block_n() -> int | None:
    """The row-block size of this CPU's int4 packing, found by packing a probe once; None if no known layout fits
    (then :meth:`TorchAoBackend.dequantize` reads the weight through the kernel instead)."""
    gen = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 16, (160, 64), dtype=torch.int32, generator=gen)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    for block_n in (64, 32, 16):
        try:
            if torch.equal(_unpack_cpu_int4(packed, 160, 64, block_n).to(torch.int32), probe):
                return block_n
        except RuntimeError:
            continue
    return None


class TorchAoBackend(QuantBackend):
    name = "torchao"
    schemes = ("int8", "int4", "float8")
    install_hint = INSTALL_HINT

    def available(self) -> bool:
        return torchao_available()

    def owns(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and _is_ao_tensor(module.__dict__.get("_parameters", {}).get("weight"))

    def scheme(self, module: nn.Module) -> str:
        kind = type(module.weight).__name__
        if kind.startswith("Int8"):
            return "int8"
        if kind.startswith("Int4"):
            return "int4"
        if kind.startswith("Float8"):
            return "float8"
        return kind

    def check_options(self, scheme: str, opts: dict) -> None:
        super().check_options(scheme, opts)
        if scheme == "int4" and opts.get("group_size", 64) not in INT4_GROUP_SIZES:
            raise ConfigError(f"torchao int4 group_size must be one of {INT4_GROUP_SIZES}, got {opts.get('group_size')!r}")
        require_torchao()

    def _quantized_weight(self, dense: torch.Tensor, scheme: str, group_size: int, dtype: torch.dtype):
        from torchao.quantization import quantize_

        d_out, d_in = dense.shape
        if scheme == "int4" and d_out % 16:
            raise ConfigError(f"torchao int4 needs out_features divisible by 16, got {d_out}; skip the layer (skip_modules)")
        if scheme == "int4" and d_in % group_size:
            raise ConfigError(
                f"torchao int4 needs in_features divisible by group_size: {d_in} is not a multiple of {group_size}; "
                f"pick group_size from {INT4_GROUP_SIZES} dividing it, or skip the layer (skip_modules)"
            )
        with torch.device("meta"):
            holder = nn.Linear(d_in, d_out, bias=False)
        holder.weight = nn.Parameter(dense.detach().to(dtype).contiguous(), requires_grad=False)
        quantize_(holder, _config(scheme, group_size, dense.device))
        weight = holder.weight
        weight.requires_grad_(False)
        return weight

    def quantize_linear(self, weight, bias, scheme, opts):
        device = torch.device(opts.get("device") or weight.device)
        dtype = opts.get("compute_dtype") or opts.get("dtype") or torch.float32
        group_size = opts.get("group_size", 64)
        d_out, d_in = weight.shape
        with torch.device("meta"):
            layer = nn.Linear(d_in, d_out, bias=bias is not None)
        layer.weight = self._quantized_weight(weight.to(device), scheme, group_size, dtype)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(device, dtype), requires_grad=False)
        layer.peftlab_torchao = {"scheme": scheme, "group_size": group_size}
        return layer

    def _settings(self, module) -> tuple[str, int, torch.dtype]:
        info = getattr(module, "peftlab_torchao", None) or {}
        scheme = info.get("scheme") or self.scheme(module)
        block = getattr(module.weight, "block_size", None)
        group_size = info.get("group_size") or (int(block[-1]) if block is not None else 64)
        return scheme, group_size, module.weight.dtype

    def _int4_parts(self, weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(q (d_out, d_in) int4 values 0..15, per-element scale S and zero point Z (d_out, d_in) fp32) of a CPU
        int4 weight, ``Ŵ = (q − 8) · S + Z``; None for a layout we cannot unpack (an unknown row-block size,
        an activation pre-scale, or the DA8W4 packing)."""
        block_n = _cpu_int4_block_n()
        if block_n is None or weight.act_pre_scale is not None or getattr(weight, "act_mapping_type", None):
            return None
        d_out, d_in = weight.shape
        q = _unpack_cpu_int4(weight.qdata, weight.qdata.shape[0], d_in, block_n)[:d_out]
        group = weight.block_size[1]
        sz = weight.scale_and_zero[:, :d_out].float()  # (d_in / group, d_out, 2): scale, zero
        scale = sz[..., 0].t().repeat_interleave(group, 1)
        zero = sz[..., 1].t().repeat_interleave(group, 1)
        return q, scale, zero

    def dequantize(self, module):
        weight = module.weight
        if _int4_cpu(weight):
            d_out, d_in = weight.shape
            dtype = weight.scale_and_zero.dtype
            parts = self._int4_parts(weight)
            if parts is not None:
                q, scale, zero = parts
                return torch.addcmul(zero, q.float() - 8, scale).to(dtype)  # the kernel's own fused multiply-add
            eye = torch.eye(d_in, dtype=dtype, device=weight.qdata.device)
            cols = torch.ops.aten._weight_int4pack_mm_for_cpu(
                eye, weight.qdata, weight.block_size[1], weight.scale_and_zero
            )
            return cols[:, :d_out].t().contiguous()
        return weight.dequantize()

    def compute_dtype(self, module, x):
        return module.weight.dtype

    def forward(self, module, x2):
        bias = None if module.bias is None else module.bias.to(x2.dtype)
        return torch.nn.functional.linear(x2, module.weight, bias)

    def requantize(self, module, dense):
        scheme, group_size, dtype = self._settings(module)
        module.weight = self._quantized_weight(dense, scheme, group_size, dtype)

    # -- accurate requantization: the grid of the stored weight ---------------------------------------
    def rounding_grid(self, module):
        weight = module.weight
        if _int4_cpu(weight):  # Ŵ = (q − 8) · S + Z: levels −8..7 on the group scales, offset Z (rounding_offset)
            parts = self._int4_parts(weight)
            if parts is None:
                return None
            return parts[1], torch.arange(-8, 8, dtype=torch.float32, device=parts[1].device)
        if type(weight).__name__ != "Int8Tensor" or weight.qdata.shape != weight.shape:
            return None
        scale = weight.scale.float().expand(weight.shape) if weight.scale.dim() == 2 else None
        if scale is None:
            return None
        return scale, torch.arange(-128, 128, dtype=torch.float32, device=scale.device)  # torchao: [-128, 127]

    def rounding_offset(self, module):
        weight = module.weight
        parts = self._int4_parts(weight) if _int4_cpu(weight) else None
        return None if parts is None else parts[2]

    def write_levels(self, module, codes):
        weight = module.weight
        if _int4_cpu(weight):  # level k is q − 8 with q = k: pack q as torchao's from_hp does
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
            weight.qdata.copy_(packed.view_as(weight.qdata))
            return
        weight.qdata.copy_((codes - 128).to(torch.int8))

    def weight_bytes(self, module):
        weight = module.weight
        names = list(getattr(weight, "tensor_data_names", [])) + list(getattr(weight, "optional_tensor_data_names", []))
        tensors = [getattr(weight, n, None) for n in names]
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

    def bytes_for(self, d_out, d_in, scheme, group_size=64, **opts):
        n = d_out * d_in
        if scheme == "int8":
            return n + 5 * d_out  # fp32 row scale and an int8 row zero point (0: symmetric)
        if scheme == "float8":
            return n + 4 * d_out
        return -(-n // 2) + d_out * -(-d_in // group_size) * 2 * 4


TORCHAO = register_backend(TorchAoBackend())
