"""MXFP4 (GPT-OSS's e2m1 blocks of 32 with an e8m0 scale) as a quantized LoRA base: the encoding against an
independent reference and against transformers' GPT-OSS decoder, the frozen forward, LoRA training, merge /
unmerge, and a GPT-OSS-style checkpoint loaded through transformers' ``Mxfp4Config`` on a CPU."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from test_quant_backends import X, lora_train, quantized_bases, stored

import peftlab
from peftlab.backends.quant.base import backend_of
from peftlab.backends.quant.model import QuantizationError, dequantize_model, memory_report, quantize
from peftlab.backends.quant.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from peftlab.persist.quantized_merge import merge_quantized
from peftlab.util.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny GEMMs: as one CI worker runs them
GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def reference_mxfp4(w: torch.Tensor) -> list[list[torch.Tensor]]:
    """Independent encoding, block by block in float64: for each block of 32 along d_in, the values it may
    decode to. A candidate scale 2^k stores each value as the signed e2m1 level {0, ±0.5, ±1, ±1.5, ±2, ±3, ±4,
    ±6} · 2^k nearest to it (beyond ±6 · 2^k: ±6 · 2^k); the block takes, of k = ⌊log2 amax⌋ − 2 (OCP) and k + 1,
    the one with the smaller squared error (both when the two errors agree to 1e-9)."""
    levels = sorted({s * g for g in GRID for s in (1, -1)})
    out = []
    for i in range(w.shape[0]):
        row = []
        for j0 in range(0, w.shape[1], 32):
            block = [float(v) for v in w[i, j0 : j0 + 32]]
            amax = max(abs(v) for v in block)
            if amax == 0:
                row.append([torch.zeros(len(block), dtype=torch.float64)])
                continue
            k = math.floor(math.log2(amax)) - 2
            cands = []
            for scale in (2.0**k, 2.0 ** (k + 1)):
                vals = torch.tensor([min(levels, key=lambda q: abs(v / scale - q)) * scale for v in block])
                cands.append((float(((vals - torch.tensor(block, dtype=torch.float64)) ** 2).sum()), vals))
            (e0, v0), (e1, v1) = cands
            row.append([v0, v1] if abs(e0 - e1) <= 1e-9 * max(e0, e1) else [v0 if e0 < e1 else v1])
        out.append(row)
    return out


def test_mxfp4_encoding_matches_an_independent_reference_and_the_gpt_oss_decoder():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 80, generator=gen) * torch.logspace(-3, 2, 6)[:, None]  # rows of different magnitude
    w[0, :32] = 0.0  # an all-zero block
    w[1, 5] = 3.0e-9  # a value far below its block's scale rounds to zero
    q, scale = quantize_mxfp4(w)  # d_in 80: the third block is zero-padded
    assert q.shape == (6, 3 * 16) and q.dtype == torch.uint8 and scale.shape == (6, 3) and scale.dtype == torch.uint8
    deq = dequantize_mxfp4(q, scale, 80)
    for i, row in enumerate(reference_mxfp4(w)):
        for g, allowed in enumerate(row):
            assert any(torch.equal(deq[i, 32 * g : 32 * g + 32].double(), v) for v in allowed), (i, g)
    # ties go to the even code: scale 1 (amax 6), |v| at each midpoint between two levels
    ties = torch.tensor([[6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, -2.5] + [0.0] * 22])
    got = dequantize_mxfp4(*quantize_mxfp4(ties), 32)[0, :10]
    assert got.tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -1.0, -2.0]
    # the GPT-OSS checkpoint layout: transformers' own decoder of `*_blocks` / `*_scales` reads our bytes alike
    mxfp4_hf = pytest.importorskip("transformers.integrations.mxfp4")
    blocks = q.view(6, 3, 16)[None]  # (experts, d_out, G, 16)
    theirs = mxfp4_hf.convert_moe_packed_tensors(blocks, scale[None], dtype=torch.float32)[0].t()[:, :80]
    assert torch.equal(theirs, deq)
    # requantizing dequantized values stores them again exactly (zero is always code 0) ...
    q2, scale2 = quantize_mxfp4(deq)
    assert torch.equal(dequantize_mxfp4(q2, scale2, 80), deq)
    # ... and a small change (a merge's ΔW) keeps the block scales: a block whose largest value sits at 6 · scale
    # and grows a little saturates there instead of doubling its scale (which would halve its precision)
    top = torch.tensor([[6.0, 0.5, -1.5, 0.25] + [1.0] * 28])
    q3, scale3 = quantize_mxfp4(top * (1 + 1e-3))
    assert scale3.item() == quantize_mxfp4(top)[1].item() == 127
    assert (dequantize_mxfp4(q3, scale3, 32) - top).abs().max() <= 0.25 + 1e-6


def test_lora_on_an_mxfp4_base_trains_merges_with_a_measured_error_and_unmerges_exactly(tiny):
    model = quantize(tiny("llama"), backend="mxfp4")
    bases = quantized_bases(model)
    assert len(bases) == 14 and {backend_of(m).name for m in bases} == {"mxfp4"}
    assert memory_report(model)["quantized_linear"]["bits_per_param"] == 4.25
    q = model.model.layers[0].self_attn.q_proj
    w = backend_of(q).dequantize(q)
    xin = torch.randn(5, 32)
    torch.testing.assert_close(q(xin), xin @ w.t())  # the frozen forward is x · dequant(W)ᵀ
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    peftlab.wrap(model, peftlab.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(X, labels=X).loss.backward()
    assert not {(m.out_features, m.in_features) for m in bases} & set(saved)  # no dense weight kept for backward
    peftlab.unwrap(model)
    model, losses = lora_train(model, steps=6, lr=2e-2)
    assert losses[-1] < losses[0] - 0.2
    assert all(p.grad is None and not p.requires_grad for n, p in model.named_parameters() if "lora" not in n)
    with torch.no_grad():
        adapted = model(X).logits
    before = [stored(m) for m in bases]
    with pytest.warns(UserWarning, match=r"an? mxfp4 base layer \[32, 32\] is not exact: .*max [0-9.e-]+, mean"):
        peftlab.merge(model)
    err = bases[0].peftlab_merge_error
    assert err["scheme"] == "mxfp4:mxfp4" and err["bits"] == 4 and err["max_abs"] > 0
    with torch.no_grad():
        merged = model(X).logits
    assert 0 < (merged - adapted).abs().max() < 1.0  # requantized: close to, not equal to, the adapter
    peftlab.unmerge(model)
    assert all(all(torch.equal(x, y) for x, y in zip(stored(m), b)) for m, b in zip(bases, before))
    with torch.no_grad():
        assert torch.equal(model(X).logits, adapted)
    # accurate (error-feedback) requantization works on the e2m1 grid, and unmerges exactly too
    calib = {"input_ids": torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(3))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = merge_quantized(model, calib, requantize="accurate")
    assert report  # per-layer errors, calibrated
    peftlab.unmerge(model)
    assert all(all(torch.equal(x, y) for x, y in zip(stored(m), b)) for m, b in zip(bases, before))
    # a full-precision merge into the dequantized base is exact
    peftlab.unwrap(model, merge=True, dequantize=True)
    assert not quantized_bases(model)
    with torch.no_grad():
        torch.testing.assert_close(model(X).logits, adapted, rtol=1e-4, atol=1e-4)


def test_quantize_to_mxfp4_and_dequantize_back(tiny):
    model = tiny("llama")
    with torch.no_grad():
        ref = model(X).logits
    quantize(model, backend="mxfp4")
    with torch.no_grad():
        out = model(X).logits
    assert 0 < ((out - ref).abs().mean() / ref.abs().mean()).item() < 0.2  # 4-bit: lossy, not broken
    dequantize_model(model)
    assert not quantized_bases(model)
    with torch.no_grad():
        torch.testing.assert_close(model(X).logits, out)


def test_mxfp4_bad_arguments_say_what_is_valid(tiny):
    with pytest.raises(ConfigError, match=r"backend 'mxfp4' has schemes mxfp4, not 'nf4'"):
        quantize(tiny("llama"), backend="mxfp4", scheme="nf4")
    with pytest.raises(ConfigError, match=r"mxfp4' stores 4-bit \(e2m1\) weights; bits must be 4, got 8"):
        quantize(tiny("llama"), backend="mxfp4", bits=8)
    model = quantize(tiny("llama"), backend="mxfp4")
    with pytest.raises(QuantizationError, match="already quantized .*Mxfp4Linear"):
        quantize(model, backend="mxfp4")


def gpt_oss_mxfp4_checkpoint(path) -> dict[str, torch.Tensor]:
    """A tiny GPT-OSS checkpoint as OpenAI ships it: expert stacks as ``*_blocks`` (E, d_out, G, 16) and
    ``*_scales`` (E, d_out, G) packed by :func:`quantize_mxfp4`, ``quantization_config`` mxfp4. Returns the
    dense (E, d_in, d_out) expert stacks those bytes decode to."""
    from safetensors.torch import save_file
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    config = GptOssConfig(
        hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=32, num_local_experts=4, num_experts_per_tok=2, vocab_size=100, max_position_embeddings=64,
        layer_types=["full_attention", "sliding_attention"], sliding_window=16,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )  # fmt: skip
    state = {k: v.contiguous() for k, v in GptOssForCausalLM(config).state_dict().items()}
    dense = {}
    for key in [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        stack = state.pop(key)  # (E, d_in, d_out): x @ stack[e]
        packed = [quantize_mxfp4(stack[e].t()) for e in range(stack.shape[0])]
        state[key + "_blocks"] = torch.stack([q.view(q.shape[0], -1, 16) for q, _ in packed])
        state[key + "_scales"] = torch.stack([s for _, s in packed])
        dense[key] = torch.stack([dequantize_mxfp4(q, s, stack.shape[1]).t() for q, s in packed])
    config.quantization_config = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
    }  # fmt: skip
    config.save_pretrained(path)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return dense


def test_a_gpt_oss_mxfp4_checkpoint_loaded_by_transformers_on_a_cpu_wraps_and_trains(tmp_path):
    """transformers' Mxfp4Config on a CPU without the `kernels` package dequantizes the experts while loading
    (integrations/mxfp4.py: ``Mxfp4Dequantize``); the experts it builds are exactly the checkpoint's MXFP4
    values, and LoRA on them (``target_parameters``) and on the attention trains."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    dense = gpt_oss_mxfp4_checkpoint(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(
            tmp_path, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32
        )
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in dense.items())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peftlab.wrap(model, peftlab.LoraConfig(r=4, alpha=8, target_modules="all-linear",
                                               target_parameters=["gate_up_proj", "down_proj"]))  # fmt: skip
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(X, labels=X).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert all(torch.equal(params[k], v) for k, v in dense.items())  # the MXFP4 experts stay frozen
