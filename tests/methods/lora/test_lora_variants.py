"""LoRA variants: DoRA against a direct fp64 implementation of its formula and against HF PEFT,
and the initialisations (gaussian, PiSSA, OLoRA, LoftQ) against HF PEFT's ``init_lora_weights``.

DoRA: W' = m ⊙ (W + s·B A) / ‖W + s·B A‖_row with the norm a constant in backward; y = W' x + b.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch

import peftlab
from helpers import perturb, slots, tiny_model
from peftlab.util.errors import ConfigError

peft = pytest.importorskip("peft")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _dora_reference(x, weight, bias, lora_a, lora_b, magnitude, scaling):
    """y = (m ⊙ V/‖V‖_row) x + b, V = W + s·B A, everything fp64, the norm detached."""
    v = weight + scaling * lora_b @ lora_a
    norm = torch.linalg.vector_norm(v, dim=1).detach()
    y = x @ ((magnitude / norm).unsqueeze(1) * v).t()
    return y if bias is None else y + bias


def _layer_and_dense(model, path):
    from peftlab.core.layer import get_base_weight

    layer = model.get_submodule(path)
    slot = layer.slots["default"]
    return layer, slot, get_base_weight(layer.base_layer).detach().float()


@pytest.mark.parametrize("family,path", [
    ("llama", "model.layers.0.self_attn.q_proj"),  # no bias
    ("bert", "bert.encoder.layer.0.attention.self.query"),  # bias
    ("gpt2", "transformer.h.0.attn.c_attn"),  # Conv1D (weight stored transposed)
])  # fmt: skip
def test_dora_output_grads_merge_equal_fp64_formula(family, path):
    model = tiny_model(family)
    peftlab.wrap(model, peftlab.LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=True))
    perturb(model, 0.3)
    layer, slot, weight = _layer_and_dense(model, path)
    layer.train()
    bias = getattr(layer.base_layer, "bias", None)
    x = torch.randn(3, 5, weight.shape[1], generator=torch.Generator().manual_seed(0), requires_grad=True)
    probe = torch.randn(3, 5, weight.shape[0], generator=torch.Generator().manual_seed(1))
    for step in range(2):  # the second step runs after an optimizer update: the cached norm must follow A, B
        y = layer(x)
        (y * probe).sum().backward()
        params = {"A": slot.lora_A, "B": slot.lora_B, "m": slot.magnitude}
        ref_in = {k: p.detach().double().requires_grad_() for k, p in params.items()}
        x64 = x.detach().double().requires_grad_()
        b64 = None if bias is None else bias.detach().double()
        ref = _dora_reference(x64, weight.double(), b64, ref_in["A"], ref_in["B"], ref_in["m"], slot.scaling)
        (ref * probe.double()).sum().backward()
        assert _rel(y.detach(), ref.detach()) < 1e-5
        assert _rel(x.grad, x64.grad) < 1e-5
        for k, p in params.items():
            assert _rel(p.grad, ref_in[k].grad) < 1e-5, k
        with torch.no_grad():
            for p in params.values():
                p.sub_(0.1 * p.grad)
                p.grad = None
            x.grad = None
    # merge writes W' (fp64 formula), unmerge restores W
    layer.eval()
    with torch.no_grad():
        v = weight.double() + slot.scaling * slot.lora_B.double() @ slot.lora_A.double()
        expected = (slot.magnitude.double() / torch.linalg.vector_norm(v, dim=1)).unsqueeze(1) * v
        peftlab.merge(model)
        assert _rel(_layer_and_dense(model, path)[2], expected) < 1e-5
        peftlab.unmerge(model)
        assert _rel(_layer_and_dense(model, path)[2], weight) < 1e-6


@pytest.mark.parametrize("family,path", [
    ("bert", "bert.encoder.layer.0.attention.self.query"),  # nn.Linear
    ("gpt2", "transformer.h.0.attn.c_attn"),  # Conv1D (weight stored transposed)
])  # fmt: skip
def test_dora_trainable_bias_equals_fp64_formula(family, path):
    """bias="lora_only": the base bias trains; dL/db = Σ_rows g (b sits outside the rescaled direction), and a
    non-zero b enters dL/dm = Σ g ⊙ (y − b)/n. Two steps: the second after an update of A, B, m and b."""
    model = tiny_model(family)
    peftlab.wrap(model, peftlab.LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=True, bias="lora_only"))
    perturb(model, 0.3)
    layer, slot, weight = _layer_and_dense(model, path)
    bias = layer.base_layer.bias
    assert bias.requires_grad
    with torch.no_grad():
        bias.add_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(2)))  # a zero b hides its terms
    layer.train()
    x = torch.randn(3, 5, weight.shape[1], generator=torch.Generator().manual_seed(0), requires_grad=True)
    probe = torch.randn(3, 5, weight.shape[0], generator=torch.Generator().manual_seed(1))
    params = {"A": slot.lora_A, "B": slot.lora_B, "m": slot.magnitude, "b": bias}
    for _ in range(2):
        y = layer(x)
        (y * probe).sum().backward()
        ref_in = {k: p.detach().double().requires_grad_() for k, p in params.items()}
        x64 = x.detach().double().requires_grad_()
        ref = _dora_reference(x64, weight.double(), ref_in["b"], ref_in["A"], ref_in["B"], ref_in["m"], slot.scaling)
        (ref * probe.double()).sum().backward()
        assert _rel(y.detach(), ref.detach()) < 1e-5
        assert _rel(x.grad, x64.grad) < 1e-5
        for k, p in params.items():
            assert _rel(p.grad, ref_in[k].grad) < 1e-5, k
        with torch.no_grad():
            for p in params.values():
                p.sub_(0.1 * p.grad)
                p.grad = None
            x.grad = None


def test_dora_norm_never_forms_the_full_update(monkeypatch):
    """The norm is thin products only: no (d_out, d_in) product B A is built in forward or backward."""
    model = tiny_model("llama")
    peftlab.wrap(model, peftlab.LoraConfig(r=4, alpha=8, target_modules=["q_proj"], use_dora=True))
    perturb(model, 0.3)
    slot = slots(model, "DoraSlot")[0]
    d_out, d_in = slot.out_features, slot.in_features
    shapes = []
    real_mm = torch.Tensor.__matmul__

    def spy(a, b):
        out = real_mm(a, b)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    model.train()
    model(input_ids=_ids(), labels=_ids()).loss.backward()
    assert shapes and (d_out, d_in) not in shapes


@pytest.mark.parametrize("bits", [4, 8])
def test_dora_on_quantized_base(bits):
    pytest.importorskip("bitsandbytes")
    from peftlab.backends.quant.bnb import dequantize_weight

    model = peftlab.quantize(tiny_model("llama"), bits=bits)
    base_out = _logits(model, _ids())
    peftlab.wrap(model, peftlab.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True))
    torch.testing.assert_close(_logits(model, _ids()), base_out, rtol=0, atol=1e-6)  # m = ‖W‖: the base at init
    perturb(model, 0.3)
    layer = model.get_submodule("model.layers.0.self_attn.v_proj")
    slot = layer.slots["default"]
    weight = dequantize_weight(layer.base_layer).double()
    x = torch.randn(4, weight.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = layer.base_layer(x).double()  # the quantized layer's own product (int8 quantizes x too)
        v = weight + slot.scaling * slot.lora_B.double() @ slot.lora_A.double()
        scale = slot.magnitude.double() / torch.linalg.vector_norm(v, dim=1)
        expected = scale * (base + slot.scaling * x.double() @ (slot.lora_B.double() @ slot.lora_A.double()).t())
        assert _rel(layer(x), expected) < 1e-5
    model.train()
    model(input_ids=_ids(), labels=_ids()).loss.backward()
    assert slot.magnitude.grad is not None and slot.magnitude.grad.abs().sum() > 0


def test_dora_weighted_and_multi_adapter_paths_match_merge():
    """A DoRA adapter at weight 0.5 beside a LoRA (the non-fused contribute path) equals its merged weights."""
    model = tiny_model("llama")
    peftlab.wrap(model, peftlab.LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=True, adapter_name="d"))
    peftlab.wrap(model, peftlab.LoraConfig(r=4, alpha=8, target_modules="all-linear", adapter_name="l"))
    perturb(model, 0.3)
    peftlab.set_active_adapters(model, ["d", "l"], weights=[0.5, 1.0])
    both = _logits(model, _ids())
    peftlab.merge(model)
    torch.testing.assert_close(_logits(model, _ids()), both, rtol=1e-4, atol=1e-5)
    peftlab.unmerge(model)
    torch.testing.assert_close(_logits(model, _ids()), both, rtol=1e-5, atol=1e-6)


# ---- HF PEFT parity -------------------------------------------------------------------------------------------


def _hf(model, **kw):
    return peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **kw))


def _hf_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_dora_trainable_count_equals_hf(targets):
    ours = tiny_model("llama")
    peftlab.wrap(ours, peftlab.LoraConfig(r=4, alpha=8, target_modules=targets, use_dora=True))
    hf = _hf(tiny_model("llama"), r=4, lora_alpha=8, target_modules=targets, use_dora=True)
    assert peftlab.count_parameters(ours)[0] == _hf_trainable(hf)


def test_dora_trainable_bias_equals_hf_peft():
    """DoRA with bias="lora_only" on BERT (Linear) and GPT-2 (Conv1D) against HF PEFT at the same values: the
    logits and the gradient of every trainable tensor (A, B, m and the base biases)."""
    for family, targets in (("bert", ["query", "value", "dense"]), ("gpt2", ["c_attn", "c_fc"])):
        cfg = dict(r=4, target_modules=targets, use_dora=True, bias="lora_only")
        ours = tiny_model(family)
        peftlab.wrap(ours, peftlab.LoraConfig(alpha=8, **cfg))
        hf = peft.get_peft_model(tiny_model(family), peft.LoraConfig(lora_alpha=8, **cfg))
        gen = torch.Generator().manual_seed(3)
        theirs = {n.removeprefix("base_model.model.").removesuffix(".weight").replace("_vector", ""): p
                  for n, p in hf.named_parameters() if p.requires_grad}  # fmt: skip
        mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
        assert sorted(mine) == sorted(theirs) and any(n.endswith(".bias") for n in mine)
        with torch.no_grad():
            for n, p in theirs.items():
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
                mine[n].copy_(p)
        ids = _ids()
        kw = {"labels": torch.tensor([0, 1])} if family == "bert" else {"labels": ids}
        out, ref = ours(input_ids=ids, **kw), hf(input_ids=ids, **kw)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
        out.loss.backward()
        ref.loss.backward()
        for n, p in mine.items():
            assert _rel(p.grad, theirs[n].grad) < 1e-4, n


def test_dora_export_loads_in_peft_and_peft_dora_imports(tmp_path):
    ids = _ids()
    ours = tiny_model("llama")
    peftlab.wrap(ours, peftlab.LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=True))
    perturb(ours, 0.3)
    expected = _logits(ours, ids)
    peftlab.export_peft(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_dora"] is True
    hf = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(hf, ids), expected, rtol=1e-5, atol=1e-5)

    hf = _hf(tiny_model("llama"), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for n, p in hf.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    hf.eval()
    hf_logits = _logits(hf, ids)
    hf.save_pretrained(tmp_path / "hf")
    imported = peftlab.import_peft(tiny_model("llama"), tmp_path / "hf")
    assert slots(imported, "DoraSlot")
    torch.testing.assert_close(_logits(imported, ids), hf_logits, rtol=1e-5, atol=1e-5)


# ---- initialisations vs HF PEFT --------------------------------------------------------------------------------


def _factors(model, hf: bool):
    out = {}
    for n, p in model.named_parameters():
        if ".lora_A." in n or ".lora_B." in n:
            path = n.removeprefix("base_model.model.").split(".lora_")[0]
            out[(path, "A" if ".lora_A." in n else "B")] = p.detach()
    return out


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_deterministic_inits_equal_hf(init, tmp_path):
    ids = _ids()
    base = _logits(tiny_model("llama"), ids)
    ours = tiny_model("llama")
    peftlab.wrap(ours, peftlab.LoraConfig(r=4, alpha=8, target_modules="all-linear", init=init))
    hf = _hf(tiny_model("llama"), r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=init).eval()
    a, b = _factors(ours, False), _factors(hf, True)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-4, msg=str(key))
    # same outputs at init: HF on its residual base, ours on the untouched base; both = the base model
    torch.testing.assert_close(_logits(ours, ids), _logits(hf, ids), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_logits(ours, ids), base, rtol=1e-4, atol=1e-5)
    # trained: our export is the converted rank-2r LoRA on the untouched base; peft reproduces our logits
    perturb(ours, 0.1)
    peftlab.set_trainable(ours, "default")
    expected = _logits(ours, ids)
    peftlab.export_peft(ours, tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["init_lora_weights"] is True
    loaded = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(loaded, ids), expected, rtol=1e-5, atol=1e-5)


def test_pissa_training_equals_hf_residual_model_and_hf_files_import(tmp_path):
    """Same A, B after a perturbation: ours (base untouched) == HF (residual base); an HF PiSSA file imports."""
    ids = _ids()
    ours = tiny_model("llama")
    peftlab.wrap(ours, peftlab.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init="pissa"))
    hf = _hf(tiny_model("llama"), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    gen = torch.Generator().manual_seed(5)
    theirs = dict(hf.named_parameters())
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=gen) * 0.05
                p.add_(noise)
                theirs["base_model.model." + n.replace(".lora_A.default", ".lora_A.default.weight").replace(".lora_B.default", ".lora_B.default.weight")].add_(noise)
    hf.eval()
    torch.testing.assert_close(_logits(ours, ids), _logits(hf, ids), rtol=1e-4, atol=1e-5)
    hf.save_pretrained(tmp_path / "hf")  # unconverted: peft re-runs PiSSA on the base when loading it
    imported = peftlab.import_peft(tiny_model("llama"), tmp_path / "hf")
    torch.testing.assert_close(_logits(imported, ids), _logits(hf, ids), rtol=1e-4, atol=1e-5)
    # HF's own conversion of the same adapter equals our export on the untouched base
    reloaded = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "hf").eval()
    torch.testing.assert_close(_logits(reloaded, ids), _logits(hf, ids), rtol=1e-4, atol=1e-5)


def test_pissa_niter_and_gaussian(monkeypatch):
    """pissa_niter_N equals HF's when both randomised SVDs draw the same sketch (reseeded per call)."""
    import peft.tuners.lora.layer as hf_layer

    real = torch.svd_lowrank

    def seeded(w, q, niter):
        torch.manual_seed(w.shape[0] * 7919 + w.shape[1])
        return real(w, q, niter=niter)

    monkeypatch.setattr(torch, "svd_lowrank", seeded)
    monkeypatch.setattr(hf_layer, "svd_lowrank", seeded)
    ids = _ids()
    base = _logits(tiny_model("llama"), ids)
    ours = tiny_model("llama")
    peftlab.wrap(ours, peftlab.LoraConfig(r=4, alpha=8, target_modules="all-linear", init="pissa_niter_4"))
    torch.testing.assert_close(_logits(ours, ids), base, rtol=1e-4, atol=1e-5)
    hf = _hf(tiny_model("llama"), r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="pissa_niter_4")
    a, b = _factors(ours, False), _factors(hf, True)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-4, msg=str(key))
    torch.testing.assert_close(_logits(ours, ids), _logits(hf.eval(), ids), rtol=1e-4, atol=1e-4)
    g = tiny_model("llama")
    peftlab.wrap(g, peftlab.LoraConfig(r=16, alpha=8, target_modules="all-linear", init="gaussian"))
    a_all = torch.cat([p.flatten() for n, p in g.named_parameters() if ".lora_A." in n])
    assert abs(a_all.std().item() - 1 / 16) < 0.01 / 16 * 10 and a_all.abs().mean() > 0
    assert all(p.abs().sum() == 0 for n, p in g.named_parameters() if ".lora_B." in n)
    torch.testing.assert_close(_logits(g, ids), base, rtol=0, atol=0)


def _hf_loftq_on_cpu():
    """HF PEFT's own loftq_init with its device constant set to the CPU (peft 0.21 hard-codes CUDA/XPU)."""
    from peft.utils import loftq_utils

    src = inspect.getsource(loftq_utils.loftq_init)
    src = src.replace('"xpu" if is_xpu_available() else "cuda"', '"cpu"').replace("@torch.no_grad()\n", "")
    assert '"cpu"' in src
    namespace = dict(vars(loftq_utils))
    exec(src, namespace)  # noqa: S102 - HF PEFT's own source, device changed
    return torch.no_grad()(namespace["loftq_init"])


def test_loftq_equals_hf_and_beats_plain_nf4():
    pytest.importorskip("bitsandbytes")
    from peftlab.core.layer import get_base_weight
    from peftlab.methods.lora.inits import reconstruction_error

    hf_loftq = _hf_loftq_on_cpu()
    source = tiny_model("llama")
    ours = tiny_model("llama")
    peftlab.wrap(ours, peftlab.LoraConfig(r=4, alpha=4, target_modules="all-linear", init="loftq_iter_2"))
    for path, slot in {p: s for p, s in ((p, m.slots["default"]) for p, m in ours.named_modules() if hasattr(m, "slots"))}.items():
        w = source.get_submodule(path).weight.detach()
        q, a, b = hf_loftq(w, num_bits=4, reduced_rank=4, num_iter=2)  # alpha = r: HF's A = R, B = L is exact
        torch.testing.assert_close(get_base_weight(slot.base_layer), q, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(slot.lora_A.detach(), a, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(slot.lora_B.detach(), b, rtol=1e-4, atol=1e-4)
        err = reconstruction_error(w, get_base_weight(slot.base_layer), slot.lora_A.detach(), slot.lora_B.detach(), slot.scaling)
        assert err < reconstruction_error(w, q) * 0.95


def test_loftq_on_quantized_base_reads_the_checkpoint(tmp_path):
    pytest.importorskip("bitsandbytes")
    from peftlab.backends.quant.bnb import dequantize_weight
    from peftlab.methods.lora.inits import reconstruction_error

    source = tiny_model("llama")
    source.save_pretrained(tmp_path / "base")
    plain = peftlab.load_quantized(str(tmp_path / "base"), bits=4, device="cpu")
    model = peftlab.load_quantized(str(tmp_path / "base"), bits=4, device="cpu")
    peftlab.wrap(model, peftlab.LoraConfig(r=4, alpha=8, target_modules="all-linear", init="loftq"))
    for path, layer in ((p, m) for p, m in model.named_modules() if hasattr(m, "slots")):
        slot = layer.slots["default"]
        w = source.get_submodule(path).weight.detach()
        q = dequantize_weight(layer.base_layer).float()
        q_plain = dequantize_weight(plain.get_submodule(path)).float()
        assert reconstruction_error(w, q, slot.lora_A.detach(), slot.lora_B.detach(), slot.scaling) < 0.95 * reconstruction_error(w, q_plain)
    # the quantized base without a checkpoint: a clear error, and the model is left as it was
    bare = peftlab.quantize(tiny_model("llama"), bits=4)
    bare.config._name_or_path = ""
    with pytest.raises(ConfigError, match="full-precision"):
        peftlab.wrap(bare, peftlab.LoraConfig(r=4, target_modules="all-linear", init="loftq"))
    assert not any(hasattr(m, "slots") for m in bare.modules())


def test_init_config_errors():
    for bad in ("pisa", "pissa_niter_x", "loftq_iter_0", "olora_niter_2", 3):
        with pytest.raises(ConfigError, match="pissa_niter_N"):
            peftlab.LoraConfig(init=bad)
    with pytest.raises(ConfigError, match="use_dora"):
        peftlab.LoraConfig(use_dora="yes")
    with pytest.raises(ConfigError, match="DoRA"):
        peftlab.LoraConfig(use_dora=True, init="pissa")
    cfg = peftlab.LoraConfig(use_dora=True, init="loftq_iter_3")
    assert peftlab.PeftConfig.from_dict(cfg.to_dict()) == cfg


def test_combine_variants_through_their_exact_update():
    """combine(how='svd') uses each variant's exact ΔW; stacking factors (cat/linear) is refused for them."""
    ids = _ids()
    model = tiny_model("llama")
    peftlab.wrap(model, peftlab.LoraConfig(r=4, alpha=8, target_modules=["q_proj"], use_dora=True, adapter_name="d"))
    peftlab.wrap(model, peftlab.LoraConfig(r=4, alpha=8, target_modules=["q_proj"], init="olora", adapter_name="o"))
    perturb(model, 0.3)
    for how in ("cat", "linear"):
        with pytest.raises(ConfigError, match="svd"):
            peftlab.combine(model, ["d", "o"], [1.0, 1.0], how=how, new_name="x")
    outs = {}
    for name in ("d", "o"):
        peftlab.set_active_adapters(model, name)
        outs[name] = _logits(model, ids)
    peftlab.combine(model, ["d"], [1.0], how="svd", rank=32, new_name="dsvd")  # q_proj is 32×32: exact
    peftlab.set_active_adapters(model, "dsvd")
    torch.testing.assert_close(_logits(model, ids), outs["d"], rtol=1e-4, atol=1e-5)
