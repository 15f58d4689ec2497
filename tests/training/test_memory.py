"""Gradient checkpointing on frozen bases keeps the adapters' gradients; 8-bit AdamW trains in uint8 states."""

from __future__ import annotations

import functools

import pytest
import torch

import peftlab
from peftlab.training.memory import (
    bitsandbytes_available,
    disable_gradient_checkpointing,
    enable_gradient_checkpointing,
    make_optimizer,
)
from peftlab.util.errors import ConfigError


def _lora_llama(tiny):
    model = peftlab.wrap(tiny("llama"), peftlab.LoraConfig(r=4, target_modules="all-linear", dropout=0.0))
    torch.manual_seed(3)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    return model.train()


def _batch():
    torch.manual_seed(5)
    x = torch.randint(1, 100, (2, 12))
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


def _loss_grads_saved(model, batch):
    """(loss, grads of trainable params, bytes saved for backward during the forward)."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    loss.backward()  # reentrant checkpoints support .backward() only, not autograd.grad
    return loss.detach(), [p.grad.clone() for p in params], sum(saved)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointing_same_grads_less_saved(tiny, use_reentrant):
    model, batch = _lora_llama(tiny), _batch()
    ref_loss, ref_grads, ref_saved = _loss_grads_saved(model, batch)
    enable_gradient_checkpointing(model, use_reentrant=use_reentrant)
    loss, grads, saved = _loss_grads_saved(model, batch)
    torch.testing.assert_close(loss, ref_loss)
    for got, want in zip(grads, ref_grads):
        assert got.abs().sum() > 0  # the frozen base still passes gradients to every adapter
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert saved < 0.7 * ref_saved, (saved, ref_saved)
    disable_gradient_checkpointing(model)
    assert not model.model.layers[0].gradient_checkpointing
    _, _, saved_after = _loss_grads_saved(model, batch)
    assert saved_after == ref_saved


def test_checkpointing_rejects_bad_input(tiny):
    with pytest.raises(ConfigError, match="not a transformers PreTrainedModel"):
        enable_gradient_checkpointing(torch.nn.Linear(3, 3))
    with pytest.raises(ConfigError, match="every_n_layers must be"):
        enable_gradient_checkpointing(tiny("llama"), every_n_layers=0)


@pytest.mark.skipif(not bitsandbytes_available(), reason="bitsandbytes not importable")
def test_adamw8bit_trains_with_uint8_states():
    torch.manual_seed(0)
    target = torch.randn(64, 128)
    weight = torch.nn.Parameter(torch.zeros(64, 128))
    opt = make_optimizer([weight], "adamw8bit", lr=0.05)
    first = None
    for _ in range(60):
        loss = (weight - target).pow(2).mean()
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.2 * first
    states = opt.state[weight]
    assert states["state1"].dtype == torch.uint8 and states["state2"].dtype == torch.uint8


def test_make_optimizer_picks_trainable_and_rejects_bad_input(tiny):
    model = peftlab.wrap(tiny("llama"), peftlab.LoraConfig(r=2, target_modules=["q_proj"]))
    opt = make_optimizer(model, "adamw", lr=1e-3)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable
    with pytest.raises(ConfigError, match="unknown optimizer 'sgd8'.*adamw8bit"):
        make_optimizer(model, "sgd8")
    with pytest.raises(ConfigError, match="lr must be > 0"):
        make_optimizer(model, lr=0)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        make_optimizer(tiny("llama").requires_grad_(False))


def _backward_matmuls(model, batch) -> int:
    """How many GEMMs (mm/addmm/bmm) run during loss.backward()."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("mm", "addmm", "addmm_", "bmm", "baddbmm"):
                Count.n += 1
            return func(*args, **(kwargs or {}))

    loss = model(**batch).loss
    with Count():
        loss.backward()
    return Count.n


def _cached_bytes(contexts) -> int:
    """Bytes of the distinct storages the selective checkpoints' forward contexts cache (kept to the backward)."""
    kept = {}
    for ctx in contexts:
        for per_op in ctx.storage.values():
            for item in per_op.values():
                for leaf in torch.utils._pytree.tree_leaves(item):
                    t = getattr(leaf, "val", leaf)
                    if isinstance(t, torch.Tensor) and t.numel():
                        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(kept.values())


def test_selective_checkpointing_same_grads_no_gemm_recompute(tiny, monkeypatch):
    """Selective recomputation: exact gradients, and backward runs no more GEMMs than without checkpointing
    (full checkpointing re-runs the forward's). What it keeps is measured: the tensors saved outside the blocks
    plus the checkpoint caches' contents (the checkpoint's hooks hide those from a saved-tensors hook)."""
    import torch.utils.checkpoint as tuc

    contexts = []
    real = tuc.create_selective_checkpoint_contexts

    def spy(*args, **kwargs):
        fwd, rec = real(*args, **kwargs)
        contexts.append(fwd)
        return fwd, rec

    monkeypatch.setattr(tuc, "create_selective_checkpoint_contexts", spy)
    model, batch = _lora_llama(tiny), _batch()
    ref_loss, ref_grads, ref_saved = _loss_grads_saved(model, batch)
    ref_gemms = _backward_matmuls(model, batch)
    enable_gradient_checkpointing(model, selective=True)
    loss, grads, saved = _loss_grads_saved(model, batch)
    torch.testing.assert_close(loss, ref_loss)
    for got, want in zip(grads, ref_grads):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    contexts.clear()
    loss = model(**batch).loss  # the forward again, to read the caches before the backward frees them
    assert len(contexts) == len(model.model.layers)  # one cache per block
    cached = _cached_bytes(contexts)
    loss.backward()
    # measured: ref 261,828 B; selective keeps 44,804 outside the blocks + 61,440 cached = 0.41x (a policy that
    # keeps every op's output caches 268,672: 1.2x)
    assert cached > 0 and saved + cached < 0.5 * ref_saved, (saved, cached, ref_saved)
    contexts.clear()
    assert _backward_matmuls(model, batch) == ref_gemms
    disable_gradient_checkpointing(model)
    enable_gradient_checkpointing(model)
    assert _backward_matmuls(model, batch) > ref_gemms


def test_selective_checkpointing_rejects_reentrant(tiny):
    with pytest.raises(ConfigError, match="use_reentrant=False"):
        enable_gradient_checkpointing(_lora_llama(tiny), use_reentrant=True, selective=True)


@pytest.mark.parametrize("branch_only", [False, True])
def test_selective_checkpointing_exact_through_lora_functions(branch_only):
    """Both LoRA autograd functions (fused base+LoRA, and the LoRA branch beside a quantized base's GEMM) give the
    same gradients under selective checkpointing: a cached GEMM output is never written again on recompute."""
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    from peftlab.backends.lora_ops import LoraBranchFunction, LoraLinearFunction
    from peftlab.training.memory import _keep_matmuls

    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, requires_grad=True)
    weight, bias = torch.randn(24, 16), torch.randn(24)
    lora_A = torch.randn(4, 16, requires_grad=True)
    lora_B = torch.randn(24, 4, requires_grad=True)

    def block(x, A, B):
        if branch_only:
            y = torch.nn.functional.linear(x, weight, bias) + LoraBranchFunction.apply(x, A, B, 0.5, 0.0, 0)
        else:
            y = LoraLinearFunction.apply(x, weight, bias, A, B, 0.5, 0.0, 0)
        return torch.nn.functional.silu(y) * y

    def grads(fn):
        for t in (x, lora_A, lora_B):
            t.grad = None
        fn(x, lora_A, lora_B).square().sum().backward()
        return [t.grad.clone() for t in (x, lora_A, lora_B)]

    want = grads(block)
    context = functools.partial(create_selective_checkpoint_contexts, _keep_matmuls, allow_cache_entry_mutation=True)
    got = grads(lambda *a: checkpoint(block, *a, use_reentrant=False, context_fn=context))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
