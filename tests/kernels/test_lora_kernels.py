"""Fused LoRA Triton kernels vs the torch reference: odd shapes, ranks, bias, dropout, dtypes."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from peftlab.kernels import lora as K
from peftlab.kernels import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make(M, N, Kd, R, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, Kd, generator=g) / Kd**0.25).to(DEVICE, dtype)
    w = (torch.randn(N, Kd, generator=g) / Kd**0.5).to(DEVICE, dtype)
    b = torch.randn(N, generator=g).to(DEVICE, dtype) if bias else None
    a = (torch.randn(R, Kd, generator=g) / Kd**0.5).to(DEVICE)  # adapters stay fp32
    bb = (torch.randn(N, R, generator=g) * 0.1).to(DEVICE)
    return x, w, b, a, bb


def tol(got, want, exact, floor):
    """|got - want| within 4x the reference's own error vs fp64 (``exact``), plus a small floor."""
    own = (want.double() - exact).abs().max().item()
    err = (got.double() - exact).abs().max().item()
    assert err <= 4 * own + floor, (err, own)


@pytest.mark.parametrize("M, N, Kd, R, kernel_backward", [
    *((M, N, Kd, R, False) for M, N, Kd in [(37, 45, 53), (1, 17, 19), (70, 33, 40)] for R in (1, 8, 16, 64)),
    (37, 45, 53, 8, True), (70, 33, 40, 64, True),  # the Triton backward kernels without dropout too
])
def test_forward_and_grads_fp32_odd_shapes(M, N, Kd, R, kernel_backward):
    x, w, b, a, bb = make(M, N, Kd, R, torch.float32, bias=R % 2 == 0)
    s = 1.5
    x.requires_grad_(True)
    a.requires_grad_(True)
    bb.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)
    y = K.lora_linear(x, w, b, a, bb, s, kernel_backward=kernel_backward)
    y_ref, _ = reference.lora_forward(
        x.detach(), w, None if b is None else b.detach(), a.detach(), bb.detach(), s
    )
    exact, _ = reference.lora_forward(
        *(t.double() if t is not None else None for t in (x.detach(), w, b, a.detach(), bb.detach())), s
    )
    tol(y, y_ref, exact, 1e-5)
    gy = torch.randn_like(y)
    y.backward(gy)
    dx, da, db_, dbias = reference.lora_backward(gy, x.detach(), w, a.detach(), bb.detach(), s)
    exact = reference.lora_backward(
        gy.double(), x.detach().double(), w.double(), a.detach().double(), bb.detach().double(), s
    )
    for got, want, ex in zip((x.grad, a.grad, bb.grad), (dx, da, db_), exact):
        tol(got, want, ex, 1e-5)
    if b is not None:
        tol(b.grad, dbias, exact[3], 1e-5)
    assert w.grad is None


INTERPRETED = not torch.cuda.is_available()
BF16 = pytest.param(
    torch.bfloat16,
    marks=pytest.mark.skipif(
        INTERPRETED,
        reason="the Triton CPU interpreter does not emulate bf16 tl.dot (numpy has no bfloat16); runs on GPU",
    ),
)


@pytest.mark.parametrize("dtype", [BF16, torch.float16])
def test_half_precision_matches_reference(dtype):
    x, w, b, a, bb = make(33, 47, 29, 8, dtype, bias=True)
    x.requires_grad_(True)
    a.requires_grad_(True)
    y = K.lora_linear(x, w, b, a, bb, 2.0)
    assert y.dtype == dtype
    exact, _ = reference.lora_forward(
        x.detach().double(), w.double(), b.double(), a.detach().double(), bb.double(), 2.0
    )
    want = exact.to(dtype)  # the best a half-precision output can be
    tol(y, want, exact, 2e-2)
    y.float().sum().backward()
    ex = reference.lora_backward(
        torch.ones_like(exact), x.detach().double(), w.double(), a.detach().double(), bb.double(), 2.0
    )
    assert (x.grad.double() - ex[0]).abs().max() < 5e-2 * ex[0].abs().max() + 1e-2
    assert (a.grad.double() - ex[1]).abs().max() < 2e-2 * ex[1].abs().max() + 1e-3


@pytest.mark.parametrize("bias", [True, False])
def test_dropout_mask_is_regenerated_consistently(bias):
    p, seed, s = 0.3, 1234, 0.7
    x, w, b, a, bb = make(29, 23, 31, 4, torch.float32, bias=bias)
    x.requires_grad_(True)
    a.requires_grad_(True)
    bb.requires_grad_(True)
    mask = K.dropout_mask(29, 31, p, seed, x.device)
    kept = (mask > 0).float().mean().item()
    assert 0.55 < kept < 0.85
    torch.testing.assert_close(mask.unique(), torch.tensor([0.0, 1 / (1 - p)], device=mask.device))
    y = K.lora_linear(x, w, b, a, bb, s, dropout_p=p, seed=seed)
    y_ref, _ = reference.lora_forward(x.detach(), w, b, a.detach(), bb.detach(), s, mask)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    gy = torch.randn_like(y)
    y.backward(gy)
    dx, da, db_, _ = reference.lora_backward(gy, x.detach(), w, a.detach(), bb.detach(), s, mask)
    for got, want in zip((x.grad, a.grad, bb.grad), (dx, da, db_)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_matches_peftlab_torch_path_in_a_lora_layer():
    from torch import nn

    import peftlab

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 24)).to(DEVICE)
    peftlab.wrap(model, peftlab.LoraConfig(r=8, alpha=16, target_modules=["0"], use_kernel="torch"))
    params = dict(model.named_parameters())
    a = next(v for k, v in params.items() if "lora_A" in k)
    b = next(v for k, v in params.items() if "lora_B" in k)
    weight = next(v for k, v in params.items() if k.endswith("weight") and "lora" not in k)
    bias = next(v for k, v in params.items() if k.endswith("bias") and "lora" not in k)
    with torch.no_grad():
        b.normal_(0, 0.1)
    x = torch.randn(3, 5, 40, device=DEVICE)
    torch_path = model(x)
    fused = K.lora_linear(x, weight, bias, a, b, 2.0)
    torch.testing.assert_close(fused, torch_path, rtol=1e-4, atol=1e-5)


def test_launcher_checks():
    x, w, b, a, bb = make(4, 6, 8, 2, torch.float32, bias=True)
    with pytest.raises(ValueError, match=r"weight must be \(N, 8\)"):
        K.lora_linear(x, w[:, :5], b, a, bb, 1.0)
    with pytest.raises(ValueError, match=r"need A \(R, 8\) and B \(6, R\)"):
        K.lora_linear(x, w, b, a, bb[:, :1], 1.0)
    with pytest.raises(TypeError, match="weight dtype"):
        K.lora_linear(x, w.double(), b, a, bb, 1.0)
    with pytest.raises(ValueError, match=r"rank 200 > 128"):
        K.lora_linear(x, w, b, torch.zeros(200, 8, device=DEVICE), torch.zeros(6, 200, device=DEVICE), 1.0)
