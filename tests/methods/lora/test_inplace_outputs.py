"""Layer outputs of LoRA and DoRA are fresh tensors, never views: a model may write into them in place.

Wav2Vec2's SpecAugment writes into a projection's output and Longformer divides ``query`` by √d in place; an
autograd function that returned a view of its own result would make autograd refuse ("a view ... is being
modified in-place"), and one that saved its output would see it changed. Each case: ``out = layer(x);
out.mul_(2); out.sum().backward()`` must give the gradients of the fp64 reference 2·(x W'ᵀ + b).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftlab
from peftlab.backends.lora_ops import LoraBranchFunction, LoraLinearFunction


def _wrapped(use_dora: bool, bias: bool, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5, bias=bias))
    peftlab.wrap(model, peftlab.LoraConfig(r=3, alpha=6, target_modules=["0"], use_dora=use_dora, dropout=dropout))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def _reference(layer, x: torch.Tensor, use_dora: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """2·(x W'ᵀ + b) in fp64 and the gradients of its sum w.r.t. x and the adapter (DoRA's norm a constant)."""
    base = layer.base_layer
    params = {n: p.detach().double().clone().requires_grad_(True) for n, p in layer.named_parameters() if p.requires_grad}
    A, B = params["lora_A.default"], params["lora_B.default"]
    W = base.weight.detach().double()
    delta = W + 2.0 * B @ A  # alpha / r = 2
    if use_dora:
        norm = delta.norm(dim=1).detach()
        delta = params["lora_magnitude.default"][:, None] * delta / norm[:, None]
    xd = x.detach().double().requires_grad_(True)
    y = xd @ delta.t()
    if base.bias is not None:
        y = y + base.bias.detach().double()
    (2 * y).sum().backward()
    return xd.grad, {n: p.grad for n, p in params.items()}


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", [(7, 6), (2, 3, 6)], ids=["2d", "3d"])
def test_output_written_in_place_gives_reference_gradients(use_dora, bias, shape):
    model = _wrapped(use_dora, bias)
    model.train()
    layer = model[0]
    x = torch.randn(*shape, requires_grad=True)
    out = layer(x)
    assert out._base is None, "a layer output must not be a view"
    out.mul_(2)  # as SpecAugment / Longformer do
    out.sum().backward()
    grad_x, grads = _reference(layer, x, use_dora)
    torch.testing.assert_close(x.grad.double(), grad_x, rtol=1e-5, atol=1e-6)
    for name, p in layer.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad.double(), grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("shape", [(4, 6), (2, 3, 6), (6,)])
def test_autograd_functions_return_fresh_tensors(shape):
    """The functions themselves (the hot path: no copy added) and the LoRA-branch function."""
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    w, b = torch.randn(5, 6), torch.randn(5)
    a, bb = torch.randn(3, 6, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    y = LoraLinearFunction.apply(x, w, b, a, bb, 0.5, 0.0, 0)
    z = LoraBranchFunction.apply(x, a, bb, 0.5, 0.0, 0)
    assert y._base is None and z._base is None and y.shape == z.shape == (*shape[:-1], 5)
    torch.testing.assert_close(y, x @ w.t() + b + 0.5 * (x @ a.t()) @ bb.t())
    torch.testing.assert_close(z, 0.5 * (x @ a.t()) @ bb.t())
    (y.mul_(3).sum() + z.div_(2).sum()).backward()
    xr, ar, br = (t.detach().clone().requires_grad_(True) for t in (x, a, bb))
    (3 * (xr @ w.t() + b + 0.5 * (xr @ ar.t()) @ br.t())).sum().add((0.25 * (xr @ ar.t()) @ br.t()).sum()).backward()
    for got, want in ((x.grad, xr.grad), (a.grad, ar.grad), (bb.grad, br.grad)):
        torch.testing.assert_close(got, want)


def test_dropout_output_written_in_place_trains():
    model = _wrapped(False, True, dropout=0.3)
    model.train()
    x = torch.randn(4, 6, requires_grad=True)
    out = model(x)
    out.div_(2.0)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
