"""The contract every method keeps on every model family, in one parametrised suite.

Cases (method × family): identity at init; merge then unmerge restores the model (and merged ==
unmerged outputs where the method merges); disable == base; save/load round trip; two adapters on
the same modules save and load independently; switching the active adapter == a model with only
that adapter. A new method is one row in ``METHODS``.
"""

from __future__ import annotations

import pytest
import torch

import peftlab
from helpers import perturb, tiny_model
from peftlab.util.errors import MergeError

FAMILIES = ["bert", "llama", "gpt2"]


def _config(method: str, family: str, name: str, r: int = 4):
    if method == "lora":
        return peftlab.LoraConfig(r=r, alpha=2 * r, target_modules="all-linear", adapter_name=name)
    if method in ("dora", "pissa"):  # LoRA variants (issue 16)
        variant = {"use_dora": True} if method == "dora" else {"init": "pissa"}
        return peftlab.LoraConfig(r=r, alpha=2 * r, target_modules="all-linear", adapter_name=name, **variant)
    if method == "adalora":
        return peftlab.AdaLoraConfig(init_r=r, target_r=2, total_steps=10, target_modules="all-linear", adapter_name=name)
    if method in ("houlsby", "pfeiffer", "parallel"):
        return peftlab.AdapterConfig(style=method, reduction_factor=4, adapter_name=name)
    if method == "prefix":
        return peftlab.PrefixConfig(num_virtual_tokens=3, projection_dim=8 if r == 4 else None, adapter_name=name)
    raise ValueError(method)


METHODS = ["lora", "dora", "pissa", "adalora", "houlsby", "pfeiffer", "parallel", "prefix"]
MERGEABLE = {"lora", "dora", "pissa", "adalora"}
# Cells the library refuses today, with the error it must give (architecture breadth: tests/test_arch_matrix.py).
REFUSED: dict = {}
CASES = [(m, f) for m in METHODS for f in FAMILIES]


def _inputs(family: str) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0 if family == "bert" else 1
    return {"input_ids": ids, "attention_mask": mask}


def _out(model, family: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs(family)).logits.float()


def _wrapped(method: str, family: str, names=("a",)):
    model = tiny_model(family)
    if (method, family) in REFUSED:
        with pytest.raises(REFUSED[(method, family)]):
            peftlab.wrap(model, _config(method, family, names[0]))
        pytest.skip(f"{method} on {family} is refused with a clear error (checked above)")
    for i, name in enumerate(names):
        peftlab.wrap(model, _config(method, family, name, r=4 + 4 * i))
    return model


@pytest.mark.parametrize("method,family", CASES)
def test_identity_at_init(method, family):
    base = _out(tiny_model(family), family)
    model = _wrapped(method, family)
    if method == "prefix":  # a prefix attends to n learned tokens from the start: no identity init exists
        with peftlab.disable_adapters(model):
            torch.testing.assert_close(_out(model, family), base, rtol=0, atol=1e-6)
        return
    torch.testing.assert_close(_out(model, family), base, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method,family", CASES)
def test_merge_unmerge_and_disable(method, family):
    base = _out(tiny_model(family), family)
    model = _wrapped(method, family)
    perturb(model, 0.2)
    before = _out(model, family)
    assert (before - base).abs().max() > 1e-3, "perturbed adapter must change the output"
    with peftlab.disable_adapters(model):
        torch.testing.assert_close(_out(model, family), base, rtol=0, atol=1e-6)
    if method in MERGEABLE or method == "prefix":
        peftlab.merge(model)
        torch.testing.assert_close(_out(model, family), before, rtol=1e-4, atol=1e-5)
        with pytest.raises(MergeError, match="merged"):
            with peftlab.disable_adapters(model):
                pass
        peftlab.unmerge(model)
    else:
        with pytest.raises(MergeError, match="cannot be merged"):
            peftlab.merge(model)
    torch.testing.assert_close(_out(model, family), before, rtol=1e-5, atol=1e-6)
    plain = peftlab.unwrap(model)
    torch.testing.assert_close(_out(plain, family), base, rtol=1e-5, atol=1e-6)
    assert not hasattr(plain, "peftlab_adapters")


@pytest.mark.parametrize("method,family", CASES)
def test_save_load_round_trip(method, family, tmp_path):
    model = _wrapped(method, family)
    perturb(model, 0.2)
    expected = _out(model, family)
    peftlab.save_adapter(model, tmp_path / "a")
    fresh = peftlab.load_adapter(tiny_model(family), tmp_path / "a")
    torch.testing.assert_close(_out(fresh, family), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method,family", CASES)
def test_two_adapters_independent_and_switching(method, family, tmp_path):
    model = _wrapped(method, family, names=("a", "b"))
    assert peftlab.list_adapters(model) == ["a", "b"] and peftlab.active_adapters(model) == ["b"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("b" in n.split(".") for n in trainable), sorted(trainable)[:3]
    perturb(model, 0.2)
    outs = {}
    for name in ("a", "b"):
        peftlab.set_active_adapters(model, name)
        outs[name] = _out(model, family)
    assert (outs["a"] - outs["b"]).abs().max() > 1e-5
    # a wrapped module holds both adapters in one wrapper (never a wrapper around a wrapper)
    assert not any(type(m).__name__ == "AdapterLayer" for m in (getattr(x, "base_layer", None) for x in model.modules()))
    peftlab.save_adapter(model, tmp_path / "both")
    for name in ("a", "b"):
        peftlab.save_adapter(model, tmp_path / name, adapter_name=name)
        only = peftlab.load_adapter(tiny_model(family), tmp_path / name)
        torch.testing.assert_close(_out(only, family), outs[name], rtol=1e-6, atol=1e-6)
    reloaded = peftlab.load_adapter(tiny_model(family), tmp_path / "both")
    assert peftlab.list_adapters(reloaded) == ["a", "b"]
    for name in ("a", "b"):
        peftlab.set_active_adapters(reloaded, name)
        torch.testing.assert_close(_out(reloaded, family), outs[name], rtol=1e-6, atol=1e-6)
    # deleting one leaves the other exactly as it was
    peftlab.delete_adapter(model, "a")
    peftlab.set_active_adapters(model, "b")
    torch.testing.assert_close(_out(model, family), outs["b"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_weighted_lora_combination_is_sum_of_updates(family):
    base = tiny_model(family)
    model = _wrapped("lora", family, names=("a", "b"))
    perturb(model, 0.2)
    peftlab.set_active_adapters(model, ["a", "b"], weights=[0.5, -1.5])
    both = _out(model, family)
    peftlab.merge(model)  # merges each active adapter with its weight
    torch.testing.assert_close(_out(model, family), both, rtol=1e-4, atol=1e-5)
    peftlab.unmerge(model)
    plain = peftlab.unwrap(model)
    for (n, p), (_, q) in zip(plain.named_parameters(), base.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)
