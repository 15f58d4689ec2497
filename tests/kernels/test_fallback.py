"""use_kernel="auto" never fails a user: unsupported tensors and Triton compile/launch errors fall back
to the torch path with one warning; use_kernel="triton" still raises. Also the autotune M bucket."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

triton = pytest.importorskip("triton")

from peftlab.kernels import lora as K
from peftlab.kernels import lora_linear_or_none, reference, support, supports

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _fresh_state():
    support._warned.clear()
    support._disabled.clear()
    yield
    support._warned.clear()
    support._disabled.clear()


def make(M=12, N=10, Kd=14, R=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, Kd, generator=g).to(DEVICE, dtype).requires_grad_(True)
    w = (torch.randn(N, Kd, generator=g) / Kd**0.5).to(DEVICE, dtype)
    b = torch.randn(N, generator=g).to(DEVICE, dtype)
    a = (torch.randn(R, Kd, generator=g) / Kd**0.5).to(DEVICE).requires_grad_(True)
    bb = (torch.randn(N, R, generator=g) * 0.1).to(DEVICE).requires_grad_(True)
    return x, w, b, a, bb


def grads_vs_reference(y, x, w, b, a, bb, s, mask=None):
    want, _ = reference.lora_forward(x.detach(), w, b, a.detach(), bb.detach(), s, mask)
    torch.testing.assert_close(y, want.to(y.dtype), rtol=1e-4, atol=1e-5)
    gy = torch.randn_like(y)
    y.backward(gy)
    dx, da, db_, _ = reference.lora_backward(gy, x.detach(), w, a.detach(), bb.detach(), s, mask)
    for got, ref in zip((x.grad, a.grad, bb.grad), (dx, da, db_)):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_unsupported_rank_and_dtype_fall_back_once_and_strict_raises():
    x, w, b, _, _ = make()
    big_a, big_b = torch.zeros(200, 14, device=DEVICE), torch.zeros(10, 200, device=DEVICE)
    assert not supports(x, w, b, big_a, big_b)
    with pytest.warns(RuntimeWarning, match=r"rank 200 > 128.*torch path"):
        assert lora_linear_or_none(x, w, b, big_a, big_b, 1.0) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time is silent
        assert lora_linear_or_none(x, w, b, big_a, big_b, 1.0) is None
    with pytest.raises(ValueError, match=r"rank 200 > 128"):
        lora_linear_or_none(x, w, b, big_a, big_b, 1.0, strict=True)
    xd, wd = x.detach().double(), w.double()
    with pytest.warns(RuntimeWarning, match="x must be fp32, fp16 or bf16"):
        assert lora_linear_or_none(xd, wd, None, big_a[:4].double(), big_b[:, :4].double(), 1.0) is None
    with pytest.raises(TypeError, match="weight dtype"):
        lora_linear_or_none(x, w.double(), b, big_a[:4], big_b[:, :4], 1.0, strict=True)


def test_forward_compile_error_falls_back_and_disables(monkeypatch):
    x, w, b, a, bb = make()
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("PTX assembly failed (simulated)")

    monkeypatch.setattr(K, "fused", broken)
    with pytest.warns(RuntimeWarning, match="Triton forward failed.*simulated"):
        assert lora_linear_or_none(x, w, b, a, bb, 1.5) is None
    assert lora_linear_or_none(x, w, b, a, bb, 1.5) is None  # disabled: not tried again
    assert len(calls) == 1
    with pytest.raises(RuntimeError, match="simulated"):
        lora_linear_or_none(x, w, b, a, bb, 1.5, strict=True)


def test_backward_launch_error_finishes_the_step_in_torch(monkeypatch):
    p = 0.3  # with dropout the backward runs Triton kernels (they regenerate the mask)
    x, w, b, a, bb = make(M=29, N=23, Kd=31, R=4)
    s, seed = 0.7, 1234
    y = lora_linear_or_none(x, w, b, a, bb, s, dropout_p=p, seed=seed)
    assert y is not None

    def broken(*args, **kwargs):
        raise RuntimeError("out of resources (simulated)")

    monkeypatch.setattr(K, "thin", broken)
    mask = K.dropout_mask(29, 31, p, seed, x.device)
    with pytest.warns(RuntimeWarning, match="Triton backward failed"):
        grads_vs_reference(y, x, w, b, a, bb, s, mask)
    assert lora_linear_or_none(x, w, b, a, bb, s, dropout_p=p, seed=seed) is None  # now disabled


def test_backward_without_dropout_runs_no_triton_kernel(monkeypatch):
    x, w, b, a, bb = make(M=29, N=23, Kd=31, R=4)
    y = lora_linear_or_none(x, w, b, a, bb, 0.7)
    assert y is not None

    def broken(*args, **kwargs):
        raise AssertionError("a Triton kernel ran in the dropout-free backward")

    for name in ("thin", "fused", "grad_a"):
        monkeypatch.setattr(K, name, broken)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grads_vs_reference(y, x, w, b, a, bb, 0.7)


def test_layer_with_auto_kernel_and_rank_over_128_runs_the_torch_path(monkeypatch):
    import peftlab
    from peftlab.backends import lora_ops

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16)).to(DEVICE)
    peftlab.wrap(model, peftlab.LoraConfig(r=130, alpha=16, target_modules=["0"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    x = torch.randn(2, 3, 24, device=DEVICE)
    monkeypatch.setattr(lora_ops, "_use_triton", lambda layer, x: False)
    want = model(x)  # the torch path
    monkeypatch.setattr(lora_ops, "_use_triton", lambda layer, x: True)  # as on CUDA with Triton
    with pytest.warns(RuntimeWarning, match="rank 130 > 128"):
        got = model(x)
    torch.testing.assert_close(got, want)
    got.sum().backward()


def test_autotune_key_buckets_tokens():
    assert [K.m_bucket(m) for m in (1, 16, 17, 100, 128, 129, 8191, 8192)] == [
        16,
        16,
        32,
        128,
        128,
        256,
        8192,
        8192,
    ]
    assert "M_BUCKET" in K._fused_kernel.keys and "M" not in K._fused_kernel.keys


def test_autocast_runs_the_fused_kernel_in_the_autocast_dtype(monkeypatch):
    """Under autocast an fp32 model's LoRA linear runs the kernel in fp16/bf16 (as nn.Linear's GEMM does),
    not in fp32, and matches the torch path under the same autocast; the fp32 bias keeps an fp32 grad."""
    import peftlab
    from peftlab.backends import lora_ops

    if DEVICE == "cpu":  # the interpreter has no bf16 tl.dot; CPU autocast takes fp16
        dtype = torch.float16
    else:
        dtype = torch.bfloat16
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 24)).to(DEVICE)
    peftlab.wrap(model, peftlab.LoraConfig(r=8, alpha=16, target_modules=["0"], modules_to_save=None))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    model[0].base_layer.bias.requires_grad_(True)
    x = torch.randn(3, 5, 40, device=DEVICE)
    seen = []
    real_fused = K.fused
    monkeypatch.setattr(K, "fused", lambda x2, *a, **k: seen.append(x2.dtype) or real_fused(x2, *a, **k))
    outputs = {}
    for use_triton in (False, True):
        monkeypatch.setattr(lora_ops, "_use_triton", lambda layer, x, on=use_triton: on)
        with torch.autocast(DEVICE, dtype=dtype):
            outputs[use_triton] = model(x)
    assert seen and set(seen) == {dtype}
    assert outputs[True].dtype == outputs[False].dtype == dtype
    # one rounding of the output each way: 2 ulps of fp16 (CPU), of bf16 (CUDA: 0.0078 at |y| ~ 1 measured on an H200)
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    torch.testing.assert_close(outputs[True], outputs[False], rtol=tol, atol=tol)
    outputs[True].float().sum().backward()
    bias = model[0].base_layer.bias
    assert bias.grad is not None and bias.grad.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the autotuner prunes on a CUDA device (one config in the interpreter)")
def test_autotune_off_keeps_one_config(monkeypatch):
    x = torch.empty(8, 64, device="cuda", dtype=torch.bfloat16)
    configs = K._configs()
    monkeypatch.setenv("PEFTLAB_AUTOTUNE", "1")
    several = K.prune_configs(configs, {"X": x})
    monkeypatch.setenv("PEFTLAB_AUTOTUNE", "0")
    one = K.prune_configs(configs, {"X": x})
    assert len(several) > 1 and len(one) == 1 and one[0] in several
