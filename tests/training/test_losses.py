"""Fused linear cross-entropy equals transformers' loss and gradients, without the full logits."""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab.training.losses import causal_lm_loss, fused_linear_cross_entropy


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_matches_reference_loss_and_grads(bias, chunk):
    torch.manual_seed(0)
    h = torch.randn(23, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(50, dtype=torch.float64, requires_grad=True) if bias else None
    y = torch.randint(0, 50, (23,))
    y[[0, 5, 9]] = -100
    loss = fused_linear_cross_entropy(h, w, y, b, chunk_rows=chunk)
    logits = h @ w.t() + (b if bias else 0)
    ref = torch.nn.functional.cross_entropy(logits, y, ignore_index=-100)
    torch.testing.assert_close(loss, ref)
    params = [t for t in (h, w, b) if t is not None]
    for got, want in zip(torch.autograd.grad(2.5 * loss, params), torch.autograd.grad(2.5 * ref, params)):
        torch.testing.assert_close(got, want)


def test_causal_lm_loss_equals_model_loss_with_lora_and_prefix(tiny):
    for config in (
        peftlab.LoraConfig(r=4, target_modules="all-linear"),
        peftlab.PrefixConfig(num_virtual_tokens=3),
    ):
        model = peftlab.wrap(tiny("llama"), config)
        torch.manual_seed(1)
        for p in model.parameters():
            if p.requires_grad:
                p.data.normal_(0, 0.05)
        x = torch.randint(1, 100, (3, 9))
        labels = x.clone()
        labels[0, :4] = -100
        batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": labels}
        ref = model(**batch).loss
        ours = causal_lm_loss(model, batch)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
        params = [p for p in model.parameters() if p.requires_grad]
        for got, want in zip(torch.autograd.grad(ours, params), torch.autograd.grad(ref, params)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        assert isinstance(model.lm_head, torch.nn.Linear)  # the head is restored
