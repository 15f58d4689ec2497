"""LoRA on parameters (``target_parameters``): per-expert LoRA on 3-D MoE expert stacks and on a router's weight.

References: a hand-written per-expert loop (W_e + s·B_e A_e with HF PEFT's factor layout) and HF PEFT itself
(``PeftModel.from_pretrained`` on our export computes our logits; native HF PEFT counts the same parameters).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from arch_zoo import build, inputs, labels, logits

import peftlab
from helpers import perturb
from peftlab.util.errors import ConfigError, TargetError

peft = pytest.importorskip("peft")

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def _out(model, arch):
    with torch.no_grad():
        return logits(model(**inputs(arch)))


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _peft_native(arch, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(build(arch), peft.LoraConfig(r=2, lora_alpha=4, **kw))


@pytest.mark.parametrize("arch", ["Qwen3-MoE", "GPT-OSS"])  # (E, out, in) and GPT-OSS's transposed (E, in, out)
def test_per_expert_update_matches_a_loop_over_experts(arch):
    """Adapted logits == the base model whose expert e is W_e + s·B_e A_e (B_e = B.view(d_out, r, E)[:, :, e])."""
    model = peftlab.wrap(build(arch), peftlab.LoraConfig(r=2, alpha=4, target_parameters=EXPERTS))
    perturb(model, scale=0.2)
    reference = build(arch)
    with torch.no_grad():
        for path, module in model.named_modules():
            if not hasattr(module, "lora_param_A"):
                continue
            base = reference.get_submodule(path)
            transposed = getattr(base, "is_transposed", False)
            for param in ("gate_up_proj", "down_proj"):
                a, b = module.lora_param_A["default"][param], module.lora_param_B["default"][param]
                w = getattr(base, param)
                experts, r = w.shape[0], a.shape[0] // w.shape[0]
                for e in range(experts):
                    a_e = a[e * r : (e + 1) * r]  # (r, d_in)
                    b_e = b.view(b.shape[0], r, experts)[:, :, e]  # (d_out, r)
                    delta = 2.0 * (b_e @ a_e)  # s = alpha / r = 2, (d_out, d_in)
                    w[e] += delta.t() if transposed else delta
    assert torch.allclose(_out(model, arch), _out(reference, arch), atol=1e-5)
    assert not torch.allclose(_out(model, arch), _out(build(arch), arch), atol=1e-3)


def test_merge_and_unmerge_are_exact():
    arch = "Mixtral"
    model = peftlab.wrap(build(arch), peftlab.LoraConfig(r=2, alpha=4, target_modules="all-linear"))
    perturb(model, scale=0.2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "experts" in n and "lora" not in n}
    expected = _out(model, arch)
    peftlab.merge(model)
    assert torch.allclose(_out(model, arch), expected, atol=1e-5)
    merged = dict(model.named_parameters())
    assert any(not torch.equal(merged[n], v) for n, v in before.items())  # the stacks changed
    peftlab.unmerge(model)
    assert torch.allclose(_out(model, arch), expected, atol=1e-5)
    after = dict(model.named_parameters())
    assert all(torch.allclose(after[n], v, atol=1e-6) for n, v in before.items())


@pytest.mark.parametrize(
    "arch, kw",
    [
        ("Qwen3-MoE", dict(target_modules="all-linear")),  # experts (gate_up at 2r, as HF PEFT) + router + attention
        ("Mixtral", dict(target_parameters=EXPERTS)),  # the parameters alone (HF PEFT: target_modules=[])
        ("GPT-OSS", dict(target_modules=["q_proj", "v_proj"], target_parameters=EXPERTS)),  # transposed stacks
    ],
)
def test_export_loads_in_peft_with_our_logits_and_imports_back(tmp_path, arch, kw):
    model = peftlab.wrap(build(arch), peftlab.LoraConfig(r=2, alpha=4, **kw))
    perturb(model, scale=0.2)
    ours = _out(model, arch)
    peftlab.export_peft(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(build(arch), tmp_path).eval()
    assert torch.allclose(_out(loaded, arch), ours, atol=1e-5)
    native = _peft_native(arch, target_modules=kw.get("target_modules", []), target_parameters=kw.get("target_parameters"))
    assert _trainable(model) == _trainable(native)
    back = peftlab.import_peft(build(arch), tmp_path)
    assert torch.allclose(_out(back, arch), ours, atol=1e-6)


def test_all_linear_adapts_the_experts_and_router_as_peft_does():
    model = peftlab.wrap(build("Qwen3-MoE"), peftlab.LoraConfig(r=2, alpha=4, target_modules="all-linear"))
    adapted = model.peftlab_adapters["default"].info["target_parameters"]
    assert sorted({p.rsplit(".", 2)[-2] + "." + p.rsplit(".", 1)[-1] for p in adapted}) == [
        "experts.down_proj", "experts.gate_up_proj", "gate.weight"
    ]  # fmt: skip
    assert _trainable(model) == _trainable(_peft_native("Qwen3-MoE", target_modules="all-linear"))


def test_all_linear_warns_naming_the_stacks_it_leaves_frozen():
    """GPT-OSS's experts were never linear layers (HF PEFT's all-linear skips them too): a warning names them."""
    with pytest.warns(UserWarning, match=r"experts\.gate_up_proj.*target_parameters=\['down_proj', 'gate_up_proj'\]"):
        model = peftlab.wrap(build("GPT-OSS"), peftlab.LoraConfig(r=2, target_modules="all-linear"))
    assert "target_parameters" not in model.peftlab_adapters["default"].info


def test_llama4_router_is_adapted_as_a_parameter():
    """Llama-4's router subclasses nn.Linear but returns (scores, logits): LoRA goes on its weight, and the
    module's own forward runs (an output-adding LoRA would crash on the tuple)."""
    model = peftlab.wrap(build("Llama-4"), peftlab.LoraConfig(r=2, target_modules="all-linear", target_parameters=EXPERTS))
    info = model.peftlab_adapters["default"].info["target_parameters"]
    assert any(p.endswith("router.weight") for p in info)
    perturb(model)
    _out(model, "Llama-4")


def test_training_updates_the_expert_factors_and_lowers_the_loss():
    arch = "OLMoE"
    model = peftlab.wrap(build(arch), peftlab.LoraConfig(r=4, alpha=8, target_parameters=EXPERTS)).train()
    batch = dict(inputs(arch, batch=4), labels=labels(arch, batch=4))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    start = copy.deepcopy({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, start[n])]
    assert any("lora_param_B" in n and "gate_up_proj" in n for n in moved)


def test_bad_target_parameters_are_refused_with_the_reason():
    with pytest.raises(TargetError, match="experts.up_proj.*3-D expert parameters here: model.layers.0.mlp.experts"):
        peftlab.wrap(build("Qwen3-MoE"), peftlab.LoraConfig(target_parameters=["experts.up_proj"]))
    with pytest.raises(ConfigError, match="dropout=0.1"):
        peftlab.LoraConfig(target_parameters=EXPERTS, dropout=0.1)
    with pytest.raises(ConfigError, match="target_parameters must be a non-empty list"):
        peftlab.LoraConfig(target_parameters="experts.down_proj")
    with pytest.raises(ConfigError, match="both by target_modules and target_parameters"):
        peftlab.wrap(build("Llama-4"), peftlab.LoraConfig(target_modules=["gate_proj"], target_parameters=["gate_proj.weight"]))
    model = build("Qwen3-MoE")
    state = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(TargetError):
        peftlab.wrap(model, peftlab.LoraConfig(target_modules=["q_proj"], target_parameters=["nothing_here"]))
    assert all(torch.equal(state[n], p) for n, p in model.state_dict().items())  # all or nothing
    assert not hasattr(model, "peftlab_adapters")


def _two_expert_adapters(arch="Qwen3-MoE", **kw_b):
    model = peftlab.wrap(build(arch), peftlab.LoraConfig(r=2, alpha=4, target_parameters=EXPERTS, adapter_name="a"))
    peftlab.wrap(model, peftlab.LoraConfig(r=kw_b.pop("r", 2), alpha=3, target_parameters=EXPERTS, adapter_name="b",
                                           **kw_b))
    perturb(model, scale=0.2)
    return model.eval()


def _deltas(model, name):
    """{module path.param: s·ΔW (E, d1, d2)} of adapter ``name``'s parameter slots."""
    return {
        f"{p}.{q}": m.slots[name].delta(q)
        for p, m in model.named_modules() if name in getattr(m, "slots", {}) and m.slots[name].params
        for q in m.slots[name].params
    }


@pytest.mark.parametrize("arch, how, kw", [
    ("Qwen3-MoE", "cat", {"r": 3, "use_rslora": True}),  # ranks and scalings differ: cat stacks them
    ("GPT-OSS", "linear", {}),  # the transposed (E, in, out) stacks
    ("Qwen3-MoE", "svd", {"rank": 4}),  # rank 4 = r_a + r_b: the SVD of each expert's sum is exact
])
def test_combine_expert_adapters_is_the_weighted_sum_of_updates(arch, how, kw):
    """combine on target_parameters adapters: every expert's ΔW is w_a ΔW_a + w_b ΔW_b, and the logits are those of
    the two adapters active at those weights (HF PEFT's add_weighted_adapter refuses these adapters)."""
    kw = dict(kw)
    rank = kw.pop("rank", None)
    model = _two_expert_adapters(arch, **kw)
    peftlab.combine(model, ["a", "b"], [0.7, -0.4], how=how, new_name="c", rank=rank)
    da, db, dc = _deltas(model, "a"), _deltas(model, "b"), _deltas(model, "c")
    assert set(dc) == set(da) == set(db)
    for key in dc:
        torch.testing.assert_close(dc[key], 0.7 * da[key] + -0.4 * db[key], rtol=1e-4, atol=1e-5)
    peftlab.set_active_adapters(model, ["a", "b"], [0.7, -0.4])
    both = _out(model, arch)
    peftlab.set_active_adapters(model, ["c"])
    torch.testing.assert_close(_out(model, arch), both, rtol=1e-4, atol=1e-5)


def test_combine_all_linear_adapters_on_linears_stacks_and_router(tmp_path):
    """all-linear on Mixtral adapts attention linears, the experts (gate_up_proj at rank 2r) and the router weight;
    cat combines all three kinds into one adapter with the logits of the two active at those weights, and HF PEFT
    loads its export with those logits."""
    model = build("Mixtral")
    for name, r in (("a", 2), ("b", 4)):
        peftlab.wrap(model, peftlab.LoraConfig(r=r, alpha=2 * r, target_modules="all-linear", adapter_name=name))
    perturb(model, scale=0.2)
    model.eval()
    peftlab.combine(model, ["a", "b"], [0.5, 1.5], how="cat", new_name="c")
    peftlab.set_active_adapters(model, ["a", "b"], [0.5, 1.5])
    both = _out(model, "Mixtral")
    peftlab.set_active_adapters(model, ["c"])
    torch.testing.assert_close(_out(model, "Mixtral"), both, rtol=1e-4, atol=1e-5)
    assert _trainable_of(model, "c") == _trainable_of(model, "a") + _trainable_of(model, "b")  # cat: ranks add
    peftlab.export_peft(model, tmp_path, adapter_name="c")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(build("Mixtral"), tmp_path).eval()
    torch.testing.assert_close(_out(loaded, "Mixtral"), both, rtol=1e-4, atol=1e-5)


def _trainable_of(model, name) -> int:
    from peftlab.core.tensors import adapter_tensors

    return sum(t.numel() for t in adapter_tensors(model, name).values())


def test_combine_ties_on_expert_stacks_follows_the_dense_rule():
    """The task-arithmetic modes act on the dense (E, d_out, d_in) stacks (trim over the whole stack); at full rank
    the result is exactly combine_deltas of the two adapters' updates."""
    from peftlab.persist.combine import combine_deltas

    model = _two_expert_adapters()
    peftlab.combine(model, ["a", "b"], [1.0, 0.5], how="ties", density=0.5, rank=32, new_name="c")
    da, db, dc = _deltas(model, "a"), _deltas(model, "b"), _deltas(model, "c")
    for key in dc:
        want = combine_deltas([da[key], db[key]], [1.0, 0.5], "ties", 0.5)
        torch.testing.assert_close(dc[key], want, rtol=1e-4, atol=1e-5)


def test_combine_refuses_expert_adapters_on_different_parameters():
    model = peftlab.wrap(build("Qwen3-MoE"), peftlab.LoraConfig(target_parameters=EXPERTS, adapter_name="a"))
    peftlab.wrap(model, peftlab.LoraConfig(target_parameters=EXPERTS[:1], adapter_name="b"))
    with pytest.raises(ConfigError, match="adapt different modules .*down_proj"):
        peftlab.combine(model, ["a", "b"], [0.5, 0.5], how="cat", new_name="c")
    assert peftlab.list_adapters(model) == ["a", "b"]


def test_gemma4_moe_experts_held_by_the_layer_merge_exactly_and_load_in_peft(tmp_path):
    """Gemma-4's MoE layout (experts beside a dense mlp in the decoder layer, no MoE block module): per-expert LoRA
    changes the logits, merges exactly, and HF PEFT computes our logits from the export."""
    from arch_zoo import gemma4_moe

    model = peftlab.wrap(gemma4_moe(), peftlab.LoraConfig(r=2, alpha=4, target_modules=["q_proj"],
                                                          target_parameters=EXPERTS))  # fmt: skip
    perturb(model, 0.5)
    x = inputs("Gemma-4")
    with torch.no_grad():
        ours = model(**x).logits
        assert (ours - gemma4_moe()(**x).logits).abs().max() > 1e-2
    peftlab.export_peft(model, tmp_path / "export")
    theirs = peft.PeftModel.from_pretrained(gemma4_moe(), str(tmp_path / "export")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**x).logits, ours, rtol=0, atol=1e-5)
    peftlab.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, ours, rtol=0, atol=1e-5)
