r"""bitsandbytes linear layers: build them from a float weight, read them back, requantize.

Two storage formats (Dettmers et al.):

* **LLM.int8** (arXiv:2208.07339), :class:`bitsandbytes.nn.Linear8bitLt`: row-wise absmax
  int8. For W (d_out, d_in): ``s_i = max_j |W_ij|``, ``C_ij = round(127 · W_ij / s_i)``,
  dequantized ``Ŵ_ij = C_ij · s_i / 127``. 8 bits + 32/d_in bits per weight.
* **QLoRA 4-bit** (arXiv:2305.14314), :class:`bitsandbytes.nn.Linear4bit`: blocks of 64
  consecutive weights share an absmax ``s_b``; each weight is the index of the nearest of 16
  levels ``q_k`` (NF4: quantiles of N(0, 1); FP4: a 4-bit float), ``Ŵ = q_k · s_b``. Double
  quantization stores the absmax values themselves in 8 bit (blocks of 256, fp32 scale), so
  the constants cost 8/64 + 32/(64·256) ≈ 0.127 instead of 32/64 = 0.5 bits per weight.

The backend interface over these layers is :class:`peftlab.backends.quant.bitsandbytes.BitsAndBytesBackend`;
merging goes through :mod:`peftlab.backends.quant.base` (requantize, measure, keep the replaced weight).
"""

from __future__ import annotations

import functools
import importlib.util
import sys

import torch
from torch import nn

from ...util.errors import ConfigError
from .base import PROBE_ROWS, MissingDependencyError, QuantizationError  # noqa: F401 (re-exported)
from .base import quiet_merge_warnings as _quiet_merge_warnings
from .bnb_cpu_fix import ensure_correct_cpu_dequantize

INSTALL_HINT = "pip install 'peftlab[quant]' (or pip install bitsandbytes)"
QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

@functools.lru_cache(maxsize=1)
def bnb_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def require_bnb():
    """Import and return bitsandbytes, or raise a clear error naming the extra to install."""
    if not bnb_available():
        raise MissingDependencyError(
            f"8-bit / 4-bit quantization needs bitsandbytes, which is not installed: {INSTALL_HINT}"
        )
    import bitsandbytes

    ensure_correct_cpu_dequantize()
    return bitsandbytes


def check_quant_args(bits: int, quant_type: str = "nf4", blocksize: int = 64) -> None:
    """Validate the user-facing quantization arguments (ConfigError says what is valid)."""
    if bits not in (4, 8) or isinstance(bits, bool):
        raise ConfigError(f"bits must be 4 (NF4/FP4) or 8 (LLM.int8), got {bits!r}")
    if bits == 4 and quant_type not in QUANT_TYPES:
        raise ConfigError(f"quant_type must be one of {QUANT_TYPES} for 4-bit, got {quant_type!r}")
    if bits == 4 and blocksize not in BLOCKSIZES:
        raise ConfigError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")


def is_bnb_linear(module: nn.Module) -> bool:
    """True for bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (and subclasses).

    Never imports bitsandbytes: if it is not imported yet, no module can be one of its layers.
    """
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None or not isinstance(module, nn.Linear):
        return False
    found = isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    if found:  # a layer quantized elsewhere (transformers' BitsAndBytesConfig) computes with a right kernel too
        ensure_correct_cpu_dequantize()
    return found


def quant_bits(module: nn.Module) -> int | None:
    """4 or 8 for a bitsandbytes linear, None for anything else."""
    if not is_bnb_linear(module):
        return None
    import bitsandbytes as bnb

    return 4 if isinstance(module, bnb.nn.Linear4bit) else 8


# ---- building ---------------------------------------------------------------------------------------


def make_4bit_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    blocksize: int = 64,
    device: torch.device | str | None = None,
) -> nn.Module:
    """A frozen ``Linear4bit`` holding ``weight`` (d_out, d_in) quantized on ``device``.

    The float weight is quantized directly (no empty float layer is allocated first); the
    bias is kept in ``compute_dtype`` (or the weight's float dtype).
    """
    bnb = require_bnb()
    d_out, d_in = weight.shape
    device = torch.device(device) if device is not None else weight.device
    with torch.device("meta"):
        layer = bnb.nn.Linear4bit(
            d_in, d_out, bias=bias is not None, compute_dtype=compute_dtype,
            compress_statistics=double_quant, quant_type=quant_type,
        )  # fmt: skip
    # bitsandbytes repacks 4-bit weights for an AVX512-BF16 CPU kernel on the first no-grad eval
    # forward: that kernel computes in bf16, drops double quantization (more memory) and has no
    # backward. Keep the standard dequantize-then-matmul path so results, memory and gradients
    # are the same in train and eval and on every CPU.
    layer.support_avx512bf16_for_cpu = False
    set_4bit_weight(layer, weight.to(device), blocksize=blocksize)
    if bias is not None:
        layer.bias = nn.Parameter(
            bias.detach().to(device, compute_dtype or _float(bias.dtype)), requires_grad=False
        )
    return layer


def set_4bit_weight(layer: nn.Module, dense: torch.Tensor, blocksize: int | None = None) -> None:
    """(Re)quantize the dense (d_out, d_in) float ``dense`` into 4-bit ``layer``, keeping its settings."""
    bnb = require_bnb()
    old = layer.weight
    quant_type = getattr(old, "quant_type", None) or layer.weight.quant_type
    blocksize = blocksize or getattr(old, "blocksize", 64)
    double = getattr(old, "compress_statistics", True)
    storage = getattr(old, "quant_storage", torch.uint8)
    packed, state = bnb.functional.quantize_4bit(
        dense.detach().contiguous(),
        blocksize=blocksize, compress_statistics=double, quant_type=quant_type, quant_storage=storage,
    )  # fmt: skip
    layer.weight = bnb.nn.Params4bit(
        packed, requires_grad=False, quant_state=state, blocksize=blocksize, compress_statistics=double,
        quant_type=quant_type, quant_storage=storage, module=layer, bnb_quantized=True,
    )  # fmt: skip
    layer.quant_state = state


def make_8bit_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: float = 6.0,
    device: torch.device | str | None = None,
    bias_dtype: torch.dtype | None = None,
) -> nn.Module:
    """A frozen ``Linear8bitLt`` (LLM.int8, outlier threshold ``threshold``) holding ``weight`` (d_out, d_in)."""
    bnb = require_bnb()
    d_out, d_in = weight.shape
    device = torch.device(device) if device is not None else weight.device
    with torch.device("meta"):
        layer = bnb.nn.Linear8bitLt(
            d_in, d_out, bias=bias is not None, has_fp16_weights=False, threshold=threshold
        )
    set_8bit_weight(layer, weight.to(device))
    if bias is not None:
        layer.bias = nn.Parameter(
            bias.detach().to(device, bias_dtype or _float(bias.dtype)), requires_grad=False
        )
    return layer


def set_8bit_weight(layer: nn.Module, dense: torch.Tensor) -> None:
    """(Re)quantize ``dense`` (d_out, d_in) into int8 ``layer`` (row-wise absmax, fresh matmul state)."""
    bnb = require_bnb()
    cb, scb, _ = bnb.functional.int8_vectorwise_quant(dense.detach().contiguous().to(torch.float16))
    layer.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    threshold = layer.state.threshold
    layer.state = bnb.MatmulLtState()
    layer.state.threshold = threshold
    layer.state.has_fp16_weights = False
    layer.state.use_pool = threshold > 0.0


def _float(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype.is_floating_point else torch.float32


# ---- reading back -----------------------------------------------------------------------------------


def dequantize_weight(layer: nn.Module) -> torch.Tensor:
    """Dense (d_out, d_in) float weight of a bitsandbytes linear (fp32 for int8; the source dtype for 4-bit)."""
    bnb = require_bnb()
    weight = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        state = weight.quant_state if getattr(weight, "quant_state", None) is not None else layer.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(weight.data, state)
            weight.data = data
        return bnb.functional.dequantize_4bit(weight.data, state)
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
    cb = weight.CB if getattr(weight, "CB", None) is not None else layer.state.CB
    if cb is None:
        cb = weight.data
    return bnb.functional.int8_vectorwise_dequant(cb, scb).float()


def fusable_4bit(module: nn.Module) -> bool:
    """True for a frozen bitsandbytes ``Linear4bit`` in the standard layout, whose dense weight
    :func:`dequantize_weight` returns without changing the layer (not repacked for a CPU kernel)."""
    import sys

    bnb = sys.modules.get("bitsandbytes")
    if bnb is None or not isinstance(module, bnb.nn.Linear4bit):
        return False
    weight = module.weight
    state = getattr(weight, "quant_state", None) or getattr(module, "quant_state", None)
    if state is None or getattr(state, "packing_format_for_cpu", False):
        return False
    return not weight.requires_grad and (module.bias is None or not module.bias.requires_grad)


def requantize_weight(layer: nn.Module, dense: torch.Tensor) -> None:
    """Write the dense (d_out, d_in) ``dense`` back into ``layer`` in its own format."""
    if quant_bits(layer) == 4:
        set_4bit_weight(layer, dense.to(dequantize_weight_dtype(layer)))
    else:
        set_8bit_weight(layer, dense)


def dequantize_weight_dtype(layer: nn.Module) -> torch.dtype:
    state = getattr(layer.weight, "quant_state", None) or layer.quant_state
    return state.dtype if not getattr(state, "packing_format_for_cpu", False) else state.original_dtype


def to_float_linear(layer: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain ``nn.Linear`` with the dequantized weight of bitsandbytes ``layer`` (frozen like it was)."""
    weight = dequantize_weight(layer)
    dtype = dtype or (
        weight.dtype if weight.dtype != torch.float16 or quant_bits(layer) == 4 else torch.float32
    )
    bias = layer.bias
    with torch.device("meta"):
        linear = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None)
    linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=bias.requires_grad)
    return linear.train(layer.training)


# ---- merge: requantize with the measured error (the shared handler of :mod:`peftlab.backends.quant.base`) ----

quiet_merge_warnings = _quiet_merge_warnings
