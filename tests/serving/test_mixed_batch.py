"""Mixed batches: every row runs its own adapter in one pass, and equals that row run alone with only its adapter.

Forward (LoRA, AdaLoRA, mixed ranks and targets, bottleneck, head copies, prefix, quantized bases, every CPU path
and the Triton kernels in the interpreter), greedy generate with and without the KV cache and with left
padding, beam search; bad input; tables that follow adapter edits; no Python loop over adapters.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import peftlab
from helpers import perturb, tiny_model
from peftlab.serving import router as mixed_batch
from peftlab.serving.router import BASE

TOL = {"rtol": 1e-5, "atol": 1e-5}


def ids(n=4, t=7, seed=0):
    return torch.randint(1, 100, (n, t), generator=torch.Generator().manual_seed(seed))


def lora_zoo(family="llama"):
    """Three adapters of different kinds, ranks and targets on one tiny model (weights far from init)."""
    model = tiny_model(family)
    linear = ["q_proj", "v_proj"] if family == "llama" else ["c_attn"]
    peftlab.wrap(model, peftlab.LoraConfig(r=4, alpha=8, target_modules="all-linear", adapter_name="a"))
    peftlab.wrap(model, peftlab.LoraConfig(r=16, alpha=8, target_modules=linear, adapter_name="b", use_rslora=True))
    if family == "llama":
        peftlab.wrap(model, peftlab.AdaLoraConfig(init_r=6, target_r=2, total_steps=10, target_modules=["k_proj", "o_proj"],
                                                  adapter_name="c"))
    else:
        peftlab.wrap(model, peftlab.LoraConfig(r=8, alpha=4, target_modules=["c_fc"], adapter_name="c"))
    perturb(model, 0.3)
    return model.eval()


def alone(model, name, **inputs):
    """Output of one input run by itself with only ``name`` active (``__base__``: none)."""
    peftlab.set_active_adapters(model, [] if name == BASE else [name])
    with torch.no_grad():
        return model(**inputs)


@pytest.fixture(params=["segments", "gather", "triton"])
def path(request, monkeypatch):
    """Force one LoRA path: padded segments + bmm, per-row gathered bmm, or the Triton kernels (interpreter)."""
    calls = []
    if request.param == "triton":
        pytest.importorskip("triton")
        from peftlab.kernels import sgmv

        monkeypatch.setattr(mixed_batch, "_use_triton", lambda layer, x: True)
        monkeypatch.setattr(mixed_batch, "_warned", set())
        for name in ("sgmv_shrink", "sgmv_expand", "bgmv_shrink", "bgmv_expand"):
            fn = getattr(sgmv, name)
            monkeypatch.setattr(sgmv, name, lambda *a, _fn=fn, _n=name, **k: calls.append(_n) or _fn(*a, **k))
    else:
        monkeypatch.setattr(mixed_batch.Router, "use_segments", lambda self, t: request.param == "segments")
    yield request.param
    if request.param == "triton":  # the kernels ran, and never fell back to torch
        assert "triton" not in mixed_batch._warned
        if not request.node.name.startswith("test_all_base"):  # uniform batches take the single-adapter path
            assert "sgmv_expand" in calls and "bgmv_expand" in calls


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_forward_rows_equal_single_adapter_runs(family, path):
    model = lora_zoo(family)
    x = ids(6)
    names = ["a", BASE, "c", "b", "a", "c"]
    with torch.no_grad():
        mixed = model(input_ids=x, adapter_names=names).logits
    for m, name in enumerate(names):
        torch.testing.assert_close(mixed[m : m + 1], alone(model, name, input_ids=x[m : m + 1]).logits, **TOL)
    assert peftlab.active_adapters(model) == ["c"]  # a mixed batch switches nothing
    x1 = ids(6, 1)  # one token per row, as in decoding (BGMV on the Triton path)
    with torch.no_grad():
        mixed = model(input_ids=x1, adapter_names=names).logits
    for m, name in enumerate(names):
        torch.testing.assert_close(mixed[m : m + 1], alone(model, name, input_ids=x1[m : m + 1]).logits, **TOL)


def test_all_base_rows_and_one_adapter_batches(path):
    model = lora_zoo()
    x = ids(3)
    stacked = []
    real_add_lora = mixed_batch._add_lora
    mixed_batch._add_lora = lambda *a, **k: stacked.append(1) or real_add_lora(*a, **k)
    try:
        with torch.no_grad():
            base = model(input_ids=x, adapter_names=[BASE] * 3).logits
            only_b = model(input_ids=x, adapter_names=["b"] * 3).logits
    finally:
        mixed_batch._add_lora = real_add_lora
    assert not stacked  # one adapter on every row: the single-adapter fused path, no stacked tables
    torch.testing.assert_close(base, alone(model, BASE, input_ids=x).logits, **TOL)
    torch.testing.assert_close(only_b, alone(model, "b", input_ids=x).logits, **TOL)


def generate_alone(model, name, x, mask, **kw):
    peftlab.set_active_adapters(model, [] if name == BASE else [name])
    keep = mask.bool()
    return model.generate(input_ids=x[keep][None], attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long),
                          return_dict_in_generate=True, output_scores=True, **kw)


def left_padded(n=4, t=8):
    x = ids(n, t, seed=5)
    mask = torch.ones(n, t, dtype=torch.long)
    for m, pad in enumerate([0, 3, 1, 5][:n]):
        mask[m, :pad] = 0
        x[m, :pad] = 0
    return x, mask


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generate_with_left_padding_equals_each_row_alone(use_cache):
    model = lora_zoo()
    model.generation_config.pad_token_id = 0
    x, mask = left_padded()
    names = ["b", "a", BASE, "c"]
    kw = {"max_new_tokens": 6, "do_sample": False, "use_cache": use_cache}
    out = model.generate(input_ids=x, attention_mask=mask, adapter_names=names, return_dict_in_generate=True,
                         output_scores=True, **kw)
    for m, name in enumerate(names):
        ref = generate_alone(model, name, x[m], mask[m], **kw)
        assert torch.equal(out.sequences[m, x.shape[1]:], ref.sequences[0, int(mask[m].sum()):]), name
        for step, scores in enumerate(ref.scores):
            torch.testing.assert_close(out.scores[step][m : m + 1], scores, **TOL)
    assert all(layer.router is None for layer in _layers(model))  # routing ends with generate


def test_beam_search_rows_repeat_their_adapter():
    model = lora_zoo()
    model.generation_config.pad_token_id = 0
    x, mask = left_padded(3)
    names = ["c", BASE, "a"]
    kw = {"max_new_tokens": 5, "num_beams": 3, "num_return_sequences": 2, "do_sample": False}
    out = model.generate(input_ids=x, attention_mask=mask, adapter_names=names, return_dict_in_generate=True,
                         output_scores=True, **kw)
    for m, name in enumerate(names):
        ref = generate_alone(model, name, x[m], mask[m], **kw)
        got = out.sequences[2 * m : 2 * m + 2, x.shape[1]:]
        want = ref.sequences[:, int(mask[m].sum()):]
        assert torch.equal(got, want), name
        torch.testing.assert_close(out.sequences_scores[2 * m : 2 * m + 2], ref.sequences_scores, **TOL)


def test_bottleneck_dora_and_head_copies_run_per_segment():
    model = tiny_model("bert")
    for name, style in (("h", "houlsby"), ("p", "parallel")):
        peftlab.wrap(model, peftlab.AdapterConfig(style=style, bottleneck_size=4, adapter_name=name,
                                                  modules_to_save=["classifier"]))
    peftlab.wrap(model, peftlab.LoraConfig(r=4, target_modules=["query", "value"], adapter_name="l",
                                           modules_to_save=["classifier"]))
    peftlab.wrap(model, peftlab.LoraConfig(r=4, target_modules=["key", "value"], adapter_name="d", use_dora=True))
    perturb(model, 0.3)
    model.eval()
    x = ids(6)
    names = ["p", "l", BASE, "h", "d", "p"]
    with torch.no_grad():
        mixed = model(input_ids=x, adapter_names=names).logits
    for m, name in enumerate(names):
        torch.testing.assert_close(mixed[m : m + 1], alone(model, name, input_ids=x[m : m + 1]).logits, **TOL)


def test_prefix_rows_with_different_lengths_lora_and_base():
    model = tiny_model("llama")
    peftlab.wrap(model, peftlab.PrefixConfig(num_virtual_tokens=3, adapter_name="p3"))
    peftlab.wrap(model, peftlab.PrefixConfig(num_virtual_tokens=5, projection_dim=8, adapter_name="p5"))
    peftlab.wrap(model, peftlab.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], adapter_name="l"))
    perturb(model, 0.3)
    model.eval()
    model.generation_config.pad_token_id = 0
    x, mask = left_padded()
    names = ["p5", "l", "p3", BASE]
    kw = {"max_new_tokens": 5, "do_sample": False}
    out = model.generate(input_ids=x, attention_mask=mask, adapter_names=names, return_dict_in_generate=True,
                         output_scores=True, **kw)
    for m, name in enumerate(names):
        ref = generate_alone(model, name, x[m], mask[m], **kw)
        assert torch.equal(out.sequences[m, x.shape[1]:], ref.sequences[0, int(mask[m].sum()):]), name
        for step, scores in enumerate(ref.scores):
            torch.testing.assert_close(out.scores[step][m : m + 1], scores, **TOL)
    plain = ids(4, 6)
    with torch.no_grad():
        mixed = model(input_ids=plain, adapter_names=names).logits
    for m, name in enumerate(names):
        torch.testing.assert_close(mixed[m : m + 1], alone(model, name, input_ids=plain[m : m + 1]).logits, **TOL)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_base_one_gemm_for_the_batch(bits):
    pytest.importorskip("bitsandbytes")
    from peftlab.backends.quant.model import quantize

    # int8 without outlier columns: LLM.int8's fp16 outlier split depends on every row of the batch, so a row
    # of a batch cannot equal that row alone with it, with or without adapters; plain int8 quantizes each row alone
    model = quantize(tiny_model("llama"), bits=bits, int8_threshold=0.0)
    for name, r in (("a", 4), ("b", 8)):
        peftlab.wrap(model, peftlab.LoraConfig(r=r, target_modules="all-linear", adapter_name=name))
    perturb(model, 0.3)
    model.eval()
    x = ids(4)
    names = ["b", "a", BASE, "b"]
    calls = []
    first = next(layer for layer in _layers(model) if type(layer.base_layer).__module__.startswith("bitsandbytes"))
    handle = first.base_layer.register_forward_hook(lambda mod, a, out: calls.append(a[0].shape[0]))
    with torch.no_grad():
        mixed = model(input_ids=x, adapter_names=names).logits
    handle.remove()
    assert calls == [4]  # one base GEMM over all rows
    for m, name in enumerate(names):
        torch.testing.assert_close(mixed[m : m + 1], alone(model, name, input_ids=x[m : m + 1]).logits, **TOL)


# ---- bad input --------------------------------------------------------------------------------------


def test_bad_names_list_the_loaded_adapters():
    model = lora_zoo()
    x = ids(3)
    with pytest.raises(peftlab.ConfigError, match=r"2 names for a batch of 3 rows.*loaded adapters: a, b, c"):
        model(input_ids=x, adapter_names=["a", "b"])
    with pytest.raises(peftlab.ConfigError, match=r"unknown adapter name\(s\) \['zz'\].*loaded adapters: a, b, c"):
        model(input_ids=x, adapter_names=["a", "zz", BASE])
    with pytest.raises(peftlab.ConfigError, match="one adapter name per row"):
        model(input_ids=x, adapter_names="a")
    with pytest.raises(peftlab.ConfigError, match=r"1 names for a batch of 3 rows.*loaded adapters"):
        model.generate(input_ids=x, adapter_names=["a"], max_new_tokens=2)
    assert all(layer.router is None for layer in _layers(model))  # nothing left routed after the errors


def test_merged_adapter_is_refused_with_how_to_unmerge():
    model = lora_zoo()
    peftlab.merge(model, "b")
    with pytest.raises(peftlab.MergeError, match=r"\['b'\] are merged.*peftlab.unmerge\(model\)"):
        model(input_ids=ids(2), adapter_names=["a", BASE])
    peftlab.unmerge(model)
    with torch.no_grad():
        model(input_ids=ids(2), adapter_names=["a", BASE])


# ---- caching, lifecycle, cost -------------------------------------------------------------------------


def test_tables_follow_in_place_edits_and_deletes():
    model = lora_zoo()
    x = ids(3)
    names = ["a", "b", "c"]
    with torch.no_grad():
        model(input_ids=x, adapter_names=names)
        perturb(model, 0.2, adapter_name="b")  # in place: the stacked tables must be rebuilt
        mixed = model(input_ids=x, adapter_names=names).logits
    for m, name in enumerate(names):
        torch.testing.assert_close(mixed[m : m + 1], alone(model, name, input_ids=x[m : m + 1]).logits, **TOL)
    with peftlab.disable_adapters(model, "b"), torch.no_grad():  # a disabled adapter's rows run the base
        mixed = model(input_ids=x, adapter_names=names).logits
    torch.testing.assert_close(mixed[1:2], alone(model, BASE, input_ids=x[1:2]).logits, **TOL)
    peftlab.delete_adapter(model, "a")
    with torch.no_grad():
        mixed = model(input_ids=x, adapter_names=["c", BASE, "b"]).logits
    torch.testing.assert_close(mixed[2:], alone(model, "b", input_ids=x[2:]).logits, **TOL)
    peftlab.unwrap(model)
    assert "generate" not in model.__dict__ and not model._forward_pre_hooks  # nothing of the routing is left
    assert "_peftlab_mixed" not in model.__dict__


def test_copies_and_pickles_keep_adapter_names():
    import copy
    import io

    model = tiny_model("llama")  # LoRA only (AdaLoRA's regulariser hook is a closure: such a model does not pickle)
    for name in ("a", "b"):
        peftlab.wrap(model, peftlab.LoraConfig(r=4, target_modules="all-linear", adapter_name=name))
    perturb(model, 0.3)
    x, names = ids(2, 5), ["b", "a"]
    kw = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    want = model.generate(input_ids=x, adapter_names=names, **kw)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        assert torch.equal(other.generate(input_ids=x, adapter_names=names, **kw), want)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("rows", [1, 8])  # decode-like and prefill-like rows
def test_cost_does_not_grow_with_the_number_of_adapters(rows):
    """The CPU path launches the same number of ops for 2 or 8 adapters: no Python loop over adapters."""
    counts = {}
    for n in (2, 8):
        model = tiny_model("llama")
        for i in range(n):
            peftlab.wrap(model, peftlab.LoraConfig(r=4, target_modules="all-linear", adapter_name=f"a{i}"))
        x = ids(16, rows)
        names = [f"a{i % n}" for i in range(16)]
        with torch.no_grad():
            model(input_ids=x, adapter_names=names)  # builds the tables
            with _CountOps() as counter:
                model(input_ids=x, adapter_names=names)
        counts[n] = counter.ops
    assert counts[2] == counts[8], counts


def _layers(model):
    from peftlab.core.layer import AdapterLayer

    return [m for m in model.modules() if isinstance(m, AdapterLayer)]
