"""The fused DoRA norm kernel (peftlab.kernels.dora_norm) vs the fp64 dense reference ‖W + s·B A‖_row.

Odd shapes and ranks, fp32/bf16/fp16 weights (the Triton interpreter on a CPU, the real kernel on CUDA),
strided operands, and the fallback that never fails a user (unsupported tensors, a failing launch).

Tolerance, scaled to the values: the standard bound for sums of products, |fl(x·y) − x·y| ≤ γ·|x|·|y|,
applied to the three terms of ‖V_i‖² = ‖W_i‖² + 2s·Σ_r B_ir (W Aᵀ)_ir + s²·Σ_r B_ir (B G)_ir with every
operand replaced by its absolute value:

    S_i = Σ_k W_ik² + 2|s|·Σ_r |B_ir| (|W| |A|ᵀ)_ir + s²·Σ_r |B_ir| (|B| |A| |A|ᵀ)_ir
    |n_i² − ref_i²| ≤ c·eps·S_i

eps the unit roundoff of the products' inputs (A is rounded to W's dtype for W·Aᵀ; an fp32 W uses
tf32x3 products, fp32 accuracy); c a small constant. Each test also checks that the LoRA terms move the
norm by far more than that tolerance, so a kernel that dropped one of them would fail.
"""

from __future__ import annotations

import warnings

import pytest
import torch

triton = pytest.importorskip("triton")

from peftlab.kernels import dora_norm as D  # noqa: E402
from peftlab.kernels import dora_norm_triton as T  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: c·eps per weight dtype: bf16 rounds A to 8 bits for W·Aᵀ, fp16 to 11; fp32 accumulates over K
REL = {torch.float32: 1e-6, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@pytest.fixture(autouse=True)
def _fresh_state():
    D._warned.clear()
    D._disabled.clear()
    yield
    D._warned.clear()
    D._disabled.clear()


def make(N, K, R, dtype, seed=0, b_scale=1.0):
    """W rows and s·B_i A of comparable norm (about 1 and b_scale·s), whatever R."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(DEVICE, dtype)
    a = (torch.randn(R, K, generator=g) / K**0.5).to(DEVICE)  # adapters stay fp32, as in peftlab
    b = (torch.randn(N, R, generator=g) * b_scale / R**0.5).to(DEVICE)
    return w, a, b


def scale_sq(w, a, b, s):
    """S_i (module docstring): the size of ‖V_i‖²'s terms with every operand in absolute value (fp64)."""
    w, a, b = w.double().abs(), a.double().abs(), b.double().abs()
    return w.pow(2).sum(1) + 2 * abs(s) * (b * (w @ a.t())).sum(1) + s * s * (b * (b @ (a @ a.t()))).sum(1)


def check(norm, w, a, b, s, rel):
    ref = D.reference_dense(w.double(), a.double(), b.double(), s)
    m2 = scale_sq(w, a, b, s)
    err = (norm.double() ** 2 - ref**2).abs()
    assert norm.dtype == torch.float32 and norm.shape == (w.shape[0],)
    assert (err <= rel * m2 + 1e-12).all(), f"max err/S {(err / m2).max().item():.3g} > {rel:.3g}"
    # the LoRA terms move ‖V‖² by far more than the tolerance (a kernel without one of them fails above)
    moved = (ref**2 - w.double().norm(dim=1) ** 2).abs()
    assert (moved > 2 * rel * m2).float().mean() > 0.5, "test data too weak to see the LoRA terms"
    return ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N, K, R", [(37, 83, 5), (130, 257, 16), (1, 19, 3), (45, 64, 33), (20, 40, 128), (70, 129, 64)])
def test_kernel_matches_fp64_reference(N, K, R, dtype):
    w, a, b = make(N, K, R, dtype, seed=N + K + R)
    s = 1.7
    norm, wsq = D.dora_row_norm(w, a, b, s, use_kernel="triton", return_wsq=True)
    check(norm, w, a, b, s, REL[dtype])
    torch.testing.assert_close(wsq.double(), w.double().pow(2).sum(1), rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_matches_reference_and_kernel(dtype):
    w, a, b = make(53, 97, 12, dtype)
    s = 0.8
    torch_n = D.torch_row_norm(w, a, b, s)
    check(torch_n, w, a, b, s, REL[dtype])
    kernel_n = D.dora_row_norm(w, a, b, s, use_kernel="triton")
    m2 = scale_sq(w, a, b, s)
    assert ((kernel_n.double() ** 2 - torch_n.double() ** 2).abs() <= 2 * REL[dtype] * m2).all()


def test_zero_B_gives_the_base_norm_and_strided_operands():
    w, a, b = make(33, 70, 8, torch.float32)
    zero = torch.zeros_like(b)
    norm = D.dora_row_norm(w, a, zero, 2.0, use_kernel="triton")
    torch.testing.assert_close(norm.double(), w.double().norm(dim=1), rtol=1e-6, atol=0)
    # W as a transposed view (stride (1, N)), A and B non-contiguous: the launcher passes strides through
    wt = w.t().contiguous().t()
    a_nc = torch.stack([a, a], dim=2)[:, :, 0]  # stride (2K, 2)
    b_nc = b.t().contiguous().t()
    assert not wt.is_contiguous() and not a_nc.is_contiguous() and not b_nc.is_contiguous()
    norm = D.dora_row_norm(wt, a_nc, b_nc, 1.3, use_kernel="triton")
    check(norm, w, a, b, 1.3, REL[torch.float32])


def test_scaling_sign_and_rank_padding():
    """Negative s flips the cross term (2s·Σ B C) but not the Gram term (s²); R = 17 pads to a 32 tile."""
    w, a, b = make(40, 50, 17, torch.float32)
    for s in (-1.1, 1.1):
        check(D.dora_row_norm(w, a, b, s, use_kernel="triton"), w, a, b, s, REL[torch.float32])
    plus = D.dora_row_norm(w, a, b, 1.1, use_kernel="triton")
    minus = D.dora_row_norm(w, a, b, -1.1, use_kernel="triton")
    assert (plus - minus).abs().max() > 1e-2


@pytest.mark.parametrize("bn", [32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_larger_row_tiles(monkeypatch, bn, dtype):
    """The 32- and 64-row tiles the host picks for N ≥ 4096 / 16384 (forced here on small odd shapes)."""
    monkeypatch.setattr(T, "block_n", lambda n: bn)
    for N, K, R in ((150, 70, 20), (37, 129, 128)):
        w, a, b = make(N, K, R, dtype, seed=bn + R)
        check(D.dora_row_norm(w, a, b, 0.9, use_kernel="triton"), w, a, b, 0.9, REL[dtype])


def test_block_choices():
    assert T.block_r(1) == 16 and T.block_r(17) == 32 and T.block_r(128) == 128
    if not T.INTERPRET:
        assert T.block_n(1024) == 16 and T.block_n(4096) == 32 and T.block_n(14336) == 32 and T.block_n(16384) == 64
        assert T.num_warps(32, 128) == 8 and T.num_warps(16, 128) == 4 and T.num_warps(64, 16) == 4


# ---- the fallback: never fails a user -------------------------------------------------------------


def test_unsupported_falls_back_once_and_strict_raises():
    w, a, b = make(12, 20, 4, torch.float32)
    big_a, big_b = torch.randn(200, 20, device=DEVICE) * 0.05, torch.randn(12, 200, device=DEVICE) * 0.05
    assert D.unsupported(w, big_a, big_b)[1] == "rank"
    with pytest.warns(RuntimeWarning, match=r"rank 200 > 128.*torch path"):
        norm = D.dora_row_norm(w, big_a, big_b, 1.0)
    check(norm, w, big_a, big_b, 1.0, REL[torch.float32])  # the torch path's answer
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time is silent
        assert D.dora_row_norm_or_none(w, big_a, big_b, 1.0) is None
    with pytest.raises(ValueError, match=r"rank 200 > 128"):
        D.dora_row_norm(w, big_a, big_b, 1.0, use_kernel="triton")
    with pytest.warns(RuntimeWarning, match="W must be fp32, fp16 or bf16"):
        out = D.dora_row_norm(w.double(), a.double(), b.double(), 1.0)
    torch.testing.assert_close(out.double(), D.reference_dense(w.double(), a.double(), b.double(), 1.0), rtol=1e-6, atol=0)
    with pytest.raises(TypeError, match="lora_B must be fp32 or"):
        D.dora_row_norm(w.half(), a, b.double(), 1.0, use_kernel="triton")
    with pytest.raises(ValueError, match="need A"):
        D.dora_row_norm(w, a[:, :-1], b, 1.0, use_kernel="triton")
    with pytest.raises(ValueError, match="use_kernel"):
        D.dora_row_norm(w, a, b, 1.0, use_kernel="cuda")


def test_cpu_without_interpreter_is_unsupported(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    w, a, b = make(8, 16, 4, torch.float32)
    problem = D.unsupported(w.cpu(), a.cpu(), b.cpu())
    assert problem is not None and problem[1] == "device"
    with pytest.warns(RuntimeWarning, match="needs CUDA tensors"):
        norm = D.dora_row_norm(w.cpu(), a.cpu(), b.cpu(), 1.0)
    check(norm, w.cpu(), a.cpu(), b.cpu(), 1.0, REL[torch.float32])


def test_launch_error_falls_back_disables_and_strict_raises(monkeypatch):
    w, a, b = make(24, 40, 8, torch.float32)
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("PTX assembly failed (simulated)")

    monkeypatch.setattr(T, "dora_norm", broken)
    with pytest.warns(RuntimeWarning, match="Triton failed.*simulated"):
        norm = D.dora_row_norm(w, a, b, 1.5)
    check(norm, w, a, b, 1.5, REL[torch.float32])
    assert D.dora_row_norm_or_none(w, a, b, 1.5) is None  # disabled for (device, fp32): not tried again
    assert len(calls) == 1
    # another dtype on the same device still tries the kernel
    assert D.dora_row_norm_or_none(w.half(), a, b, 1.5) is None and len(calls) == 2
    with pytest.raises(RuntimeError, match="simulated"):
        D.dora_row_norm(w, a, b, 1.5, use_kernel="triton")


def test_torch_path_handles_rank_zero_and_cached_wsq():
    w, a, b = make(10, 30, 3, torch.float32)
    torch.testing.assert_close(D.torch_row_norm(w, a[:0], b[:, :0], 1.0), w.norm(dim=1), rtol=1e-6, atol=0)
    wsq = w.double().pow(2).sum(1).float()
    n1 = D.torch_row_norm(w, a, b, 0.9, weight_norm_sq=wsq)
    n2, wsq2 = D.torch_row_norm(w, a, b, 0.9, return_wsq=True)
    torch.testing.assert_close(n1, n2, rtol=1e-6, atol=0)
    torch.testing.assert_close(wsq2, wsq, rtol=1e-6, atol=0)
