"""torch.compile (CPU inductor): a wrapped model trains with the same losses as eager, and one LoRA
linear compiles with fullgraph=True (no graph break inside the LoRA autograd function)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import peftlab

STEPS = 3


def tiny_llama() -> nn.Module:
    """One decoder layer (compile time grows with the graph; one layer has every op kind)."""
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                         intermediate_size=64, vocab_size=100, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def batches(vocab: int = 100, n: int = 2):
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (2, 12), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def train(model, step_fn, data) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for step in range(STEPS):
        loss = step_fn(**data[step % len(data)]).loss
        loss.backward()
        opt.step()
        peftlab.on_train_step(model, step)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


CONFIGS = {
    "lora": lambda: peftlab.LoraConfig(r=4, alpha=8, target_modules="all-linear"),
    "adalora": lambda: peftlab.AdaLoraConfig(
        init_r=6, target_r=3, t_init=1, t_final=1, total_steps=STEPS, target_modules=["q_proj", "v_proj"]
    ),
    "adapter": lambda: peftlab.AdapterConfig(style="houlsby", bottleneck_size=8),
}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_compiled_model_trains_like_eager(method):
    torch._dynamo.reset()
    model = tiny_llama()
    peftlab.wrap(model, CONFIGS[method]())
    with torch.no_grad():  # adapters that start at zero would make every step look alike
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    twin = copy.deepcopy(model)
    data = batches()
    eager = train(model, model, data)
    compiled = train(twin, torch.compile(twin, backend="inductor"), data)
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-6)
    assert eager[-1] < eager[0]  # it trains


def test_lora_linear_compiles_fullgraph():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(16, 12))
    peftlab.wrap(model, peftlab.LoraConfig(r=4, alpha=8, target_modules=["0"]))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(3, 5, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    compiled = torch.compile(twin, fullgraph=True, backend="inductor")  # a graph break raises here
    y, y2 = model(x), compiled(x2)
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-6)
    y.square().sum().backward()
    y2.square().sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for n, p in twin.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-6)
