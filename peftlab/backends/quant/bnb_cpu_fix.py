r"""A correct CPU 4-bit dequantization where bitsandbytes' own kernel is wrong.

bitsandbytes 0.50's AVX-512 CPU kernel for ``dequantize_4bit`` indexes the blocks of absmax row by row: on a
weight whose rows are not a whole number of blocks (d_in = 32 or 96 with blocks of 64) every block after the first
row reads another block's scale. Measured on a (32, 32) NF4 weight: a relative dequantization error of 0.32
instead of 0.09; a tiny Llama's logits moved 0.113 from fp32 instead of 0.052. Every ``Linear4bit`` forward, every
``dequantize_4bit`` call goes through that kernel, so a model quantized on such a CPU computes with wrong weights
without an error. (The quantized data itself is right: bitsandbytes' own PyTorch reference dequantizes it.)

:func:`ensure_correct_cpu_dequantize` probes the kernel once, on a tensor whose rows are half a block, against
bitsandbytes' PyTorch reference (``backends.default.ops._dequantize_4bit_compute``). Only when they differ, it
registers a CPU kernel for the op that keeps bitsandbytes' C kernel for the shapes it gets right (rows a whole
number of blocks, blocksize < 2048, as bitsandbytes' own fallback rule) and uses the reference for the others.
On a machine or a bitsandbytes version without the bug nothing is changed.
"""

from __future__ import annotations

import ctypes
import warnings

import torch

_STATE = {"checked": False, "fixed": False}


def _reference(A: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, shape, dtype) -> torch.Tensor:
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    packed = A.view(torch.uint8) if A.dtype != torch.uint8 else A
    code = _get_4bit_code(quant_type, A.device)
    return _dequantize_4bit_compute(packed.reshape(-1), absmax, code, blocksize, list(shape), dtype)


def _probe_is_wrong() -> bool:
    """True when bitsandbytes' CPU dequantization of a (6, 32) NF4 tensor in blocks of 64 (rows of half a block;
    each block a different absmax) differs from its PyTorch reference."""
    import bitsandbytes.functional as F

    w = torch.linspace(-1.0, 1.0, 192).reshape(6, 32) * torch.tensor([1.0, 1.0, 4.0, 4.0, 16.0, 16.0]).view(6, 1)
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    got = torch.ops.bitsandbytes.dequantize_4bit.default(packed, state.absmax, 64, "nf4", list(w.shape), torch.float32)
    want = _reference(packed, state.absmax, 64, "nf4", w.shape, torch.float32)
    return not torch.equal(got, want)


def _fixed_kernel():
    """The CPU kernel: bitsandbytes' C function where it is right, its PyTorch reference elsewhere."""
    from bitsandbytes.cextension import lib
    from bitsandbytes.functional import get_ptr

    suffix = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

    def dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
        n = shape[-1]
        if n % blocksize or n % 2 or blocksize >= 2048 or dtype not in suffix or quant_type not in ("nf4", "fp4"):
            return _reference(A, absmax, blocksize, quant_type, shape, dtype)
        packed = A.view(torch.uint8) if A.dtype != torch.uint8 else A
        m = 1
        for s in shape[:-1]:
            m *= s
        packed = packed.reshape(m, n // 2)
        absmax = absmax if absmax.dtype == torch.float32 else absmax.float()
        out = torch.empty(tuple(shape), dtype=dtype, device=A.device)
        kernel = getattr(lib, f"cdequantize_blockwise_cpu_{quant_type}_{suffix[dtype]}")
        kernel(get_ptr(packed), get_ptr(absmax), get_ptr(out), ctypes.c_longlong(blocksize), ctypes.c_longlong(m),
               ctypes.c_longlong(n))  # fmt: skip
        return out

    return dequantize_4bit


def ensure_correct_cpu_dequantize() -> bool:
    """Probe bitsandbytes' CPU 4-bit dequantization once; replace its kernel where the probe shows the row-blocks
    bug (see the module docstring). Returns True when the kernel was replaced (in this call or before)."""
    if _STATE["checked"]:
        return _STATE["fixed"]
    _STATE["checked"] = True
    try:
        wrong = _probe_is_wrong()
    except Exception:  # noqa: BLE001 - a bitsandbytes without these internals: leave it as it is
        return False
    if wrong:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's "overriding a previously registered kernel"
            torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", _fixed_kernel())
        _STATE["fixed"] = not _probe_is_wrong()
    return _STATE["fixed"]
