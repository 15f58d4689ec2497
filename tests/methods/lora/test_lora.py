"""LoRA layer and the generic API: identity at init, merge/unmerge, disable, unwrap, gradients, dtypes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

import peftlab
from helpers import slots
from peftlab.backends.lora_ops import LoraLinearFunction
from peftlab.methods.lora.slot import lora_layer


def randomize_lora(model, scale=0.05):
    torch.manual_seed(1)
    with torch.no_grad():
        for slot in slots(model, "LoraSlot"):
            slot.lora_B.normal_(0, scale)


def ids(n=2, t=11, vocab=100):
    torch.manual_seed(3)
    return torch.randint(1, vocab, (n, t))


def test_gpt2_conv1d_targets_and_default(tiny):
    model = tiny("gpt2")
    peftlab.wrap(model, peftlab.LoraConfig(r=2))  # default for gpt2: c_attn (Conv1D)
    layers = slots(model, "LoraSlot")
    assert len(layers) == 2 and all(m.fan_in_fan_out for m in layers)
    assert layers[0].lora_A.shape == (2, 32) and layers[0].lora_B.shape == (96, 2)


def test_minilm_identity_trainable_and_grads(minilm_dir):
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2).eval()
    x = ids(3, 16, 1000)
    base = model(input_ids=x).logits.detach()
    peftlab.wrap(model, peftlab.LoraConfig(r=8, alpha=16, dropout=0.05, modules_to_save=["classifier"]))
    model.eval()
    torch.testing.assert_close(model(input_ids=x).logits, base, rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) or n.startswith("classifier.") for n in trainable)
    assert sum("lora_A" in n for n in trainable) == 12  # 6 layers x (query, value)
    model.train()
    randomize_lora(model)
    loss = model(input_ids=x, labels=torch.tensor([0, 1, 1])).loss
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_smollm2_identity_and_generate(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    enc = tok(["The capital of France is"], return_tensors="pt")
    base = model(**enc).logits.detach()
    base_gen = model.generate(**enc, max_new_tokens=5, do_sample=False)
    peftlab.wrap(model, peftlab.LoraConfig(r=16, target_modules="all-linear"))
    model.eval()
    torch.testing.assert_close(model(**enc).logits, base, rtol=0, atol=0)
    assert torch.equal(model.generate(**enc, max_new_tokens=5, do_sample=False), base_gen)
    targets = peftlab.core.state.get_state(model).targets
    assert len(targets) == 30 * 7 and not any("lm_head" in t for t in targets)
    assert "Paris" in tok.decode(base_gen[0])


def _reference_lora(x, w, b, a, bb, s, mask):
    xd = x * mask if mask is not None else x
    y = x @ w.t() + s * (xd @ a.t()) @ bb.t()
    return y + b if b is not None else y


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("with_bias", [True, False])
def test_lean_autograd_matches_reference(p, with_bias):
    torch.manual_seed(0)
    m, d_in, d_out, r, s = 13, 7, 5, 3, 1.7
    x = torch.randn(2, m, d_in, dtype=torch.float64, requires_grad=True)
    w = torch.randn(d_out, d_in, dtype=torch.float64)
    b = torch.randn(d_out, dtype=torch.float64, requires_grad=True) if with_bias else None
    a = torch.randn(r, d_in, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(d_out, r, dtype=torch.float64, requires_grad=True)
    seed = 1234
    y = LoraLinearFunction.apply(x, w, b, a, bb, s, p, seed)
    mask = None
    if p > 0:
        from peftlab.backends.lora_ops import _dropout_mask

        mask = _dropout_mask((2 * m, d_in), p, seed, x.device, x.dtype).reshape(2, m, d_in)
    ref = _reference_lora(x, w, b, a, bb, s, mask)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    inputs = [t for t in (x, b, a, bb) if t is not None]
    got = torch.autograd.grad(y, inputs, g)
    want = torch.autograd.grad(ref, inputs, g)
    for gv, wv in zip(got, want):
        torch.testing.assert_close(gv, wv)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_branch_autograd_matches_reference_and_saves_no_dropped_copy(p):
    """The generic path's LoRA branch (quantized / trainable bases): same math, lean saves."""
    from peftlab.backends.lora_ops import LoraBranchFunction, _dropout_mask

    torch.manual_seed(0)
    m, d_in, d_out, r, s, seed = 11, 9, 6, 4, 0.8, 99
    x = torch.randn(2, m, d_in, dtype=torch.float64, requires_grad=True)
    a = torch.randn(r, d_in, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(d_out, r, dtype=torch.float64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = LoraBranchFunction.apply(x, a, bb, s, p, seed)
    assert sorted(saved) == sorted([(2 * m, d_in), (r, d_in), (d_out, r), (2 * m, r)])
    mask = _dropout_mask((2 * m, d_in), p, seed, x.device, x.dtype).reshape(2, m, d_in) if p else 1.0
    ref = s * ((x * mask) @ a.t()) @ bb.t()
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    for gv, wv in zip(torch.autograd.grad(y, (x, a, bb), g), torch.autograd.grad(ref, (x, a, bb), g)):
        torch.testing.assert_close(gv, wv)


def test_generic_path_with_dropout_trains_a_trainable_bias_base():
    """A base whose weight trains takes the generic path; dropout there keeps x's gradient exact."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)  # weight requires grad -> generic path
    layer = lora_layer(lin, r=4, alpha=8, scaling=2.0, dropout=0.5).train()
    slot = layer.slots["default"]
    nn.init.normal_(slot.lora_B)
    x = torch.randn(3, 16, requires_grad=True)
    torch.manual_seed(5)
    y1 = layer(x)
    torch.manual_seed(5)
    y2 = layer(x)
    torch.testing.assert_close(y1, y2)  # the seed comes from torch's global RNG: reproducible
    y1.sum().backward()
    assert lin.weight.grad is not None and slot.lora_A.grad.abs().sum() > 0
    layer.eval()
    torch.testing.assert_close(layer(x), lin(x) + 2.0 * (x @ slot.lora_A.t()) @ slot.lora_B.t())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_backward_merge(dtype):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48).to(dtype).requires_grad_(False)
    layer = lora_layer(lin, r=8, alpha=16, scaling=2.0)
    slot = layer.slots["default"]
    assert slot.lora_A.dtype == torch.float32  # adapters train in fp32 over half bases
    with torch.no_grad():
        slot.lora_B.normal_(0, 0.1)
    x = torch.randn(4, 10, 64, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype
    ref = (x.float() @ lin.weight.float().t() + lin.bias.float()) + 2.0 * (
        x.float() @ slot.lora_A.t() @ slot.lora_B.t()
    )
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=3e-2)
    y.float().square().mean().backward()
    assert slot.lora_A.grad is not None and slot.lora_B.grad is not None and x.grad is not None
    assert lin.weight.grad is None
    before = y.detach()
    layer.merge("default")
    torch.testing.assert_close(layer(x).detach().float(), before.float(), rtol=3e-2, atol=6e-2)


@pytest.mark.parametrize("path", ["lean", "branch"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_half_products_over_fp32_adapters_match_fp32_products(monkeypatch, path, p):
    """bf16 activations over fp32 adapters on a device in HALF_PRODUCT_DEVICES (CUDA; forced here on the CPU):
    the thin products run in bf16 (no fp32 copy of x, dY or an (M, d) output is made or saved), outputs and
    gradients agree with the fp32-product route to bf16 accuracy, and dA, dB come back fp32."""
    from peftlab.backends import lora_ops

    torch.manual_seed(0)
    m, d_in, d_out, r, s, seed = 24, 40, 32, 8, 2.0, 7
    x0 = torch.randn(m, d_in).bfloat16()
    w = (torch.randn(d_out, d_in) / d_in**0.5).bfloat16()
    a0 = torch.randn(r, d_in) / d_in**0.5
    b0 = torch.randn(d_out, r) * 0.1
    g = torch.randn(m, d_out).bfloat16()

    def run():
        x = x0.clone().requires_grad_(True)
        a, bb = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
        saved = []

        def pack(t):
            saved.append((t.dtype, t.numel()))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if path == "lean":
                y = lora_ops.LoraLinearFunction.apply(x, w, None, a, bb, s, p, seed)
            else:
                y = lora_ops.LoraBranchFunction.apply(x, a, bb, s, p, seed)
        y.backward(g)
        return y.detach(), x.grad, a.grad, bb.grad, saved

    fp32 = run()
    monkeypatch.setattr(lora_ops, "HALF_PRODUCT_DEVICES", ("cpu", "cuda"))
    half = run()
    assert half[2].dtype == half[3].dtype == torch.float32 and half[1].dtype == torch.bfloat16
    activations = (m * r, m * d_in, m * d_out)  # (the fp32 parameters A and B are saved in both routes)
    assert not [n for dt, n in half[4] if dt == torch.float32 and n in activations]  # xa in bf16, no fp32 x
    assert [n for dt, n in fp32[4] if dt == torch.float32 and n == m * r]  # (the fp32 route saves an fp32 xa)
    for got, want in zip(half[:4], fp32[:4]):
        scale = want.float().abs().max()
        assert (got.float() - want.float()).abs().max() <= 2e-2 * scale, (got, want)


def test_rslora_bias_and_patterns(tiny):
    model = tiny("bert")
    cfg = peftlab.LoraConfig(
        r=4,
        alpha=8,
        use_rslora=True,
        bias="lora_only",
        target_modules=["query", "value"],
        rank_pattern={"layer.1.attention.self.query": 2},
        alpha_pattern={"value": 3},
    )
    peftlab.wrap(model, cfg)
    q0 = model.get_submodule("bert.encoder.layer.0.attention.self.query").slots["default"]
    q1 = model.get_submodule("bert.encoder.layer.1.attention.self.query").slots["default"]
    v0 = model.get_submodule("bert.encoder.layer.0.attention.self.value").slots["default"]
    assert (
        q0.r == 4
        and q1.r == 2
        and q0.scaling == pytest.approx(8 / 2.0)
        and q1.scaling == pytest.approx(8 / 2**0.5)
    )
    assert v0.scaling == pytest.approx(3 / 2.0)
    assert (
        q0.base_layer.bias.requires_grad
        and not model.bert.encoder.layer[0].attention.output.dense.bias.requires_grad
    )


def test_merge_errors_and_disable_while_merged(tiny):
    model = tiny("llama")
    peftlab.wrap(model, peftlab.LoraConfig(r=2))
    with pytest.raises(peftlab.MergeError, match="nothing to unmerge"):
        peftlab.unmerge(model)
    from helpers import perturb

    perturb(model, 0.2)
    ids = torch.randint(1, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with peftlab.disable_adapters(model):
            base = model(input_ids=ids).logits
    peftlab.merge(model)
    with pytest.raises(peftlab.MergeError, match="already merged"):
        peftlab.merge(model)
    # the merged-state rule: disabling a merged adapter unmerges it for the block and merges it again after
    with torch.no_grad(), peftlab.disable_adapters(model):
        assert not peftlab.is_merged(model)
        torch.testing.assert_close(model(input_ids=ids).logits, base, rtol=1e-5, atol=1e-5)
    assert peftlab.is_merged(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-5)


def test_safe_merge_refuses_nan_and_leaves_weights(tiny):
    model = tiny("llama")
    peftlab.wrap(model, peftlab.LoraConfig(r=2))
    layer = model.get_submodule("model.layers.1.self_attn.v_proj")
    before = {n: p.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        layer.slots["default"].lora_B.fill_(float("nan"))
    with pytest.raises(peftlab.MergeError, match="NaN/inf"):
        peftlab.merge(model, safe=True)
    assert all(
        torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_" not in n
    )  # nothing merged
    assert not peftlab.is_merged(model)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_dropout_mask_rate_reproducible_and_odd_shapes(p):
    """The 16-bit regenerated mask drops p of the entries, the same ones for the same seed."""
    from peftlab.backends.lora_ops import _dropout_drop, _effective_p

    shape = (1001, 333)  # numel not a multiple of 4
    drop = _dropout_drop(shape, p, 7, torch.device("cpu"))
    assert drop.shape == shape and drop.dtype == torch.bool
    n = drop.numel()
    tolerance = 5 * (p * (1 - p) / n) ** 0.5
    assert abs(drop.float().mean().item() - p) < tolerance
    # each of the four 16-bit lanes of a 64-bit draw is unbiased too
    lanes = drop.flatten()[: n - n % 4].view(-1, 4).float().mean(0)
    assert (lanes - p).abs().max().item() < 2.5 * tolerance
    assert torch.equal(drop, _dropout_drop(shape, p, 7, torch.device("cpu")))
    assert not torch.equal(drop, _dropout_drop(shape, p, 8, torch.device("cpu")))
    assert abs(_effective_p(p) - p) <= 0.5 / 2**16
