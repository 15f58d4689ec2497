"""Several adapters: combine() modes against their maths and HF PEFT, HF multi-adapter layout, bad input."""

from __future__ import annotations

import pytest
import torch

import peftlab
from helpers import perturb, slots, tiny_model
from peftlab.core.state import slots_of
from peftlab.persist.combine import combine_deltas

peft = pytest.importorskip("peft")

IDS = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))


def two_loras(family="llama", r=(4, 4), method="lora", dtype=torch.float32):
    model = tiny_model(family).to(dtype)
    for name, rank in zip("ab", r):
        if method == "lora":
            cfg = peftlab.LoraConfig(r=rank, alpha=2 * rank, target_modules=["q_proj", "v_proj"], adapter_name=name)
        else:
            cfg = peftlab.AdaLoraConfig(
                init_r=rank, target_r=2, total_steps=10, target_modules=["q_proj", "v_proj"], adapter_name=name
            )
        peftlab.wrap(model, cfg)
    perturb(model, 0.3)
    return model


def weighted_sum(model, names, weights):
    maps = [slots_of(model, n) for n in names]
    return {p: sum(w * m[p].delta_weight() for m, w in zip(maps, weights)) for p in maps[0]}


@pytest.mark.parametrize("how", ["cat", "linear"])
@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_cat_and_linear_are_exact(how, method):
    model = two_loras(method=method)
    want = weighted_sum(model, ["a", "b"], [0.7, -1.3])
    peftlab.combine(model, ["a", "b"], [0.7, -1.3], how=how, new_name="c")
    got = {p: s.delta_weight() for p, s in slots_of(model, "c").items()}
    for path in want:
        torch.testing.assert_close(got[path], want[path], rtol=1e-5, atol=1e-6)
    assert peftlab.active_adapters(model) == ["b"]  # combining does not switch the model


def test_cat_adds_ranks_and_runs_like_both_adapters():
    model = two_loras(r=(2, 6))
    peftlab.set_active_adapters(model, ["a", "b"], weights=[1.0, 0.5])
    with torch.no_grad():
        both = model(input_ids=IDS).logits
    peftlab.combine(model, ["a", "b"], [1.0, 0.5], how="cat", new_name="c")
    assert {s.r for s in slots(model, "LoraSlot", "c")} == {8}
    peftlab.set_active_adapters(model, "c")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, both, rtol=1e-5, atol=1e-5)


def test_svd_error_is_the_discarded_spectrum():
    model = two_loras(r=(4, 4))
    want = weighted_sum(model, ["a", "b"], [1.0, 1.0])
    peftlab.combine(model, ["a", "b"], [1.0, 1.0], how="svd", rank=3, new_name="s")
    for path, slot in slots_of(model, "s").items():
        sv = torch.linalg.svdvals(want[path])
        err = torch.linalg.matrix_norm(want[path] - slot.delta_weight())
        torch.testing.assert_close(err, sv[3:].square().sum().sqrt(), rtol=1e-4, atol=1e-6)
        assert slot.r == 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_svd_in_half_precision(dtype):
    model = two_loras(dtype=dtype)
    peftlab.combine(model, ["a", "b"], [0.5, 0.5], how="svd", rank=8, new_name="h")
    want = weighted_sum(model, ["a", "b"], [0.5, 0.5])
    for path, slot in slots_of(model, "h").items():
        torch.testing.assert_close(slot.delta_weight(), want[path], rtol=1e-4, atol=1e-5)  # rank 8 is exact here


@pytest.mark.parametrize("how", ["ties", "magnitude_prune"])
def test_ties_and_magnitude_prune_equal_hf_peft(how, tmp_path):
    model = two_loras()
    peftlab.combine(model, ["a", "b"], [0.8, 0.6], how=how, density=0.5, rank=4, new_name="m")
    peftlab.export_peft(model, tmp_path, adapter_name="a")
    peftlab.export_peft(model, tmp_path / "b", adapter_name="b")
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path), adapter_name="a")
    theirs.load_adapter(str(tmp_path / "b"), adapter_name="b")
    theirs.add_weighted_adapter(["a", "b"], [0.8, 0.6], "m", combination_type=f"{how}_svd", density=0.5, svd_rank=4)
    for path, slot in slots_of(model, "m").items():
        layer = theirs.base_model.model.get_submodule(path)
        torch.testing.assert_close(slot.delta_weight(), layer.get_delta_weight("m"), rtol=1e-4, atol=1e-5)


def test_dare_is_seeded_and_unbiased():
    gen = torch.Generator().manual_seed(0)
    deltas = [torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen)]
    w = [0.5, 1.5]
    one = combine_deltas(deltas, w, "dare_linear", 0.5, torch.Generator().manual_seed(7))
    two = combine_deltas(deltas, w, "dare_linear", 0.5, torch.Generator().manual_seed(7))
    assert torch.equal(one, two)
    draws = torch.stack([combine_deltas(deltas, w, "dare_linear", 0.5, torch.Generator().manual_seed(s)) for s in range(3000)])
    want = 0.5 * deltas[0] + 1.5 * deltas[1]
    # per entry the draw's std is ≤ 1.5·|Δ|·1 ≈ 3; the mean of 3000 draws has std ≤ 0.06
    assert (draws.mean(0) - want).abs().max() < 0.3
    model = two_loras()
    peftlab.combine(model, ["a", "b"], w, how="dare_ties", density=0.7, seed=3, new_name="d1")
    peftlab.combine(model, ["a", "b"], w, how="dare_ties", density=0.7, seed=3, new_name="d2")
    for path, slot in slots_of(model, "d1").items():
        torch.testing.assert_close(slot.delta_weight(), slots_of(model, "d2")[path].delta_weight(), rtol=0, atol=0)


def test_hf_multi_adapter_layout_both_ways(tmp_path):
    model = two_loras(r=(2, 4))
    outs = {}
    for name in ("a", "b"):
        peftlab.set_active_adapters(model, name)
        with torch.no_grad():
            outs[name] = model(input_ids=IDS).logits
    peftlab.export_peft(model, tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "b" / "adapter_config.json").is_file()
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path)).eval()  # root: the first adapter
    theirs.load_adapter(str(tmp_path / "b"), adapter_name="b")
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=IDS).logits, outs["a"], rtol=1e-5, atol=1e-5)
        theirs.set_adapter("b")
        torch.testing.assert_close(theirs(input_ids=IDS).logits, outs["b"], rtol=1e-5, atol=1e-5)
    theirs.save_pretrained(str(tmp_path / "by_peft"), selected_adapters=["default", "b"])
    back = peftlab.import_peft(tiny_model("llama"), tmp_path / "by_peft")
    assert peftlab.list_adapters(back) == ["default", "b"]
    for ours, name in (("default", "a"), ("b", "b")):
        peftlab.set_active_adapters(back, ours)
        with torch.no_grad():
            torch.testing.assert_close(back(input_ids=IDS).logits, outs[name], rtol=1e-5, atol=1e-5)


def test_load_adapter_into_a_wrapped_model_adds_it_inactive(tmp_path):
    model = two_loras()
    peftlab.save_adapter(model, tmp_path / "a", adapter_name="a")
    peftlab.set_active_adapters(model, "a")
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    other = peftlab.wrap(tiny_model("llama"), peftlab.LoraConfig(r=2, target_modules=["o_proj"], adapter_name="x"))
    peftlab.load_adapter(other, tmp_path / "a")
    assert peftlab.list_adapters(other) == ["x", "a"] and peftlab.active_adapters(other) == ["x"]
    peftlab.set_active_adapters(other, "a")
    with torch.no_grad():
        torch.testing.assert_close(other(input_ids=IDS).logits, want, rtol=1e-6, atol=1e-6)


def test_bad_input_is_a_clear_error(tmp_path):
    model = two_loras(r=(2, 4))
    with pytest.raises(peftlab.WrapError, match=r"unknown adapter name\(s\) \['zz'\]; this model has: a, b"):
        peftlab.set_active_adapters(model, ["zz"])
    with pytest.raises(peftlab.ConfigError, match="equal rank.*use how='cat'.*how='svd'"):
        peftlab.combine(model, ["a", "b"], [1, 1], how="linear")
    peftlab.wrap(model, peftlab.LoraConfig(r=2, target_modules=["o_proj"], adapter_name="o"))
    with pytest.raises(peftlab.ConfigError, match="adapt different modules"):
        peftlab.combine(model, ["a", "o"], [1, 1])
    peftlab.wrap(model, peftlab.AdapterConfig(style="pfeiffer", adapter_name="bn"))
    with pytest.raises(peftlab.ConfigError, match="not linear in their weights"):
        peftlab.combine(model, ["a", "bn"], [1, 1])
    ada = two_loras(method="adalora")
    peftlab.wrap(ada, peftlab.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], adapter_name="l"))
    with pytest.raises(peftlab.ConfigError, match="different methods"):
        peftlab.combine(ada, ["a", "l"], [1, 1])
    # deleting an adapter whose gradients no optimizer step has applied yet
    peftlab.set_active_adapters(model, "a", trainable="a")
    model(input_ids=IDS, labels=IDS).loss.backward()
    with pytest.raises(peftlab.WrapError, match="optimizer step is pending"):
        peftlab.delete_adapter(model, "a")
    peftlab.delete_adapter(model, "a", force=True)
    assert "a" not in peftlab.list_adapters(model)
    # loading under a name that exists
    peftlab.save_adapter(model, tmp_path / "b", adapter_name="b")
    with pytest.raises(peftlab.AdapterFileError, match="already has an adapter named 'b'"):
        peftlab.load_adapter(model, tmp_path / "b")
    with pytest.raises(peftlab.ConfigError, match="invalid adapter name"):
        peftlab.wrap(tiny_model("llama"), peftlab.LoraConfig(adapter_name="a.b"))


def test_failed_wrap_leaves_the_model_as_it_was():
    model = two_loras()
    before_keys = list(model.state_dict())
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(peftlab.TargetError):
        peftlab.wrap(model, peftlab.LoraConfig(target_modules=["q_proj", "nope"], adapter_name="c"))
    with pytest.raises(peftlab.WrapError):
        peftlab.wrap(model, peftlab.LoraConfig(target_modules=["q_proj"], adapter_name="a"))
    assert list(model.state_dict()) == before_keys
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert peftlab.list_adapters(model) == ["a", "b"] and peftlab.active_adapters(model) == ["b"]
