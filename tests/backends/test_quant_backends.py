"""Quantized-base backends (bitsandbytes, torchao, FP8 block-scaled, MXFP4) behind one interface: exact unmerge,
the merge warning, accurate (error-feedback) requantization, LoRA training on each backend, bytes."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import peftlab
from peftlab.backends.quant.base import backend_of, get_backend, gptq_round, output_error
from peftlab.backends.quant.fp8 import dequantize_fp8, quantize_fp8
from peftlab.backends.quant.model import dequantize_model, memory_report, quantize
from peftlab.core.state import replace_module
from peftlab.estimator.model import quantized_bytes
from peftlab.persist.quantized_merge import merge_quantized
from peftlab.util.errors import ConfigError, MergeError

bnb = pytest.importorskip("bitsandbytes")
pytestmark = [
    pytest.mark.filterwarnings("ignore:MatMul8bitLt"),
    pytest.mark.filterwarnings("ignore::UserWarning:bitsandbytes"),
]
X = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))


def lora_train(model, steps=8, lr=1e-2):
    """Wrap with LoRA on every linear, train ``steps`` on X; returns (model in eval, losses)."""
    peftlab.wrap(model, peftlab.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(X, labels=X).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model.eval(), losses


def quantized_bases(model):
    return [m for m in model.modules() if backend_of(m) is not None]


def stored(module) -> list[torch.Tensor]:
    """Every stored tensor of a quantized layer's weight (packed data and quantization state), as plain tensors."""
    w = module.weight
    if hasattr(w, "tensor_data_names"):  # torchao
        return [getattr(w, n).clone() for n in w.tensor_data_names]
    out = [w.data.clone()]
    state = getattr(w, "quant_state", None)
    if state is not None:
        out += [state.absmax.clone()] + ([state.state2.absmax.clone()] if state.nested else [])
    if getattr(w, "SCB", None) is not None:
        out.append(w.SCB.clone())
    for name in ("weight_scale_inv", "weight_scale"):  # FP8 blocks, MXFP4
        if hasattr(module, name):
            out.append(getattr(module, name).data.clone())
    return out


def fp8_llama(tiny, block=(16, 16)):
    """Tiny Llama whose block linears are transformers' FP8Linear (FineGrainedFP8 layout) holding its weights
    quantized to e4m3 with one fp32 scale per block (lm_head stays float, as transformers keeps it)."""
    fp8_mod = pytest.importorskip("transformers.integrations.finegrained_fp8")
    model = tiny("llama")
    for path, mod in list(model.named_modules()):
        if type(mod) is nn.Linear and path != "lm_head":
            with torch.device("meta"):
                layer = fp8_mod.FP8Linear(mod.in_features, mod.out_features, block_size=block)
            q, scale = quantize_fp8(mod.weight.data, block)
            layer.weight = nn.Parameter(q, requires_grad=False)
            layer.weight_scale_inv = nn.Parameter(scale, requires_grad=False)
            replace_module(model, path, layer)
    return model


# ---- exact unmerge and the merge warning (bitsandbytes) ---------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_merge_then_unmerge_restores_every_packed_byte(tiny, bits):
    model, _ = lora_train(quantize(tiny("llama"), bits=bits), steps=3)
    bases = quantized_bases(model)
    before = [stored(m) for m in bases]
    with torch.no_grad():
        expected = model(X).logits
    for _ in range(2):  # no drift over cycles
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peftlab.merge(model)
        changed = sum((m.weight.data != b[0]).float().mean().item() for m, b in zip(bases, before)) / len(bases)
        assert changed > (0.5 if bits == 4 else 0.01)  # the merge really requantized
        peftlab.unmerge(model)
        for m, b in zip(bases, before):
            assert all(torch.equal(x, y) for x, y in zip(stored(m), b))
            assert not hasattr(m, "peftlab_merge_error")
    with torch.no_grad():
        assert torch.equal(model(X).logits, expected)


def test_nf4_merge_warns_with_the_measured_error(tiny):
    model, _ = lora_train(quantize(tiny("llama"), bits=4), steps=1)
    with pytest.warns(UserWarning, match=r"bitsandbytes nf4 base layer \[32, 32\] is not exact: .*max [0-9.e-]+, mean"):
        peftlab.merge(model)
    layer = model.model.layers[0].self_attn.q_proj.base_layer
    assert layer.peftlab_merge_error["scheme"] == "bitsandbytes:nf4" and layer.peftlab_merge_error["max_abs"] > 0


# ---- accurate requantization --------------------------------------------------------------------------


def test_gptq_round_minimises_the_calibrated_output_error_and_is_nearest_for_a_white_batch():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 32, generator=gen)
    scale = w.abs().amax(1, keepdim=True).expand(24, 32) / 7
    levels = torch.arange(-7, 8, dtype=torch.float32)
    nearest = torch.clamp(torch.round(w / scale), -7, 7) + 7
    # H = I (whitened inputs, no damping effect on the argmin): error feedback through I is nothing -> nearest
    assert torch.equal(gptq_round(w, torch.eye(32), scale, levels, damp=0.0), nearest.long())
    x = torch.randn(256, 32, generator=gen) @ torch.randn(32, 32, generator=gen)  # correlated inputs
    h = x.t() @ x / 256
    q_acc = levels[gptq_round(w, h, scale, levels)] * scale
    q_near = levels[nearest.long()] * scale
    assert output_error(q_acc, w, h) < 0.8 * output_error(q_near, w, h)


@pytest.mark.parametrize("backend,scheme", [("bitsandbytes", "nf4"), ("bitsandbytes", "fp4"), ("bitsandbytes", "int8"),
                                            ("fp8", "fp8"), ("torchao", "int8"), ("torchao", "int4"),
                                            ("mxfp4", "mxfp4")])  # fmt: skip
def test_write_levels_stores_the_grid_values_in_the_format(tiny, backend, scheme):
    """write_levels(nearest codes) reproduces the plain requantization byte for byte, and any codes dequantize
    to levels[codes] · scale (+ offset, torchao int4's zero points): the packing of the accurate path is the
    library's own."""
    if backend == "torchao":
        pytest.importorskip("torchao")
    gen = torch.Generator().manual_seed(2)
    dense = torch.randn(32, 64, generator=gen)
    b = get_backend(backend)
    opts = {"device": "cpu", "dtype": torch.float32, "blocksize": 64, "double_quant": True, "fp8_block": (16, 16)}
    layer = b.quantize_linear(dense, None, scheme, opts)
    plain = [t.clone() for t in stored(layer)]
    scale, levels = b.rounding_grid(layer)
    offset = b.rounding_offset(layer)
    offset = torch.zeros_like(scale) if offset is None else offset
    assert (backend, scheme) == ("torchao", "int4") or not offset.any()  # only int4 is asymmetric
    deq = b.dequantize(layer).float()
    codes = torch.bucketize(torch.where(scale > 0, (deq - offset) / scale, 0 * deq), (levels[1:] + levels[:-1]) / 2)
    b.write_levels(layer, codes)
    if scheme == "fp4":  # FP4 has two codes for zero: compare values
        assert torch.equal(b.dequantize(layer).float(), deq)
    else:
        assert all(torch.equal(x, y) for x, y in zip(stored(layer), plain))
    codes = torch.randint(0, len(levels), codes.shape, generator=gen)
    scale, levels = b.rounding_grid(layer)
    b.write_levels(layer, codes)
    torch.testing.assert_close(b.dequantize(layer).float(), levels[codes] * scale + offset, rtol=1e-6, atol=1e-6)


def test_accurate_merge_lowers_each_layers_calibrated_error_and_still_unmerges_exactly(tiny):
    model, _ = lora_train(quantize(tiny("llama"), bits=4), steps=4, lr=2e-2)
    before = [stored(m) for m in quantized_bases(model)]
    calib = {"input_ids": torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(3))}
    plain = merge_quantized(model, {"input_ids": X}, calibration=calib)
    assert plain["requantize"] == "plain" and plain["calib_rel_mean"] == plain["calib_rel_plain_mean"]
    peftlab.unmerge(model)
    acc = merge_quantized(model, {"input_ids": X}, requantize="accurate", calibration=calib)
    for path, e in acc["layers"].items():
        assert e["calib_rel"] < e["calib_rel_plain"], path
        assert e["calib_rel_plain"] == pytest.approx(plain["layers"][path]["calib_rel_plain"], rel=1e-4)
    assert acc["calib_rel_mean"] < 0.85 * acc["calib_rel_plain_mean"]
    assert acc["mean_abs"] < plain["mean_abs"]  # the model's logits move less too
    peftlab.unmerge(model)
    assert all(all(torch.equal(x, y) for x, y in zip(stored(m), b)) for m, b in zip(quantized_bases(model), before))


def test_accurate_merge_reports_held_out_error_and_damping_reaches_the_rounding(tiny):
    """validation= is measured on, never rounded for (on the calibration batch itself it reads the calibration
    error); a damping far above H's diagonal turns the error feedback off (round to nearest, plain's error); bad
    damp refused."""
    model, _ = lora_train(quantize(tiny("llama"), bits=4), steps=4, lr=2e-2)
    calib = {"input_ids": torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(3))}
    with pytest.raises(ConfigError, match="damp must be a finite number >= 0, got -1"):
        merge_quantized(model, requantize="accurate", calibration=calib, damp=-1)
    assert not peftlab.is_merged(model)
    same = merge_quantized(model, requantize="accurate", calibration=calib, validation=calib)
    for path, e in same["layers"].items():
        assert e["valid_rel"] == pytest.approx(e["calib_rel"], rel=1e-4), path
        assert e["valid_rel_plain"] == pytest.approx(e["calib_rel_plain"], rel=1e-4), path
    assert same["valid_layers_halved"] == same["layers_halved"]
    peftlab.unmerge(model)
    assert same["calib_rel_mean"] < 0.85 * same["calib_rel_plain_mean"]
    nearest = merge_quantized(model, requantize="accurate", calibration=calib, damp=1e6)
    # nearest on the stored (double-quantized) scales: plain's error up to the few elements at a rounding boundary
    assert nearest["calib_rel_mean"] == pytest.approx(nearest["calib_rel_plain_mean"], rel=0.05)
    peftlab.unmerge(model)


def test_accurate_merge_needs_a_calibration_batch_and_a_reroundable_format(tiny):
    model, _ = lora_train(quantize(tiny("llama"), bits=4), steps=1)
    with pytest.raises(ConfigError, match="calibration"):
        merge_quantized(model, requantize="accurate")
    with pytest.raises(ConfigError, match=r"requantize must be one of \('plain', 'accurate'\)"):
        merge_quantized(model, {"input_ids": X}, requantize="best")
    assert not peftlab.is_merged(model)


# ---- torchao ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme,group_size", [("int8", 64), ("int4", 32)])
def test_lora_on_a_torchao_base_trains_matches_its_dequantized_reference_and_merges_exactly(tiny, scheme, group_size):
    pytest.importorskip("torchao")
    model = quantize(tiny("llama"), backend="torchao", scheme=scheme, group_size=group_size)
    q = model.model.layers[0].self_attn.q_proj
    assert backend_of(q).name == "torchao" and backend_of(q).scheme(q) == scheme
    # the frozen forward is x · dequant(W)ᵀ (the dequantized weight: torchao's own, or read through the int4 kernel)
    w = backend_of(q).dequantize(q)
    xin = torch.randn(5, 32)
    torch.testing.assert_close(q(xin), xin @ w.t(), rtol=1e-4, atol=1e-5)
    model, losses = lora_train(model, steps=6, lr=2e-2)
    assert losses[-1] < losses[0] - 0.2
    assert all(p.grad is None for n, p in model.named_parameters() if "lora" not in n)
    with torch.no_grad():
        adapted = model(X).logits
    before = [stored(m) for m in quantized_bases(model)]
    with pytest.warns(UserWarning, match=f"torchao {scheme} base layer"):
        peftlab.merge(model)
    peftlab.unmerge(model)
    assert all(all(torch.equal(x, y) for x, y in zip(stored(m), b)) for m, b in zip(quantized_bases(model), before))
    # merge into the dequantized base is exact: the same logits as the adapter on the quantized base
    peftlab.unwrap(model, merge=True, dequantize=True)
    assert not quantized_bases(model)
    with torch.no_grad():
        torch.testing.assert_close(model(X).logits, adapted, rtol=1e-4, atol=1e-4)


def test_a_model_quantized_by_transformers_torchaoconfig_wraps_and_trains(tiny, tmp_path):
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    tiny("llama").save_pretrained(tmp_path, safe_serialization=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    assert len(quantized_bases(model)) == 14
    model, losses = lora_train(model, steps=5, lr=2e-2)
    assert losses[-1] < losses[0] - 0.1


def test_torchao_bad_options_say_what_is_valid(tiny, monkeypatch):
    pytest.importorskip("torchao")
    with pytest.raises(ConfigError, match=r"known: bitsandbytes, fp8, mxfp4, torchao"):
        quantize(tiny("llama"), backend="gptq")
    with pytest.raises(ConfigError, match=r"schemes int8, int4, float8, not 'nf4'"):
        quantize(tiny("llama"), backend="torchao", scheme="nf4")
    with pytest.raises(ConfigError, match=r"group_size must be one of \(32, 64, 128, 256\)"):
        quantize(tiny("llama"), backend="torchao", scheme="int4", group_size=48)
    with pytest.raises(ConfigError, match="32 is not a multiple of 64"):
        quantize(tiny("llama"), backend="torchao", scheme="int4", group_size=64)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"compute capability 8.9"):
            quantize(tiny("llama"), backend="torchao", scheme="float8")
    model, _ = lora_train(quantize(tiny("llama"), backend="torchao", scheme="int4", group_size=32), steps=1)
    backend = get_backend("torchao")
    monkeypatch.setattr(backend, "rounding_grid", lambda module: None)  # a layout it cannot unpack (e.g. DA8W4)
    before = [stored(m) for m in quantized_bases(model)]
    with pytest.raises(MergeError, match="requantize='accurate' is not available for torchao int4"):
        merge_quantized(model, {"input_ids": X}, requantize="accurate")
    assert not peftlab.is_merged(model)  # all or nothing: every layer keeps its stored bytes
    assert all(all(torch.equal(x, y) for x, y in zip(stored(m), b)) for m, b in zip(quantized_bases(model), before))


def test_torchao_int4_nearest_rounding_on_its_own_grid_is_torchaos_plain_quantization():
    """Reference check of the int4 grid: error-feedback rounding with H = I and no damping is round to nearest,
    and on the group scales and zero points of the plain requantization it stores torchao's own packed bytes."""
    pytest.importorskip("torchao")
    backend = get_backend("torchao")
    gen = torch.Generator().manual_seed(5)
    for d_out, d_in, group in [(80, 128, 64), (48, 64, 32)]:
        dense = torch.randn(d_out, d_in, generator=gen)
        layer = backend.quantize_linear(dense, None, "int4", {"device": "cpu", "group_size": group})
        plain = [t.clone() for t in stored(layer)]
        backend.requantize_accurate(layer, dense, torch.eye(d_in), damp=0.0)
        assert all(torch.equal(x, y) for x, y in zip(stored(layer), plain))


def test_accurate_merge_into_torchao_int4_lowers_the_calibrated_error_and_unmerges_exactly(tiny):
    pytest.importorskip("torchao")
    model, _ = lora_train(quantize(tiny("llama"), backend="torchao", scheme="int4", group_size=32), steps=4, lr=2e-2)
    before = [stored(m) for m in quantized_bases(model)]
    calib = {"input_ids": torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(3))}
    # calib_rel_plain: the plain requantization's error on the calibration batch, measured in the same merge
    acc = merge_quantized(model, requantize="accurate", calibration=calib)
    assert acc["quantized_layers"] == 14
    for path, e in acc["layers"].items():
        assert e["calib_rel"] < e["calib_rel_plain"], path
    assert acc["calib_rel_mean"] < 0.85 * acc["calib_rel_plain_mean"]
    peftlab.unmerge(model)
    assert all(all(torch.equal(x, y) for x, y in zip(stored(m), b)) for m, b in zip(quantized_bases(model), before))


# ---- FP8 block-scaled checkpoints -----------------------------------------------------------------------


def test_lora_trains_on_fp8_block_scaled_linears_with_no_dense_weight_kept(tiny):
    model = fp8_llama(tiny)
    q = model.model.layers[0].self_attn.q_proj
    assert backend_of(q).name == "fp8" and q.weight.dtype == torch.float8_e4m3fn
    ref = dequantize_fp8(q.weight, q.weight_scale_inv, (16, 16))
    peftlab.wrap(model, peftlab.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    assert type(model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "FP8Linear"
    xin = torch.randn(5, 32)
    with torch.no_grad():  # at init (B = 0) the wrapped layer is the dequantized reference, on a CPU too
        torch.testing.assert_close(model.model.layers[0].self_attn.q_proj(xin), xin @ ref.t())
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(X, labels=X).loss
    loss.backward()
    dense_shapes = {(m.out_features, m.in_features) for m in quantized_bases(model)}
    assert not dense_shapes & set(saved)  # no (d_out, d_in) weight is kept for backward
    model, losses = lora_train_existing(model, steps=6)
    assert losses[-1] < losses[0] - 0.2
    before = [stored(m) for m in quantized_bases(model)]
    with pytest.warns(UserWarning, match=r"a fp8 base layer"):
        peftlab.merge(model)
    peftlab.unmerge(model)
    assert all(all(torch.equal(x, y) for x, y in zip(stored(m), b)) for m, b in zip(quantized_bases(model), before))


def lora_train_existing(model, steps):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(X, labels=X).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model.eval(), losses


def test_quantize_with_the_fp8_backend_and_dequantize_back(tiny):
    model = tiny("llama")
    with torch.no_grad():
        ref = model(X).logits
    quantize(model, backend="fp8")
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in quantized_bases(model))
    with torch.no_grad():
        out = model(X).logits
    assert ((out - ref).abs().mean() / ref.abs().mean()).item() < 0.05
    dequantize_model(model)
    assert not quantized_bases(model)
    with torch.no_grad():
        torch.testing.assert_close(model(X).logits, out)


def test_all_linear_targets_the_fp8_backends_own_layers(tiny):
    """Fp8BlockLinear is no nn.Linear: "all-linear" still finds it (the 135M backend table once failed here)."""
    model = quantize(tiny("llama"), backend="fp8")
    n = len(quantized_bases(model))
    model, losses = lora_train(model, steps=4, lr=2e-2)
    assert len([m for m in model.modules() if hasattr(m, "base_layer")]) == n
    assert type(model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Fp8BlockLinear"
    assert losses[-1] < losses[0]


# ---- bytes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant,backend,scheme", [("nf4", "bitsandbytes", "nf4"), ("int8", "bitsandbytes", "int8"),
                                                  ("torchao-int8", "torchao", "int8"), ("torchao-int4", "torchao", "int4"),
                                                  ("fp8", "fp8", "fp8"), ("mxfp4", "mxfp4", "mxfp4")])  # fmt: skip
def test_estimator_bytes_equal_what_each_backend_stores(quant, backend, scheme):
    if backend == "torchao":
        pytest.importorskip("torchao")
    dense = torch.randn(256, 384)
    layer = get_backend(backend).quantize_linear(dense, None, scheme, {"device": "cpu", "dtype": torch.float32})
    measured = get_backend(backend).weight_bytes(layer)
    expected = quantized_bytes(256, 384, quant)
    if backend == "bitsandbytes" and scheme == "nf4":
        assert abs(measured - expected) <= 256 * 4 + 16  # the 256-entry code table, counted once per model
    else:
        assert measured == expected
    report = memory_report(nn.Sequential(layer))
    assert report["quantized_linear"]["modules"] == 1 and report["quantized_linear"]["params"] == 256 * 384


def test_torchao_cpu_int4_unpacking_equals_reading_the_weight_through_its_kernel(monkeypatch):
    pytest.importorskip("torchao")
    from peftlab.backends.quant import torchao as ao

    backend = get_backend("torchao")
    for d_out, d_in, group in [(80, 128, 64), (192, 64, 32)]:  # a short last row block, and full ones
        layer = backend.quantize_linear(torch.randn(d_out, d_in), None, "int4", {"device": "cpu", "group_size": group})
        unpacked = backend.dequantize(layer)
        with monkeypatch.context() as m:
            m.setattr(ao, "_cpu_int4_block_n", lambda: None)  # the fallback: I · Ŵᵀ through the packed kernel
            through_kernel = backend.dequantize(layer)
        assert torch.equal(unpacked, through_kernel)
