"""peftlab.estimate: hand-computed breakdown of a tiny Llama, the saving rules against what autograd really saves
(LoRA functions, selective checkpointing, whole tiny BERT / Llama models per method), meta-device counting, CLI."""

from __future__ import annotations

import json
import time

import pytest
import torch

import peftlab
from peftlab.estimator.estimate import estimate, fit, parse_size
from peftlab.estimator.model import quantized_bytes

TINY_LLAMA = {
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "tie_word_embeddings": True,
    "max_position_embeddings": 64,
}  # fmt: skip
TINY_BERT = {
    "model_type": "bert", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "vocab_size": 100, "max_position_embeddings": 64, "num_labels": 2,
}  # fmt: skip


def _config(data):
    from peftlab.estimator.model import load_config

    config = load_config(data)
    config._attn_implementation = "sdpa"
    return config


def test_tiny_llama_breakdown_matches_hand_computation():
    """2 layers, h=32, I=64, 4 heads (2 KV, head_dim 8), tied vocab 100; LoRA r=4 on q, v; fp32; B=2, T=8."""
    est = estimate(TINY_LLAMA, peftlab.LoraConfig(r=4), 2, 8, precision="fp32", device="cpu")
    layer = 1024 + 512 + 512 + 1024 + 3 * 2048 + 2 * 32  # q, k, v, o, gate/up/down, two norms
    base = 100 * 32 + 2 * layer + 32
    lora = 2 * ((4 * 32 + 32 * 4) + (4 * 32 + 16 * 4))  # q: A 4×32, B 32×4; v: A 4×32, B 16×4
    assert est.total_params == base + lora and est.trainable_params == lora
    assert est.frozen_weights == 4 * base and est.adapter_weights == 4 * lora
    assert est.gradients == 4 * lora and est.optimizer_states == 2 * 4 * lora
    # activations, M = 16 tokens: layer 0 (input needs no grad): q/v LoRA save x (16·32·4) and xa (16·4·4) each;
    # attention saves q, k, v (2 KV heads), out, logsumexp; norm 2 saves x2 and rsqrt; SiLU·up saves gate, silu, up
    mh, mi = 16 * 32 * 4, 16 * 64 * 4
    attn = mh + 2 * (2 * 2 * 8 * 8 * 4) + mh + 2 * 4 * 8 * 4
    layer0 = mh + 2 * 16 * 4 * 4 + attn + mh + 16 * 4 + 3 * mi
    layer1 = layer0 + mh + 16 * 4  # its input requires grad: norm 1 saves x and rsqrt too
    rotary, final_norm = 2 * 8 * 8 * 4, mh + 16 * 4
    assert est.activations_per_block == (layer0, layer1)
    assert est.activations == rotary + layer0 + layer1 + final_norm
    # fused loss: 15 shifted rows × 100 logits, two fp32 chunk buffers, grad_h and the shifted hidden copy
    assert est.logits_loss_fused == 2 * 14 * 100 * 4 + 2 * 14 * 32 * 4
    assert est.logits_loss_unfused == 3 * 16 * 100 * 4
    assert est.total_peak == max(est.phases.values()) >= est.weights + est.activations


def test_optimizer_and_quantized_sizes():
    cfg = peftlab.LoraConfig(r=4, target_modules="all-linear")
    a = estimate(TINY_LLAMA, cfg, 1, 8, precision="fp32", device="cpu")
    b = estimate(TINY_LLAMA, cfg, 1, 8, precision="fp32", device="cpu", optimizer="paged_adamw8bit")
    assert b.optimizer_paged and b.optimizer_states == 8 * a.trainable_params  # all tensors < 4096: 32-bit
    big = estimate(
        "smollm2-135m", peftlab.LoraConfig(r=64, target_modules="all-linear"), 1, 8, optimizer="adamw8bit"
    )
    n = big.trainable_params  # every LoRA tensor has >= 4096 elements at r=64: 2 bytes + absmax per 256
    assert big.optimizer_states == 2 * n + 2 * 4 * n // 256
    assert quantized_bytes(64, 64, "int8") == 64 * 64 + 64 * 4
    assert quantized_bytes(64, 64, "nf4", double_quant=False) == 64 * 64 // 2 + 64 * 4
    q = estimate("smollm2-135m", cfg, 1, 8, quant="nf4")
    assert q.frozen_weights < 0.25 * estimate("smollm2-135m", cfg, 1, 8).frozen_weights + 64 * 2**20


def test_lora_rule_matches_saved_tensors():
    """lora_ops.lora_saved_bytes against the bytes LoraLinearFunction / LoraBranchFunction save (dropout on)."""
    from peftlab.backends.lora_ops import LoraBranchFunction, LoraLinearFunction, lora_saved_bytes

    m, d_in, d_out, r = 24, 16, 12, 4
    x = torch.randn(2, m // 2, d_in, requires_grad=True)
    w = torch.randn(d_out, d_in)
    a, b = torch.randn(r, d_in, requires_grad=True), torch.randn(d_out, r, requires_grad=True)
    params = {t.untyped_storage().data_ptr() for t in (w, a, b)}
    for fn, args in (
        (LoraLinearFunction, (x, w, None, a, b, 2.0, 0.1, 1234)),
        (LoraBranchFunction, (x, a, b, 2.0, 0.1, 1234)),
    ):
        saved = {}

        def pack(t, saved=saved):
            if t.untyped_storage().data_ptr() not in params:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn.apply(*args).sum().backward()
        assert sum(saved.values()) == sum(lora_saved_bytes(m, d_in, r, 4, 4).values()), fn.__name__


def _measure_saved(model, ids, all_dtypes: bool = False, **inputs) -> int:
    """Bytes autograd keeps for backward from the logits down (parameters and buffers excluded); floating-point
    tensors, or with ``all_dtypes`` integer and bool ones too (the inputs excluded: they live anyway)."""
    given = [ids, *inputs.values()]
    skip = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers()) + given}
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs)
    seen, stack, nodes = {}, [out.logits.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in nodes:
            continue
        nodes.add(node)
        tensors = []
        for name in dir(node):
            if name.startswith("_saved_"):
                try:
                    value = getattr(node, name)
                except Exception:  # some saved fields are not readable after a custom function
                    continue
                tensors += list(value) if isinstance(value, (tuple, list)) else [value]
        if type(node).__name__.endswith("Backward"):  # custom autograd functions
            tensors += list(node.saved_tensors)
        for t in tensors:
            if isinstance(t, torch.Tensor) and (all_dtypes or t.is_floating_point()) and t.numel():
                key = t.untyped_storage().data_ptr()
                if key not in skip:
                    seen[key] = t.untyped_storage().nbytes()
        stack += [n for n, _ in node.next_functions]
    return sum(seen.values())


METHODS = {
    "full": None,
    "lora": lambda: peftlab.LoraConfig(r=4, target_modules="all-linear"),
    "lora-qv": lambda: peftlab.LoraConfig(r=4),
    "houlsby": lambda: peftlab.AdapterConfig(style="houlsby", reduction_factor=4),
    "pfeiffer": lambda: peftlab.AdapterConfig(style="pfeiffer", reduction_factor=4),
    "prefix": lambda: peftlab.PrefixConfig(num_virtual_tokens=3),
    "adalora": lambda: peftlab.AdaLoraConfig(init_r=4, target_r=2, total_steps=10),
    "parallel": lambda: peftlab.AdapterConfig(style="parallel", reduction_factor=4),
    "lora-dropout-bias": lambda: peftlab.LoraConfig(r=4, target_modules="all-linear", dropout=0.1, bias="lora_only"),
    "dora": lambda: peftlab.LoraConfig(r=4, target_modules="all-linear", use_dora=True),
    "dora-bias": lambda: peftlab.LoraConfig(r=4, target_modules="all-linear", use_dora=True, bias="lora_only"),
}
CASES = [(family, method, None) for family in ("llama", "bert") for method in METHODS] + [
    ("llama", method, "nf4") for method in ("lora", "dora")  # 4-bit bases: the fused dequantize-in-function path
]


@pytest.mark.parametrize("family,method,quant", CASES)
def test_activation_rules_match_autograd(family, method, quant):
    """Every method and variant: the estimator's saved-activation count equals what a real tiny model saves
    (the rules cannot drift), and its trainable count the model's. Tolerance 0.1%: the one difference is the
    8-byte fp64 scalar autograd saves for each parallel adapter's ``* scale`` (32 bytes of ~48 KB)."""
    from peftlab.util.models import auto_class

    data, kind = (TINY_LLAMA, "causal-lm") if family == "llama" else (TINY_BERT, "seq-cls")
    config = _config(data)
    torch.manual_seed(0)
    model = auto_class(kind).from_config(config)
    if quant is not None:
        pytest.importorskip("bitsandbytes")
        model = peftlab.quantize(model, bits=4)
    cfg = METHODS[method]() if METHODS[method] else None
    if cfg is not None:
        peftlab.wrap(model, cfg)
    model.train()
    ids = torch.randint(1, 100, (2, 8))
    measured = _measure_saved(model, ids)
    est = estimate(config, cfg, 2, 8, precision="fp32", device="cpu", kind=kind, quant=quant)
    assert est.activations == pytest.approx(measured, rel=1e-3, abs=0), (est.activations, measured)
    assert est.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_dora_rule_matches_saved_tensors():
    """dora.dora_saved_bytes against what DoraScaleFunction saves beyond its parameters (bias on)."""
    from peftlab.methods.lora.dora import DoraScaleFunction, dora_saved_bytes

    m, d_out = 24, 12
    y_lora = torch.randn(2, m // 2, d_out, requires_grad=True)
    magnitude, bias = torch.rand(d_out, requires_grad=True), torch.randn(d_out, requires_grad=True)
    norm = torch.rand(d_out) + 0.5
    params = {t.untyped_storage().data_ptr() for t in (magnitude, bias)}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        DoraScaleFunction.apply(y_lora, magnitude, norm, bias).sum().backward()
    assert sum(saved.values()) == sum(dora_saved_bytes(m, d_out, 4).values())


def test_selective_checkpoint_rule_matches_cached_outputs():
    """memory.checkpoint_kept_bytes: a selectively checkpointed block keeps its input and its GEMM outputs."""
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    from peftlab.estimator.activations import block_cost
    from peftlab.core.registry import get_method
    from peftlab.estimator.model import count
    from peftlab.training.memory import SELECTIVE_KEEPS, _keep_matmuls, checkpoint_kept_bytes
    from peftlab.util.models import auto_class

    assert {op.name().split("::")[1].split(".")[0] for op in _keep_matmuls.ops} <= {
        *SELECTIVE_KEEPS, "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    }  # fmt: skip
    config = _config(TINY_LLAMA)
    torch.manual_seed(0)
    model = auto_class("causal-lm").from_config(config)
    lora = peftlab.LoraConfig(r=4, target_modules="all-linear")
    peftlab.wrap(model, lora)
    model.train()
    caches = []

    def context_fn():
        fwd, rec = create_selective_checkpoint_contexts(_keep_matmuls, allow_cache_entry_mutation=True)
        caches.append(fwd)
        return fwd, rec

    block = model.model.layers[1]
    x = torch.randn(2, 8, 32, requires_grad=True)
    pos = model.model.rotary_emb(x, torch.arange(8)[None].expand(2, -1))

    def run_block(h):
        out = block(h, position_embeddings=pos)
        return out[0] if isinstance(out, tuple) else out

    out = checkpoint(run_block, x, use_reentrant=False, context_fn=context_fn)
    kept = {}
    for per_op in caches[0].storage.values():
        for item in per_op.values():
            for leaf in torch.utils._pytree.tree_leaves(item):
                t = getattr(leaf, "val", leaf)
                if isinstance(t, torch.Tensor) and t.numel():
                    kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    counts = count(config, "causal-lm", get_method("lora").estimate, lora, "fp32", None)
    cost = block_cost(counts, 1, True, 2, 8, 4, "cpu")
    assert sum(kept.values()) == cost.gemm_outputs
    assert cost.kept("selective") == checkpoint_kept_bytes(2 * 8 * 32 * 4, sum(kept.values()), True)
    out.sum().backward()


def test_70b_config_counts_in_seconds():
    start = time.perf_counter()
    est = estimate("meta-llama/Meta-Llama-3-70B", None, 1, 2048)
    assert est.total_params == 70_553_706_496
    qlora = estimate("meta-llama/Meta-Llama-3-70B", peftlab.LoraConfig(r=16, target_modules="all-linear"), 1, 2048,
                     quant="nf4", gradient_checkpointing=True)  # fmt: skip
    assert qlora.frozen_weights < 0.3 * est.frozen_weights
    assert time.perf_counter() - start < 30


def test_checkpointing_and_fit_order():
    cfg = peftlab.LoraConfig(r=8, target_modules="all-linear")
    none, sel, full = (estimate("smollm2-135m", cfg, 4, 256, gradient_checkpointing=c)
                       for c in ("none", "selective", "full"))  # fmt: skip
    assert none.activations > sel.activations > full.activations
    assert full.flops_per_step > sel.flops_per_step == none.flops_per_step
    budget = parse_size("4GiB")
    batch, est = fit(budget, "batch", model_or_path="smollm2-135m", config=cfg, seq_len=256)
    assert est.total_peak <= budget < estimate("smollm2-135m", cfg, batch + 1, 256).total_peak
    assert (
        parse_size("24GB") == 24 * 10**9
        and parse_size("24GiB") == 24 * 2**30
        and parse_size("1.5G") == 3 * 2**29
    )


def test_cli_table_and_fit(tmp_path, capsys):
    from peftlab.cli import main

    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY_LLAMA))
    assert main(["estimate", "--model", str(path), "--method", "qlora", "--r", "4", "--target", "all-linear",
                 "--batch", "2", "--seq", "16"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "frozen weights (nf4)" in text and "TOTAL PEAK" in text
    assert (
        main(["estimate", "--model", "smollm2-135m", "--method", "lora", "--seq", "512", "--fit", "2GB"]) == 0
    )
    text = capsys.readouterr().out
    assert "largest batch that fits in 2GB" in text
    assert main(["estimate", "--model", "nonexistent-model", "--method", "lora"]) == 2
    assert "built-in names" in capsys.readouterr().err


def test_bench_harness_estimate():
    """The harness's estimate column: a number for peftlab methods, None for HF PEFT peers."""
    from peftlab.estimate_cli import bench_estimate_mb
    from peftlab.util.models import auto_class

    model = auto_class("seq-cls").from_config(_config(TINY_BERT))
    spec = {
        "method": "houlsby",
        "params": {"reduction_factor": 4},
        "train": {"batch_size": 4, "max_length": 16},
    }
    value = bench_estimate_mb(spec, model, "seq-cls", "cpu", 10)
    cfg = peftlab.AdapterConfig(style="houlsby", reduction_factor=4, modules_to_save=["classifier"])
    assert value == estimate(model.config, cfg, 4, 16, precision="fp32", device="cpu").total_peak / 2**20
    assert bench_estimate_mb({**spec, "method": "hf-lora"}, model, "seq-cls", "cpu", 10) is None


def test_parameter_lora_is_counted():
    """target_parameters alone adapts no module (HF PEFT's semantics): the count is E·r·(d_in + d_out) per
    parameter (here 2-D down_proj weights, E = 1), as the wrapped model has."""
    cfg = peftlab.LoraConfig(r=4, target_parameters=["mlp.down_proj.weight"])
    est = estimate(TINY_LLAMA, cfg, 1, 8, precision="fp32", device="cpu")
    assert est.trainable_params == 2 * (4 * 64 + 32 * 4)
    import transformers

    model = transformers.LlamaForCausalLM(_config(TINY_LLAMA))
    assert peftlab.count_parameters(peftlab.wrap(model, cfg))[0] == est.trainable_params


EMBEDDING_CASES = {
    "llama-lora-embed": ("llama", lambda: peftlab.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"])),
    "llama-tokens-tied": ("llama", lambda: peftlab.LoraConfig(r=4, trainable_token_indices=[3, 7, 50])),
    "bert-lora-embeddings": ("bert", lambda: peftlab.LoraConfig(
        r=3, target_modules=["word_embeddings", "token_type_embeddings", "position_embeddings", "query"])),
    "bert-tokens": ("bert", lambda: peftlab.LoraConfig(r=4, target_modules=["value"], trainable_token_indices=[5, 9])),
}


@pytest.mark.parametrize("case", EMBEDDING_CASES)
def test_embedding_and_token_rules_match_autograd(case):
    """LoRA on nn.Embedding targets and trainable tokens (tied head on Llama): the estimator's trainable count is
    the wrapped model's, and its saved activations are what autograd saves, every dtype (index and mask too; the
    tolerance covers the 8-byte fp64 scalar of each ``* scale``)."""
    from peftlab.util.models import auto_class

    family, make = EMBEDDING_CASES[case]
    data, kind = (TINY_LLAMA, "causal-lm") if family == "llama" else (TINY_BERT, "seq-cls")
    config = _config(data)
    torch.manual_seed(0)
    model = auto_class(kind).from_config(config)
    cfg = make()
    peftlab.wrap(model, cfg)
    model.train()
    ids = torch.randint(1, 100, (2, 8))
    types = {"token_type_ids": torch.zeros_like(ids)} if family == "bert" else {}  # as BERT's tokenizers give them
    measured = _measure_saved(model, ids, all_dtypes=True, **types)
    est = estimate(config, cfg, 2, 8, precision="fp32", device="cpu", kind=kind)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert est.trainable_params == trainable and est.gradients == 4 * trainable
    assert est.optimizer_states == 8 * trainable
    assert est.activations == pytest.approx(measured, rel=1e-3, abs=0), (est.activations, measured)
    without = estimate(config, _without_embeddings(cfg), 2, 8, precision="fp32", device="cpu", kind=kind)
    assert est.activations > without.activations  # the embedding's output requires grad now: more is saved


def _without_embeddings(cfg):
    import dataclasses

    keep = [t for t in cfg.target_modules if "embed" not in t] if isinstance(cfg.target_modules, list) else None
    return dataclasses.replace(cfg, target_modules=keep, trainable_token_indices=None)


def test_targets_the_estimator_does_not_model_are_refused_by_name():
    """A convolution or multi-head attention target: the estimator's model types have none, so they are refused
    with what it models (reached here through a target name the estimator's matching accepts, on a stub)."""
    from peftlab.methods.lora.estimate import adapted_linears

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Conv1d(4, 4, 3))
    with pytest.raises(peftlab.util.errors.ConfigError, match=r"linear layers, embeddings, .* not 1 \(Conv1d\)"):
        adapted_linears(model, peftlab.LoraConfig(r=2, target_modules=["0", "1"]), [])
