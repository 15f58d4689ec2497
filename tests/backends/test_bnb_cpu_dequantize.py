"""4-bit dequantization on the CPU equals bitsandbytes' own PyTorch reference for every shape, including rows that
are not a whole number of blocks, where bitsandbytes 0.50's AVX-512 kernel reads the wrong block scales (see
peftlab/backends/quant/bnb_cpu_fix.py; on CPUs without AVX-512 its kernel is right and this holds as well)."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from bitsandbytes.backends.default.ops import _dequantize_4bit_compute  # noqa: E402
from bitsandbytes.backends.utils import _get_4bit_code  # noqa: E402

from peftlab.backends.quant.bnb import make_4bit_linear, require_bnb  # noqa: E402

SHAPES = [(32, 32), (16, 96), (8, 40), (128, 32), (64, 64), (3, 128)]


def _reference(packed, state, dtype):
    code = _get_4bit_code(state.quant_type, packed.device)
    return _dequantize_4bit_compute(packed.view(torch.uint8).reshape(-1), state.absmax, code, state.blocksize,
                                    list(state.shape), dtype)  # fmt: skip


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dequantize_4bit_equals_the_reference(shape, quant_type):
    require_bnb()
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.logspace(-2, 1, shape[0]).view(-1, 1)  # blocks of very different scales
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type=quant_type)
    got = bnb.functional.dequantize_4bit(packed, state)
    torch.testing.assert_close(got, _reference(packed, state, torch.float32), rtol=0, atol=0)
    rel = ((got - w).abs().mean() / w.abs().mean()).item()
    limit = {"nf4": 0.11, "fp4": 0.15}[quant_type]  # measured in blocks of 64: NF4 ~0.09, FP4 ~0.13
    assert rel < limit, f"4-bit round trip error {rel:.3f}"


def test_a_32_wide_linear4bit_computes_with_its_dequantized_weight():
    """The layer's own forward (bitsandbytes' matmul_4bit) on d_in = 32, half a block per row."""
    torch.manual_seed(0)
    dense = torch.randn(48, 32) * 0.02
    layer = make_4bit_linear(dense, None, quant_type="nf4", double_quant=False)
    x = torch.randn(5, 32)
    state = layer.weight.quant_state
    want = x @ _reference(layer.weight.data, state, torch.float32).T
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)
    assert ((want - x @ dense.T).abs().mean() / (x @ dense.T).abs().mean()).item() < 0.15
