"""Mixed batches through adapters that adapt parameters (LoRA on MoE expert stacks and routers): every row equals
that row run alone with only its adapter, in forward (padded rows), greedy generate with the KV cache, and training
(each adapter's gradient comes from its own rows only). The reference is the single-adapter forward of the rows."""

from __future__ import annotations

import warnings

import pytest
import torch
from arch_zoo import VOCAB, build

import peftlab
from helpers import perturb
from peftlab.serving.router import BASE, Router

TOL = {"rtol": 1e-5, "atol": 1e-5}
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
NAMES = ["x", "y", BASE, "z", "x", "y"]


def zoo(arch: str):
    """x: LoRA on the expert stacks only; y: all-linear (attention, expert stacks and router); z: o_proj only."""
    model = build(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peftlab.wrap(model, peftlab.LoraConfig(r=2, alpha=4, target_parameters=EXPERTS, adapter_name="x"))
        peftlab.wrap(model, peftlab.LoraConfig(r=2, alpha=2, target_modules="all-linear", adapter_name="y"))
        peftlab.wrap(model, peftlab.LoraConfig(r=4, target_modules=["o_proj"], adapter_name="z"))
    perturb(model, 0.2)
    return model.eval()


def batch(n=6, t=7):
    """Token ids with left padding of 0, 3, 1, 5, 0, 2 positions."""
    ids = torch.randint(3, VOCAB - 3, (n, t), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(n, t, dtype=torch.long)
    for m, pad in enumerate([0, 3, 1, 5, 0, 2][:n]):
        mask[m, :pad] = 0
        ids[m, :pad] = 0
    return ids, mask


def alone(model, name, **inputs):
    peftlab.set_active_adapters(model, [] if name == BASE else [name])
    return model(**inputs).logits


@pytest.mark.parametrize("arch", ["Qwen3-MoE", "OLMoE", "Mixtral", "DeepSeek-V3"])
def test_rows_with_expert_adapters_equal_each_row_alone(arch):
    """DeepSeek-V3's router flattens its (rows, T, d) input itself: its outputs go back per token. (transformers
    5.24's DeepSeek-V3 fails on a left-padded batch without any adapter, so its rows are not padded here.)"""
    model = zoo(arch)
    ids, mask = batch()
    if arch == "DeepSeek-V3":
        mask = torch.ones_like(mask)
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
        for name in dict.fromkeys(
            NAMES
        ):  # each adapter's rows in one single-adapter call (rows are independent)
            rows = [m for m, n in enumerate(NAMES) if n == name]
            want = alone(model, name, input_ids=ids[rows], attention_mask=mask[rows])
            torch.testing.assert_close(mixed[rows], want, **TOL)
        other = alone(model, "y", input_ids=ids[:1], attention_mask=mask[:1])
    assert not torch.allclose(mixed[0], other[0], atol=1e-3)  # row 0 (x) is not what y computes for it


def test_greedy_generate_rows_equal_each_row_alone():
    """Prefill (the experts see batch·T tokens) and decode (one token per row), with the KV cache."""
    model = zoo("Qwen3-MoE")
    model.generation_config.pad_token_id = 0
    ids, mask = batch(4)
    names = NAMES[:4]
    kw = {"max_new_tokens": 4, "do_sample": False, "return_dict_in_generate": True, "output_scores": True}
    out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **kw)
    for m, name in enumerate(names):
        peftlab.set_active_adapters(model, [] if name == BASE else [name])
        ref = model.generate(input_ids=ids[m : m + 1], attention_mask=mask[m : m + 1], **kw)
        assert torch.equal(out.sequences[m], ref.sequences[0]), name
        for step, scores in enumerate(ref.scores):
            torch.testing.assert_close(out.scores[step][m : m + 1], scores, **TOL)


def test_training_gradients_come_from_each_adapters_rows():
    """One mixed training forward + backward gives each adapter the gradient of its rows run alone."""
    model = zoo("Qwen3-MoE")
    ids, mask = batch()
    params = {n: p for n, p in model.named_parameters() if "lora" in n}
    for p in params.values():
        p.requires_grad_(True)
    model.train()
    model(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits.pow(2).mean(-1).sum().backward()
    mixed = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in params.items()}
    model.zero_grad()
    for name in ("x", "y", "z"):
        rows = [m for m, n in enumerate(NAMES) if n == name]
        peftlab.set_active_adapters(model, [name])
        for p in params.values():
            p.requires_grad_(True)
        alone(model, name, input_ids=ids[rows], attention_mask=mask[rows]).pow(2).mean(-1).sum().backward()
    expert_grads = [n for n in mixed if "lora_param" in n and ".x." in n]
    assert expert_grads and all(mixed[n].abs().sum() > 0 for n in expert_grads)
    for n, p in params.items():
        torch.testing.assert_close(
            mixed[n], p.grad if p.grad is not None else torch.zeros_like(mixed[n]), **TOL
        )


def test_a_layer_whose_rows_cannot_be_told_is_refused():
    """Entries that are neither the rows nor the rows' T tokens flattened: refused, naming both valid sizes."""
    from peftlab.serving.param_rows import entry_rows

    router = Router(["x", "y", BASE], 0)
    router.tokens = 5
    assert entry_rows(router, 15, "cpu").tolist() == [0] * 5 + [1] * 5 + [2] * 5
    with pytest.raises(RuntimeError, match=r"got 7 entries for a batch of 3 rows of 5 tokens.*\(3\).*3·T"):
        entry_rows(router, 7, "cpu")


def test_multihead_attention_adapters_are_refused_in_mixed_batches():
    """nn.MultiheadAttention's call takes masks that are not per row (and rows come second without batch_first):
    a mixed batch refuses its LoRA with the reason, as HF PEFT 0.21 does, instead of splitting it."""

    class Tower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    model = Tower()
    for name in ("a", "b"):
        peftlab.wrap(model, peftlab.LoraConfig(r=2, target_modules=["attn"], adapter_name=name))
    with pytest.raises(
        RuntimeError, match=r"adapter 'a' adapts parameters of MultiheadAttention .*cannot be split"
    ):
        with torch.no_grad():
            model(torch.randn(2, 3, 16), adapter_names=["a", "b"])
