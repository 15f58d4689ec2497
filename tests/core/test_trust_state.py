"""Issue 29, state and validation: all-or-nothing multi-adapter operations, the merged-state rule, and input
validation (adapter names, weights, ranks, densities)."""

from __future__ import annotations

import pytest
import torch

import peftlab
import peftlab.api as api_module
from helpers import perturb, tiny_model
from peftlab import ConfigError, MergeError
from peftlab.core.layer import AdapterLayer

X = torch.tensor([[1, 5, 9, 13, 2, 7]])


def out(model):
    with torch.no_grad():
        return model(input_ids=X).logits.clone()


def two_lora(family="llama"):
    model = tiny_model(family)
    peftlab.wrap(model, peftlab.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], adapter_name="a"))
    peftlab.wrap(model, peftlab.LoraConfig(r=2, target_modules=["q_proj", "o_proj"], adapter_name="b"))
    perturb(model, 0.3)
    return model.eval()


def alone(model, names, weights=None):
    peftlab.set_active_adapters(model, names, weights)
    return out(model)


def snapshot(model):
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    return (
        out(model),
        peftlab.active_adapters(model),
        peftlab.list_adapters(model),
        {n: peftlab.is_merged(model, n) for n in peftlab.list_adapters(model)},
        [(list(la.active), dict(la.weights), list(la.merged_stack)) for la in layers],
    )


def assert_same(model, before):
    now = snapshot(model)
    torch.testing.assert_close(now[0], before[0], rtol=0, atol=1e-5)
    assert now[1:] == before[1:]


# ---- all or nothing -------------------------------------------------------------------------------


def with_houlsby():
    model = tiny_model("llama")
    peftlab.wrap(model, peftlab.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], adapter_name="a"))
    peftlab.wrap(model, peftlab.AdapterConfig(style="houlsby", reduction_factor=8, adapter_name="h"))
    perturb(model, 0.3)
    peftlab.set_active_adapters(model, ["a", "h"])
    return model.eval()


def test_merge_with_lora_and_houlsby_active_changes_nothing():
    model = with_houlsby()
    before = snapshot(model)
    with pytest.raises(MergeError, match="'h' cannot be merged"):
        peftlab.merge(model)
    assert_same(model, before)
    assert not peftlab.is_merged(model, "a")


def test_unwrap_merge_with_houlsby_changes_nothing():
    model = with_houlsby()
    before = snapshot(model)
    with pytest.raises(MergeError, match="'h' cannot be merged"):
        peftlab.unwrap(model, merge=True)
    assert_same(model, before)


def test_set_active_with_a_prefix_among_lora_changes_nothing():
    model = two_lora()
    peftlab.wrap(model, peftlab.PrefixConfig(num_virtual_tokens=2, adapter_name="p"))
    peftlab.wrap(model, peftlab.PrefixConfig(num_virtual_tokens=2, adapter_name="p2"))
    peftlab.set_active_adapters(model, ["a", "b"], [0.5, 2.0])
    before = snapshot(model)
    with pytest.raises(ConfigError, match="cannot be weighted"):
        peftlab.set_active_adapters(model, ["b", "a", "p"], [3.0, 1.0, 0.5])
    assert_same(model, before)
    with pytest.raises(ConfigError, match="cannot be active together"):
        peftlab.set_active_adapters(model, ["a", "p", "p2"])
    assert_same(model, before)
    peftlab.set_active_adapters(model, ["p"])  # a prefix active, then a failing switch: still that prefix
    before = snapshot(model)
    with pytest.raises(ConfigError, match="cannot be weighted"):
        peftlab.set_active_adapters(model, ["a", "p2"], [1.0, 2.0])
    assert_same(model, before)


def test_a_merge_failing_half_way_is_undone(monkeypatch):
    model = two_lora()
    peftlab.set_active_adapters(model, ["a", "b"], [1.0, 0.5])
    before = snapshot(model)
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer) and "b" in m.slots]
    real, calls = AdapterLayer.merge, []

    def flaky(self, name, safe=True):
        calls.append(name)
        if self is layers[-1] and name == "b":
            raise RuntimeError("disk on fire")
        return real(self, name, safe)

    monkeypatch.setattr(AdapterLayer, "merge", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        peftlab.merge(model)
    monkeypatch.undo()
    assert len(calls) > 2  # a's layers and some of b's merged before the failure, then were undone
    assert_same(model, before)


def test_an_unmerge_failing_half_way_is_undone(monkeypatch):
    model = two_lora()
    peftlab.set_active_adapters(model, ["a", "b"], [1.0, 0.5])
    peftlab.merge(model)
    before = snapshot(model)
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer) and m.merged_stack]
    real = AdapterLayer.unmerge

    def flaky(self, name=None):
        if self is layers[-1]:
            raise RuntimeError("disk on fire")
        return real(self, name)

    monkeypatch.setattr(AdapterLayer, "unmerge", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        peftlab.unmerge(model)
    with pytest.raises(RuntimeError, match="disk on fire"):
        peftlab.set_active_adapters(model, [])  # switching off unmerges first: the same failure, undone
    with pytest.raises(RuntimeError, match="disk on fire"):
        peftlab.delete_adapter(model, "b")
    monkeypatch.undo()
    assert_same(model, before)


def test_combine_failing_after_wrap_leaves_the_model_as_it_was(monkeypatch):
    model = two_lora()
    peftlab.set_active_adapters(model, ["a", "b"], [0.5, 2.0])
    before = snapshot(model)
    import peftlab.persist.combine as combine_module

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(combine_module, "load_adapter_tensors", broken)
    with pytest.raises(RuntimeError, match="boom"):
        peftlab.combine(model, ["a", "a"], [1.0, 1.0], how="svd", new_name="c")
    monkeypatch.undo()
    assert_same(model, before)
    assert "c" not in peftlab.list_adapters(model)


def test_combine_keeps_the_active_weights_and_merges():
    model = two_lora()
    peftlab.set_active_adapters(model, ["a", "b"], [0.5, 2.0])
    peftlab.merge(model, "a")
    before = snapshot(model)
    peftlab.combine(model, ["a", "a"], [1.0, 0.5], how="cat", new_name="c")
    now = snapshot(model)
    torch.testing.assert_close(now[0], before[0], rtol=0, atol=1e-5)
    assert now[1] == ["a", "b"] and now[3] == {"a": True, "b": False, "c": False}
    assert now[4][0][1] == before[4][0][1]  # the layers' weights


# ---- merged state is never hidden: a merged adapter that changes is unmerged first ----------------


def test_switching_away_from_a_merged_adapter_unmerges_it():
    model = two_lora()
    base = alone(model, [])
    only_b = alone(model, ["b"])
    half_a = alone(model, ["a"], [0.5])
    peftlab.set_active_adapters(model, ["a"])
    peftlab.merge(model)
    torch.testing.assert_close(alone(model, []), base, rtol=0, atol=1e-5)
    assert not peftlab.is_merged(model, "a")
    peftlab.set_active_adapters(model, ["a"])
    peftlab.merge(model)
    torch.testing.assert_close(alone(model, ["b"]), only_b, rtol=0, atol=1e-5)
    assert not peftlab.is_merged(model, "a")
    peftlab.set_active_adapters(model, ["a"])
    peftlab.merge(model)
    torch.testing.assert_close(alone(model, ["a"], [0.5]), half_a, rtol=0, atol=1e-5)  # reweighted
    assert not peftlab.is_merged(model, "a")
    peftlab.set_active_adapters(model, ["a"], [0.5])
    peftlab.merge(model)
    peftlab.set_active_adapters(model, ["a", "b"], [0.5, 1.0])  # a unchanged: stays merged
    assert peftlab.is_merged(model, "a")
    peftlab.set_active_adapters(model, ["a"], [0.0])
    assert not peftlab.is_merged(model, "a")
    torch.testing.assert_close(out(model), base, rtol=0, atol=1e-5)


def test_deleting_and_disabling_a_merged_adapter():
    model = two_lora()
    base = alone(model, [])
    full = alone(model, ["a", "b"])
    only_b = alone(model, ["b"])
    peftlab.set_active_adapters(model, ["a", "b"])
    peftlab.merge(model)
    with peftlab.disable_adapters(model):
        torch.testing.assert_close(out(model), base, rtol=0, atol=1e-5)
        assert not peftlab.is_merged(model, "a")
    assert peftlab.is_merged(model, "a") and peftlab.is_merged(model, "b")
    torch.testing.assert_close(out(model), full, rtol=0, atol=1e-5)
    peftlab.delete_adapter(model, "a")
    torch.testing.assert_close(out(model), only_b, rtol=0, atol=1e-5)
    assert peftlab.active_adapters(model) == ["b"] and peftlab.is_merged(model, "b")


def test_merging_an_inactive_adapter_activates_it_and_wrap_keeps_merged_ones_active():
    model = two_lora()
    only_a = alone(model, ["a"])
    peftlab.set_active_adapters(model, [])
    peftlab.merge(model, "a")
    assert peftlab.active_adapters(model) == ["a"]
    torch.testing.assert_close(out(model), only_a, rtol=0, atol=1e-5)
    peftlab.wrap(model, peftlab.LoraConfig(r=2, target_modules=["k_proj"], adapter_name="c"))
    assert peftlab.active_adapters(model) == ["a", "c"] and peftlab.is_merged(model, "a")
    torch.testing.assert_close(out(model), only_a, rtol=0, atol=1e-5)  # c starts at zero


# ---- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["forward", "keys", "training", "to", "state_dict", "x" * 65, "a.b", "", "1a", 7])
def test_bad_adapter_names_are_a_clear_config_error(name):
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="invalid adapter name"):
        peftlab.wrap(model, peftlab.LoraConfig(r=2, target_modules=["q_proj"], adapter_name=name))
    assert not peftlab.list_adapters(model) if hasattr(model, "peftlab_adapters") else True


def test_a_64_character_name_saves_and_loads(tmp_path):
    name = "n" * 64
    model = tiny_model("llama")
    peftlab.wrap(model, peftlab.LoraConfig(r=2, target_modules=["q_proj"], adapter_name=name))
    perturb(model, 0.3)
    peftlab.save_adapter(model, tmp_path / "x")
    fresh = peftlab.load_adapter(tiny_model("llama"), tmp_path / "x")
    torch.testing.assert_close(out(fresh), out(model.eval()), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "weights, match",
    [("0.5", "list of numbers"), (0.5, "list of numbers"), ([True], "finite numbers"),
     ([float("nan")], "finite numbers"), (["0.5"], "finite numbers"), ([1.0, 2.0], "one weight per adapter")],
)
def test_bad_weights_are_refused_and_change_nothing(weights, match):
    model = two_lora()
    before = snapshot(model)
    with pytest.raises(ConfigError, match=match):
        peftlab.set_active_adapters(model, ["a"], weights)
    assert_same(model, before)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"rank": 0}, "rank must be an integer ≥ 1"), ({"rank": 2.5}, "rank must be an integer"),
     ({"weights": "11"}, "list of numbers"), ({"names": "ab"}, "list of adapter names"),
     ({"density": 1.5, "how": "ties"}, r"density must be a finite number in \(0, 1\]"),
     ({"density": float("nan"), "how": "ties"}, "density"), ({"seed": -1}, "seed"),
     ({"new_name": "keys"}, "invalid adapter name")],
)
def test_bad_combine_arguments_are_refused_and_change_nothing(kwargs, match):
    model = two_lora()
    before = snapshot(model)
    args = {"names": ["a", "a"], "weights": [1.0, 1.0], "how": "svd", "new_name": "c"} | kwargs
    with pytest.raises(ConfigError, match=match):
        peftlab.combine(model, **args)
    assert_same(model, before)


def test_a_wrap_failing_late_keeps_the_active_weights_and_merges(monkeypatch):
    model = two_lora()
    peftlab.set_active_adapters(model, ["a", "b"], [0.5, 2.0])
    peftlab.merge(model, "a")
    before = snapshot(model)
    with pytest.raises(peftlab.TargetError):
        peftlab.wrap(model, peftlab.LoraConfig(r=2, target_modules=["nope_proj"], adapter_name="c"))
    assert_same(model, before)

    def broken(model):
        raise RuntimeError("routing failed")

    monkeypatch.setattr(api_module, "install_routing", broken)  # fails after the new adapter was activated
    with pytest.raises(RuntimeError, match="routing failed"):
        peftlab.wrap(model, peftlab.LoraConfig(r=2, target_modules=["k_proj"], adapter_name="c"))
    assert_same(model, before)


def test_weights_as_an_array_or_tensor_are_read_as_numbers():
    model = two_lora()
    expected = alone(model, ["a", "b"], [0.5, 2.0])
    torch.testing.assert_close(alone(model, ["a", "b"], torch.tensor([0.5, 2.0])), expected, rtol=0, atol=0)
    np = pytest.importorskip("numpy")
    torch.testing.assert_close(alone(model, ["a", "b"], np.array([0.5, 2.0])), expected, rtol=0, atol=0)
