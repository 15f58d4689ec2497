"""The contract every method keeps on every model family, as plain check functions.

Each check takes ``make_config(adapter_name, r) -> PeftConfig`` (a method's example, from its registry entry)
and a tiny model family: identity at init; merge then unmerge restores the model (merged == unmerged where the
method merges); disable == base; save/load round trip; two adapters on the same modules save, load, switch
and delete independently. ``test_contract.py`` runs them for every registered method; ``test_toy_method.py``
for a method defined in the test alone.
"""

from __future__ import annotations

import pytest
import torch

import peftlab
from helpers import perturb, tiny_model
from peftlab.core.layer import AdapterLayer
from peftlab.core.registry import get_method
from peftlab.util.errors import MergeError

FAMILIES = ["bert", "llama", "gpt2"]


def inputs(family: str) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0 if family == "bert" else 1
    return {"input_ids": ids, "attention_mask": mask}


def out(model, family: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(family)).logits.float()


def wrapped(make_config, family: str, names=("a",)):
    model = tiny_model(family)
    for i, name in enumerate(names):
        peftlab.wrap(model, make_config(name, 4 + 4 * i))
    return model


def merges(model, name: str) -> bool:
    """Whether ``merge`` takes the adapter: every slot mergeable (or a head copy); a method without slots
    (prefix tuning) merges through its own hook."""
    slots = [m.slots[name] for m in model.modules() if isinstance(m, AdapterLayer) and name in m.slots]
    return all(s.mergeable or s.replaces_base for s in slots)


def check_identity_at_init(make_config, family: str) -> None:
    base = out(tiny_model(family), family)
    model = wrapped(make_config, family)
    if not get_method(make_config("a", 4).method).identity_at_init:  # a prefix attends to n learned tokens
        with peftlab.disable_adapters(model):
            torch.testing.assert_close(out(model, family), base, rtol=0, atol=1e-6)
        return
    torch.testing.assert_close(out(model, family), base, rtol=0, atol=1e-6)


def check_merge_unmerge_and_disable(make_config, family: str) -> None:
    base = out(tiny_model(family), family)
    model = wrapped(make_config, family)
    perturb(model, 0.2)
    before = out(model, family)
    assert (before - base).abs().max() > 1e-3, "perturbed adapter must change the output"
    with peftlab.disable_adapters(model):
        torch.testing.assert_close(out(model, family), base, rtol=0, atol=1e-6)
    if merges(model, "a"):
        peftlab.merge(model)
        torch.testing.assert_close(out(model, family), before, rtol=1e-4, atol=1e-5)
        with peftlab.disable_adapters(model):  # a merged adapter is unmerged inside, merged again after
            torch.testing.assert_close(out(model, family), base, rtol=1e-4, atol=1e-5)
        assert peftlab.is_merged(model, "a")
        torch.testing.assert_close(out(model, family), before, rtol=1e-4, atol=1e-5)
        peftlab.unmerge(model)
    else:
        with pytest.raises(MergeError, match="cannot be merged"):
            peftlab.merge(model)
    torch.testing.assert_close(out(model, family), before, rtol=1e-5, atol=1e-6)
    plain = peftlab.unwrap(model)
    torch.testing.assert_close(out(plain, family), base, rtol=1e-5, atol=1e-6)
    assert not hasattr(plain, "peftlab_adapters")


def check_save_load_round_trip(make_config, family: str, tmp_path) -> None:
    model = wrapped(make_config, family)
    perturb(model, 0.2)
    expected = out(model, family)
    peftlab.save_adapter(model, tmp_path / "a")
    fresh = peftlab.load_adapter(tiny_model(family), tmp_path / "a")
    torch.testing.assert_close(out(fresh, family), expected, rtol=1e-6, atol=1e-6)


def check_two_adapters_independent_and_switching(make_config, family: str, tmp_path) -> None:
    model = wrapped(make_config, family, names=("a", "b"))
    assert peftlab.list_adapters(model) == ["a", "b"] and peftlab.active_adapters(model) == ["b"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("b" in n.split(".") for n in trainable), sorted(trainable)[:3]
    perturb(model, 0.2)
    outs = {}
    for name in ("a", "b"):
        peftlab.set_active_adapters(model, name)
        outs[name] = out(model, family)
    assert (outs["a"] - outs["b"]).abs().max() > 1e-5
    # a wrapped module holds both adapters in one wrapper (never a wrapper around a wrapper)
    assert not any(isinstance(getattr(m, "base_layer", None), AdapterLayer) for m in model.modules())
    peftlab.save_adapter(model, tmp_path / "both")
    for name in ("a", "b"):
        peftlab.save_adapter(model, tmp_path / name, adapter_name=name)
        only = peftlab.load_adapter(tiny_model(family), tmp_path / name)
        torch.testing.assert_close(out(only, family), outs[name], rtol=1e-6, atol=1e-6)
    reloaded = peftlab.load_adapter(tiny_model(family), tmp_path / "both")
    assert peftlab.list_adapters(reloaded) == ["a", "b"]
    for name in ("a", "b"):
        peftlab.set_active_adapters(reloaded, name)
        torch.testing.assert_close(out(reloaded, family), outs[name], rtol=1e-6, atol=1e-6)
    # deleting one leaves the other exactly as it was
    peftlab.delete_adapter(model, "a")
    peftlab.set_active_adapters(model, "b")
    torch.testing.assert_close(out(model, family), outs["b"], rtol=1e-6, atol=1e-6)


CHECKS = {
    "identity_at_init": lambda make, family, tmp_path: check_identity_at_init(make, family),
    "merge_unmerge_and_disable": lambda make, family, tmp_path: check_merge_unmerge_and_disable(make, family),
    "save_load_round_trip": check_save_load_round_trip,
    "two_adapters_independent_and_switching": check_two_adapters_independent_and_switching,
}
