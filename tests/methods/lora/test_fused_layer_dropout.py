"""The LoRA layer's fused Triton path with dropout > 0: the default CUDA training path (the quickstart trains
with dropout 0.05), tested through the layer (``LoraSlot`` -> ``lora_forward`` -> ``peftlab.kernels``), not the
kernel API.

On the CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by tests/conftest.py) and the
layer's CUDA-only device check (``lora_ops._use_triton``) is opened for it; on CUDA (``benchmarks/gpu.sh``) the
layer picks the path as it does for users. Every test asserts that the fused function ran.

* Output statistics against the torch path: for n copies of one input row x₀, the LoRA term
  Δ = s·B A (D(x₀)) has mean s·B A x₀ (inverted dropout is unbiased) and, per output j, variance
  s²·Σ_k (B A)²_jk x₀k² · p/(1−p). Both paths must meet both within sampling error.
* Output and gradients against an fp64 reference that applies the kernel's own mask (regenerated from the seed
  the layer passed to the kernel): y = x Wᵀ + b + s·((x ⊙ mask) Aᵀ) Bᵀ, with b trainable (bias="lora_only").
"""

from __future__ import annotations

import os

import pytest
import torch

import peftlab
from helpers import perturb, tiny_model
from peftlab.backends import lora_ops

pytest.importorskip("triton")
from peftlab.kernels import lora as kernel_lora  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PATH = "bert.encoder.layer.0.attention.self.query"  # nn.Linear 32 -> 32 with a bias
P = 0.3


@pytest.fixture
def seeds(monkeypatch):
    """Open the fused path on the CPU (interpreter) and record the (p, seed) of every fused call."""
    if DEVICE == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py before Triton loads)")
        monkeypatch.setattr(lora_ops, "_use_triton", lambda slot, x: slot.use_kernel != "torch")
    calls: list[tuple[float, int]] = []
    real = kernel_lora.TritonLoraLinear.apply

    def spy(*args):
        calls.append((args[6], args[7]))  # (x, weight, bias, A, B, scaling, p, seed, ...)
        return real(*args)

    monkeypatch.setattr(kernel_lora.TritonLoraLinear, "apply", spy)
    return calls


def _layer(use_kernel: str = "auto"):
    model = tiny_model("bert").to(DEVICE)
    cfg = peftlab.LoraConfig(r=4, alpha=8, dropout=P, target_modules=["query"], bias="lora_only", use_kernel=use_kernel)
    peftlab.wrap(model, cfg)
    perturb(model, 0.3)
    layer = model.get_submodule(PATH)
    with torch.no_grad():
        layer.base_layer.bias.add_(torch.randn(layer.base_layer.bias.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE))
    return layer.train()


def _delta_stats(layer, x0: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output mean and variance of the LoRA term over n copies of the row x0."""
    x = x0.expand(n, -1).contiguous()
    with torch.no_grad():
        delta = (layer(x) - layer.base_layer(x)).double()
    return delta.mean(0), delta.var(0)


def test_fused_dropout_output_statistics_equal_torch_path_and_expectation(seeds):
    fused_layer, torch_layer = _layer(), _layer("torch")
    slot = fused_layer.slots["default"]
    x0 = torch.randn(1, slot.in_features, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    ba = slot.scaling * (slot.lora_B.detach().double() @ slot.lora_A.detach().double())  # s·B A (d_out, d_in)
    mean = (x0.double() @ ba.t())[0]
    var = (ba.pow(2) @ x0.double()[0].pow(2)) * P / (1 - P)
    n = 512
    for name, layer in (("fused", fused_layer), ("torch", torch_layer)):
        seeds.clear()
        got_mean, got_var = _delta_stats(layer, x0, n)
        assert (len(seeds) == 1) == (name == "fused") and (name == "torch" or seeds[0][0] == P), (name, seeds)
        z = (got_mean - mean) / (var / n).sqrt()  # each ~ N(0, 1)
        assert z.abs().max().item() < 5, (name, z)
        # sample variance of n draws: relative standard error ≈ sqrt(2/n) (6%) per output, less summed over 32
        assert abs(got_var.sum().item() / var.sum().item() - 1) < 0.1, (name, got_var.sum().item(), var.sum().item())


def _reference(x, weight, bias, a, b, s, mask):
    return x @ weight.t() + bias + s * ((x * mask) @ a.t()) @ b.t()


def test_fused_dropout_output_and_grads_equal_reference_with_the_kernels_mask(seeds):
    layer = _layer()
    slot = layer.slots["default"]
    weight = layer.base_layer.weight.detach().double()
    params = {"A": slot.lora_A, "B": slot.lora_B, "bias": layer.base_layer.bias}
    x = torch.randn(3, 37, slot.in_features, generator=torch.Generator().manual_seed(0)).to(DEVICE).requires_grad_()
    probe = torch.randn(3, 37, slot.out_features, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    for _ in range(2):  # two steps: a fresh mask each, and the second after an update
        seeds.clear()
        y = layer(x)
        assert len(seeds) == 1 and "TritonLoraLinear" in type(y.grad_fn).__name__
        p, seed = seeds[0]
        assert p == P
        mask = kernel_lora.dropout_mask(3 * 37, slot.in_features, P, seed, x.device).double().reshape(x.shape)
        assert abs((mask == 0).double().mean().item() - P) < 0.05  # 3552 entries: 5σ ≈ 0.04
        (y * probe).sum().backward()
        ref_in = {k: t.detach().double().requires_grad_() for k, t in params.items()}
        x64 = x.detach().double().requires_grad_()
        ref = _reference(x64, weight, ref_in["bias"], ref_in["A"], ref_in["B"], slot.scaling, mask)
        (ref * probe.double()).sum().backward()
        rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
        assert rel(y.detach(), ref.detach()) < 1e-5
        assert rel(x.grad, x64.grad) < 1e-5
        for k, t in params.items():
            assert rel(t.grad, ref_in[k].grad) < 1e-5, k
        with torch.no_grad():
            for t in params.values():
                t.sub_(0.1 * t.grad)
                t.grad = None
            x.grad = None
