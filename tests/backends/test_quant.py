"""Quantized bases (bitsandbytes int8 / NF4 / FP4) and QLoRA: storage, loading, training, merging, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import peftlab
from helpers import sst2_batches
from peftlab.backends.quant.bnb import MissingDependencyError, QuantizationError
from peftlab.backends.quant.load import load_quantized
from peftlab.backends.quant.model import (
    dequantize_model,
    is_quantized,
    memory_report,
    prepare_for_kbit_training,
    quantize,
)
from peftlab.core.state import get_state
from peftlab.persist.quantized_merge import merge_error_report, merge_quantized
from peftlab.util.errors import ConfigError

bnb = pytest.importorskip("bitsandbytes")
pytestmark = [
    pytest.mark.filterwarnings("ignore:MatMul8bitLt"),
    pytest.mark.filterwarnings("ignore::UserWarning:bitsandbytes"),
]


def bnb_layers(model):
    return [m for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


def trained_lora(tiny, bits: int, steps: int = 8, **quant_kw):
    """Tiny Llama, quantized, with a LoRA trained a few steps (so the adapter is far from zero)."""
    model = quantize(tiny("llama"), bits=bits, **quant_kw)
    peftlab.wrap(model, peftlab.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    x = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), x


# ---- errors -------------------------------------------------------------------------------------


def test_bad_bits_and_quant_type_say_what_is_valid(tiny):
    with pytest.raises(ConfigError, match=r"bits must be 4 .* or 8"):
        quantize(tiny("llama"), bits=3)
    with pytest.raises(ConfigError, match=r"quant_type must be one of \('nf4', 'fp4'\)"):
        quantize(tiny("llama"), bits=4, quant_type="int4")
    with pytest.raises(ConfigError, match="bits must be 4"):
        load_quantized("smollm2-135m", bits=16)  # rejected before anything is read


def test_missing_bitsandbytes_names_the_extra(tiny, monkeypatch):
    import peftlab.backends.quant.bnb as ql

    monkeypatch.setattr(ql, "bnb_available", lambda: False)
    with pytest.raises(MissingDependencyError, match=r"pip install 'peftlab\[quant\]'") as info:
        quantize(tiny("llama"), bits=4)
    assert isinstance(info.value, ImportError)


def test_quantizing_twice_or_after_wrap_is_an_error(tiny):
    model = quantize(tiny("llama"), bits=8)
    with pytest.raises(QuantizationError, match="already quantized .*Linear8bitLt"):
        quantize(model, bits=4)
    wrapped = peftlab.wrap(tiny("llama"), peftlab.LoraConfig(r=2))
    with pytest.raises(QuantizationError, match=r"before peftlab.wrap\(\)"):
        quantize(wrapped, bits=4)


def test_load_quantized_needs_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"no \.safetensors checkpoint .*peftlab.quantize"):
        load_quantized(str(tmp_path), bits=4)


# ---- storage -----------------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_storage_bytes_match_the_format(double_quant):
    """Bytes of one NF4 layer = packed codes + absmax constants (+ double-quant tables), counted independently."""
    d_out, d_in = 256, 512
    n = d_out * d_in
    model = nn.Sequential(nn.Linear(d_in, d_out, bias=False))
    quantize(model, bits=4, double_quant=double_quant, skip_modules=[])
    expected = n // 2 + 16 * 4  # 4-bit codes + the 16-entry fp32 NF4 code table
    if double_quant:
        expected += (
            n // 64 + 4 + 256 * 4 + 4 * (n // 64 // 256)
        )  # uint8 absmax, offset, 8-bit table, fp32 scales
    else:
        expected += 4 * (n // 64)  # fp32 absmax per block of 64
    report = memory_report(model)
    assert report["quantized_linear"]["bytes"] == expected
    assert report["quantized_linear"]["params"] == n
    bits = report["quantized_linear"]["bits_per_param"]
    assert (bits < 4.2) if double_quant else (4.45 < bits < 4.6)


def test_int8_storage_and_report_kinds(tiny):
    model = quantize(tiny("bert"), bits=8)
    report = memory_report(model)
    for layer in bnb_layers(model):
        assert layer.weight.dtype == torch.int8
    q = report["quantized_linear"]
    # int8 codes + fp32 row scales + fp32 biases: 8 + 32/d_in + 32/d_in bits for d_in = 32 or 64
    assert 8.5 < q["bits_per_param"] < 10.1
    assert report["kinds"]["Embedding"]["bits_per_param"] == 32.0  # embeddings stay full precision
    assert isinstance(model.classifier, nn.Linear) and not is_quantized(model.classifier)  # head stays float
    assert report["total_bytes"] == sum(k["bytes"] for k in report["kinds"].values())


@pytest.mark.parametrize("bits,quant_type", [(8, "nf4"), (4, "nf4"), (4, "fp4")])
def test_quantized_outputs_stay_close_to_fp32(tiny, bits, quant_type):
    import copy

    from peftlab.backends.quant.bnb import dequantize_weight

    ref_model = tiny("llama")
    x = torch.randint(0, 100, (2, 16))
    dense = copy.deepcopy(ref_model)
    with torch.no_grad():
        ref = ref_model(x).logits
        model = quantize(ref_model, bits=bits, quant_type=quant_type)
        out = model(x).logits
        for layer in bnb_layers(model):  # the fp32 model with the dequantized weights
            path = next(n for n, m in model.named_modules() if m is layer)
            dense.get_submodule(path).weight.copy_(dequantize_weight(layer).float())
        same_weights = dense(x).logits
    rel = ((out - ref).abs().mean() / ref.abs().mean()).item()
    # scaled to the measured error (int8 0.0046, NF4 0.052, FP4 0.076 on this model): ~1.6x headroom
    assert 0 < rel < {(8, "nf4"): 0.0075, (4, "nf4"): 0.08, (4, "fp4"): 0.12}[bits, quant_type]
    if bits == 4:  # the 4-bit forward is exactly the dequantized weights' (int8 also quantizes x)
        assert ((out - same_weights).abs().max() / ref.abs().max()).item() < 1e-5


def test_layer_forward_is_dequantized_matmul():
    """A 4-bit layer computes x · dequant(W)ᵀ + b, in train and eval mode, and back-propagates to x."""
    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    model = quantize(nn.Sequential(dense), bits=4)
    layer = model[0]
    w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert (w - dense.weight).abs().max() < 0.25 * dense.weight.abs().max()
    x = torch.randn(5, 64, requires_grad=True)
    for mode in (True, False):
        layer.train(mode)
        y = layer(x)
        torch.testing.assert_close(y, x @ w.t() + layer.bias, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(5, -1), rtol=1e-5, atol=1e-5)


# ---- real model: SmolLM2 -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_nf4(smollm2_dir):
    return load_quantized(smollm2_dir, bits=4, quant_type="nf4", double_quant=True, device="cpu")


def test_smollm2_nf4_double_quant_bits(smollm2_nf4):
    report = memory_report(smollm2_nf4)
    linear_bits = report["quantized_linear"]["bits_per_param"]
    assert 4.0 < linear_bits <= 4.6
    assert report["quantized_linear"]["modules"] == 30 * 7  # q, k, v, o, gate, up, down per layer
    assert report["kinds"]["Embedding"]["bits_per_param"] == 32.0
    assert (
        smollm2_nf4.lm_head.weight is smollm2_nf4.model.embed_tokens.weight
    )  # tied head kept, not quantized
    assert smollm2_nf4.peftlab_quantization["missing_keys"] == []


def test_smollm2_nf4_answers_a_simple_prompt(smollm2_nf4, smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = smollm2_nf4.generate(**enc, max_new_tokens=10, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(1)
    import bitsandbytes, transformers.models.llama.modeling_llama
    import peftlab
    from peftlab.backends.quant.load import load_quantized

    def status():
        d = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return {k: int(d[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}

    path = sys.argv[1]
    before = status()
    model = load_quantized(path, bits=4, double_quant=True, device="cpu")
    after_load = status()
    with torch.no_grad():  # touches every weight (the tied head reads the whole embedding)
        model(torch.randint(0, 1000, (1, 16)))
    after_forward = status()
    print(json.dumps({"before": before["VmRSS"], "load": after_load["VmHWM"], "forward": after_forward["VmHWM"]}))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux)")
def test_load_quantized_peak_rss_stays_far_below_fp32(smollm2_dir, tmp_path):
    """In a fresh process, peak RSS rises much less during load_quantized than the fp32 checkpoint size.

    Also after one forward pass, so that weights memory-mapped but not yet read (the fp32
    embedding) are counted too.
    """
    files = [f for f in os.listdir(smollm2_dir) if f.endswith(".safetensors")]
    fp32_bytes = sum(os.path.getsize(os.path.join(smollm2_dir, f)) for f in files)
    script = tmp_path / "rss.py"
    script.write_text(RSS_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), smollm2_dir], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rise_load, rise_forward = result["load"] - result["before"], result["forward"] - result["before"]
    assert fp32_bytes > 500e6
    assert rise_load < 0.4 * fp32_bytes, (
        f"peak RSS rose {rise_load / 1e6:.0f} MB for a {fp32_bytes / 1e6:.0f} MB checkpoint"
    )
    # NF4 linears (55 MB) + the fp32 embedding (113 MB) + transients
    assert rise_forward < 0.6 * fp32_bytes, f"peak RSS rose {rise_forward / 1e6:.0f} MB after a forward pass"


# ---- QLoRA training ----------------------------------------------------------------------------


def test_qlora_minilm_sst2_lowers_the_loss(minilm_dir, sst2_dir):
    torch.manual_seed(0)
    model = load_quantized(minilm_dir, bits=4, kind="seq-cls", num_labels=2, device="cpu")
    assert "classifier.weight" in model.peftlab_quantization["missing_keys"]
    prepare_for_kbit_training(model, use_gradient_checkpointing=True)
    peftlab.wrap(
        model,
        peftlab.LoraConfig(r=8, alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"]),
    )
    frozen = {id(m): m.weight.data.clone() for m in bnb_layers(model)}
    batches = sst2_batches(minilm_dir, "train", batch_size=16, limit=320, max_length=48)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3)
    model.train()
    losses = []
    for step in range(40):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        assert (
            model.bert.encoder.layer[0].attention.self.query.slots["default"].lora_B.grad is not None
        )  # through checkpointing
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 0.05, (first, last)
    assert all(torch.equal(m.weight.data, frozen[id(m)]) for m in bnb_layers(model))  # base untouched


def test_prepare_for_kbit_training_norms_fp32_and_input_grads(tiny):
    model = quantize(tiny("llama").to(torch.bfloat16), bits=4, compute_dtype=torch.bfloat16)
    prepare_for_kbit_training(model)
    norms = [m for m in model.modules() if "RMSNorm" in type(m).__name__]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)
    assert model.is_gradient_checkpointing and model.config.use_cache is False
    assert all(not p.requires_grad for p in model.parameters())
    peftlab.wrap(model, peftlab.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    x = torch.randint(0, 100, (2, 8))
    model.train()
    model(x, labels=x).loss.backward()
    first = model.model.layers[0].self_attn.q_proj  # first block: its grads pass through checkpointing
    assert (
        first.slots["default"].lora_A.dtype == torch.float32 and first.slots["default"].lora_B.grad.abs().sum() > 0
    )  # dB ≠ 0 (dA = 0 while B = 0)


def test_adalora_trains_on_a_4bit_base(tiny):
    pytest.importorskip("peftlab.methods.adalora")
    model = quantize(tiny("llama"), bits=4)
    config = peftlab.AdaLoraConfig(
        init_r=4, target_r=2, total_steps=12, t_init=2, t_final=2, target_modules=["q_proj", "v_proj"]
    )
    peftlab.wrap(model, config)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
    x = torch.randint(0, 100, (4, 12), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for step in range(12):
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        peftlab.on_train_step(model, step)
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        before = model(x).logits
    report = merge_quantized(model, {"input_ids": x})
    assert report["quantized_layers"] == 4
    with torch.no_grad():
        assert (model(x).logits - before).abs().max().item() == pytest.approx(report["max_abs"], rel=1e-5)


def test_adapter_save_load_on_quantized_base(tiny, tmp_path):
    model, x = trained_lora(tiny, bits=4, steps=3)
    with torch.no_grad():
        expected = model(x).logits
    peftlab.save_adapter(model, tmp_path)
    fresh = quantize(tiny("llama"), bits=4)
    peftlab.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x).logits, expected)


# ---- merging -----------------------------------------------------------------------------------


def test_int8_merge_reports_small_error_and_warns(tiny):
    model, x = trained_lora(tiny, bits=8)
    with torch.no_grad():
        with_adapter = model(x).logits
        with peftlab.disable_adapters(model):
            base = model(x).logits
    with pytest.warns(
        UserWarning,
        match=r"int8 base layer\(s\) is not exact: model outputs on the probe batch changed by max",
    ):
        report = merge_quantized(model, {"input_ids": x})
    with torch.no_grad():
        merged = model(x).logits
    diff = (merged - with_adapter).abs()
    assert report["max_abs"] == pytest.approx(diff.max().item(), rel=1e-5)
    assert report["mean_abs"] == pytest.approx(diff.mean().item(), rel=1e-5)
    assert report["adapter_effect_mean_abs"] == pytest.approx(
        (with_adapter - base).abs().mean().item(), rel=1e-5
    )
    assert report["quantized_layers"] == 14
    assert report["mean_abs"] < 0.1 * report["adapter_effect_mean_abs"]  # the merge keeps >90% of the adapter
    assert get_state(model).info["merge_error"]["max_abs"] == report["max_abs"]
    assert peftlab.is_merged(model)


def test_nf4_merge_dequantizes_adds_requantizes_and_measures(tiny):
    model, x = trained_lora(tiny, bits=4)
    path, layer = "model.layers.0.self_attn.q_proj", model.model.layers[0].self_attn.q_proj
    w_old = bnb.functional.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state)
    target = w_old + layer.slots["default"].delta_weight()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a 4-bit merge reports, it does not warn
        report = merge_quantized(model, {"input_ids": x})
    base = layer.base_layer
    assert (
        isinstance(base, bnb.nn.Linear4bit)
        and base.weight.quant_type == "nf4"
        and base.weight.compress_statistics
    )
    w_new = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
    # the stored weight is the 4-bit requantization of W + ΔW
    qref, sref = bnb.functional.quantize_4bit(
        target, blocksize=64, compress_statistics=True, quant_type="nf4"
    )
    torch.testing.assert_close(w_new, bnb.functional.dequantize_4bit(qref, sref))
    probe = torch.randn(16, 32, generator=torch.Generator().manual_seed(1234))
    err = (probe @ (w_new - target).t()).abs()
    assert report["layers"][path]["max_abs"] == pytest.approx(err.max().item(), rel=1e-5)
    assert report["layers"][path]["mean_abs"] == pytest.approx(err.mean().item(), rel=1e-5)
    assert 0 < report["mean_abs"] < report["adapter_effect_mean_abs"]
    assert merge_error_report(model)["layer_max_abs"] == report["layer_max_abs"]


def test_plain_merge_on_int8_warns_with_numbers(tiny):
    model, _ = trained_lora(tiny, bits=8, steps=2)
    with pytest.warns(
        UserWarning, match=r"int8 \(LLM.int8\) base layer \[32, 32\] is not exact: .*max [0-9.e-]+, mean"
    ):
        peftlab.merge(model)
    assert merge_error_report(model)["layer_max_abs"] > 0


@pytest.mark.parametrize("bits", [4, 8])
def test_unwrap_dequantize_gives_exact_float_merge(tiny, bits):
    model, x = trained_lora(tiny, bits=bits)
    model.train()  # int8 eval also quantizes activations; in train mode both bases compute x · dequant(W)ᵀ
    with torch.no_grad():
        expected = model(x).logits
    peftlab.unwrap(model, merge=True, dequantize=True)
    assert not is_quantized(model) and not hasattr(model, "peftlab_adapters")
    linears = [m for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in linears)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-4, atol=1e-4)


def test_dequantize_model_reaches_adapter_base_layers(tiny):
    model, x = trained_lora(tiny, bits=4, steps=1)
    with torch.no_grad():
        expected = model(x).logits
    dequantize_model(model)
    layer = model.model.layers[1].mlp.down_proj
    assert type(layer.base_layer) is nn.Linear and layer.slots["default"].lora_A.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-4, atol=1e-4)


def test_save_merged_refuses_a_quantized_base(tiny, tmp_path):
    model, _ = trained_lora(tiny, bits=4, steps=1)
    before = [m.weight.data.clone() for m in bnb_layers(model)]
    with pytest.raises(peftlab.MergeError, match=r"unwrap\(model, merge=True, dequantize=True\)"):
        peftlab.save_merged(model, tmp_path / "merged")
    assert all(
        torch.equal(m.weight.data, b) for m, b in zip(bnb_layers(model), before)
    )  # nothing requantized


def test_gpt2_conv1d_layers_are_quantized_transposed(tiny):
    """GPT-2 Conv1D stores W as (d_in, d_out); the 4-bit layer must hold it as (d_out, d_in)."""
    model = tiny("gpt2")
    x = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        ref = model(x).logits
        conv = model.transformer.h[0].attn.c_attn
        w = conv.weight.t().clone()
        quantize(model, bits=8)
        layer = model.transformer.h[0].attn.c_attn
        assert isinstance(layer, bnb.nn.Linear8bitLt) and (layer.out_features, layer.in_features) == tuple(
            w.shape
        )
        scale = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
        deq = layer.weight.data.float() * scale[:, None] / 127
        assert (deq - w).abs().max() <= scale.max() / 127
        rel = ((model(x).logits - ref).abs().mean() / ref.abs().mean()).item()
    assert rel < 0.05


@pytest.mark.parametrize("quant_type,compute,half_products", [
    ("nf4", torch.float32, False), ("fp4", torch.float32, False), ("nf4", torch.bfloat16, False),
    ("nf4", torch.bfloat16, True),  # bf16 thin products over the fp32 adapters (CUDA's route, forced here)
])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_qlora_training_path_equals_the_generic_path(tiny, monkeypatch, quant_type, compute, half_products, dropout):
    """The fused 4-bit training function (one GEMM + addmm per direction, W dequantized inside) computes the
    base layer's own forward + the LoRA branch: same loss, same input/LoRA gradients."""
    from peftlab.backends import lora_ops

    if half_products:
        monkeypatch.setattr(lora_ops, "HALF_PRODUCT_DEVICES", ("cpu", "cuda"))

    def run(fused: bool):
        torch.manual_seed(0)
        model = quantize(tiny("llama").to(compute), bits=4, quant_type=quant_type, compute_dtype=compute)
        peftlab.wrap(model, peftlab.LoraConfig(r=4, alpha=8, target_modules="all-linear", dropout=dropout))
        for name, param in model.named_parameters():  # a non-zero B, so the LoRA term is live
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1, generator=torch.Generator().manual_seed(len(name)))
        calls = []
        real = lora_ops.DequantLoraLinearFunction.apply
        monkeypatch.setattr(lora_ops, "_fusable_4bit", fusable if fused else (lambda base: False))
        monkeypatch.setattr(lora_ops.DequantLoraLinearFunction, "apply", lambda *a: calls.append(1) or real(*a))
        model.train()
        x = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
        embeds = model.get_input_embeddings()(x).detach().requires_grad_()
        torch.manual_seed(5)  # the same dropout seeds in both runs
        loss = model(inputs_embeds=embeds, labels=x).loss
        loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach().float(), embeds.grad.float(), grads, len(calls)

    fusable = lora_ops._fusable_4bit
    loss_f, gx_f, grads_f, calls_f = run(True)
    loss_g, gx_g, grads_g, calls_g = run(False)
    assert calls_f > 0 and calls_g == 0  # the fused function really ran, and only there
    assert grads_f.keys() == grads_g.keys() and grads_f
    if compute == torch.float32:
        tol = {"rtol": 1e-5, "atol": 1e-6}
        torch.testing.assert_close(loss_f, loss_g, **tol)
        torch.testing.assert_close(gx_f, gx_g, **tol)
        for name in grads_f:
            torch.testing.assert_close(grads_f[name], grads_g[name], **tol, msg=name)
        return
    # bf16: the two paths round differently, so compare each tensor by its relative norm error, scaled to the
    # tensor (elementwise atol = 2e-2 passed a 25% error on gradients of at most 0.066). Measured: ≤ 1.9e-2
    # for dX, ≤ 2.5e-2 for dA / dB (bf16 thin products); a 25% error in one tensor reads 0.25.
    torch.testing.assert_close(loss_f, loss_g, rtol=1e-2, atol=0)  # bf16 ulp at ~4.6 is 0.7%
    assert _rel_norm(gx_f, gx_g) < 5e-2
    for name in grads_f:
        assert _rel_norm(grads_f[name], grads_g[name]) < 5e-2, name


def _rel_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_qlora_fused_path_only_in_training(tiny, monkeypatch):
    """Inference (eval or no_grad) keeps bitsandbytes' own 4-bit forward (its gemv kernels for decode)."""
    from peftlab.backends import lora_ops

    model = quantize(tiny("llama"), bits=4)
    peftlab.wrap(model, peftlab.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    calls = []
    real = lora_ops.DequantLoraLinearFunction.apply
    monkeypatch.setattr(lora_ops.DequantLoraLinearFunction, "apply", lambda *a: calls.append(1) or real(*a))
    x = torch.randint(0, 100, (2, 6))
    with torch.no_grad():
        model.train()(x)
    model.eval()(x)
    assert not calls
    model.train()(x).logits.sum().backward()
    assert calls
