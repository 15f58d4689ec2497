"""Prefix tuning: outputs change, gradients, padding, cache, merge, save/load, HF PEFT interop, training."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import peftlab
from helpers import sst2_batches, train_steps

peft = pytest.importorskip("peft")


def ids(n=2, t=7):
    torch.manual_seed(3)
    return torch.randint(1, 100, (n, t))


@pytest.mark.parametrize("family", ["llama", "bert"])
@torch.no_grad()
def test_outputs_change_and_disable_unwrap_restore(tiny, family):
    model = tiny(family)
    x = ids()
    base = model(input_ids=x)[0].clone()
    peftlab.wrap(model, peftlab.PrefixConfig(num_virtual_tokens=4, projection_dim=8))
    assert (model(input_ids=x)[0] - base).abs().max() > 1e-4
    with peftlab.disable_adapters(model):
        torch.testing.assert_close(model(input_ids=x)[0], base, rtol=0, atol=0)
    with pytest.raises(peftlab.MergeError, match="can't be folded into the base weights"):
        peftlab.unwrap(model, merge=True)
    peftlab.unwrap(model)
    torch.testing.assert_close(model(input_ids=x)[0], base, rtol=0, atol=0)
    assert not any("prefix" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_gradients_reach_only_prefix_parameters(tiny, family):
    model = peftlab.wrap(tiny(family), peftlab.PrefixConfig(num_virtual_tokens=3, projection_dim=8))
    model.train()
    x = ids()
    labels = x if family == "llama" else torch.tensor([0, 1])
    model(input_ids=x, labels=labels).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == n.startswith("peftlab_prefix.default."), n
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if p.grad is not None)


@pytest.mark.parametrize("family, task", [("llama", "CAUSAL_LM"), ("bert", "SEQ_CLS")])
@pytest.mark.parametrize("projection", [None, 16])
def test_parameter_counts_equal_hf_peft(tiny, family, task, projection):
    ours = peftlab.wrap(
        tiny(family),
        peftlab.PrefixConfig(
            num_virtual_tokens=5,
            projection_dim=projection,
            modules_to_save=["classifier"] if family == "bert" else None,
        ),
    )
    theirs = peft.get_peft_model(
        tiny(family),
        peft.PrefixTuningConfig(
            task_type=task,
            num_virtual_tokens=5,
            prefix_projection=projection is not None,
            encoder_hidden_size=projection or 8,
        ),
    )
    assert peftlab.count_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_padding_left_and_right_match_unpadded(tiny, family, side):
    model = peftlab.wrap(tiny(family), peftlab.PrefixConfig(num_virtual_tokens=4))
    a, b = ids(1, 7)[0], ids(1, 4)[0][:4]
    pad = torch.zeros(3, dtype=torch.long)
    x = torch.stack([a, torch.cat([pad, b]) if side == "left" else torch.cat([b, pad])])
    mask = torch.ones_like(x)
    if side == "left":
        mask[1, :3] = 0
    else:
        mask[1, 4:] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def last_hidden(**kw):  # per-token states (a BERT classifier reads [CLS], which left padding moves)
        return model(**kw, output_hidden_states=True).hidden_states[-1]

    batched = last_hidden(input_ids=x, attention_mask=mask, position_ids=positions)
    torch.testing.assert_close(batched[0], last_hidden(input_ids=a[None])[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        batched[1][mask[1].bool()], last_hidden(input_ids=b[None])[0], rtol=1e-4, atol=1e-5
    )


@torch.no_grad()
def test_generation_with_and_without_cache_gqa(tiny):
    model = peftlab.wrap(tiny("llama"), peftlab.PrefixConfig(num_virtual_tokens=6, projection_dim=16))
    model.eval()
    x = ids(2, 5)
    mask = torch.ones_like(x)
    mask[1, :2] = 0  # left padding
    cached = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=8, do_sample=False)
    uncached = model.generate(
        input_ids=x, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=False
    )
    assert torch.equal(cached, uncached)


@torch.no_grad()
def test_merge_folds_mlp_and_save_load_roundtrip(tiny, tmp_path):
    model = peftlab.wrap(tiny("llama"), peftlab.PrefixConfig(num_virtual_tokens=4, projection_dim=8))
    x = ids()
    out = model(input_ids=x).logits
    peftlab.save_adapter(model, tmp_path / "ours")
    peftlab.merge(model)
    with pytest.raises(peftlab.MergeError, match="already merged"):
        peftlab.merge(model)
    torch.testing.assert_close(model(input_ids=x).logits, out, rtol=1e-6, atol=1e-6)
    peftlab.unmerge(model)
    fresh = peftlab.load_adapter(tiny("llama"), tmp_path / "ours")
    torch.testing.assert_close(fresh(input_ids=x).logits, out, rtol=0, atol=0)


@torch.no_grad()
def test_hf_peft_export_and_import_smollm2(smollm2_dir, tmp_path):
    def load():
        return AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()

    model = peftlab.wrap(load(), peftlab.PrefixConfig(num_virtual_tokens=8, projection_dim=64))
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    enc = tok(["Paris is the capital of", "Hi"], return_tensors="pt", padding=True)
    ours = model(**enc).logits
    peftlab.export_peft(model, tmp_path)
    theirs_model = peft.PeftModel.from_pretrained(load(), str(tmp_path)).eval()
    theirs = theirs_model(**enc).logits
    diff = (theirs - ours).abs().max().item()
    print(f"prefix export max abs diff (SmolLM2, GQA 9/3 heads): {diff:.3g}")
    assert diff <= 1e-4
    back = peftlab.import_peft(load(), tmp_path)
    torch.testing.assert_close(back(**enc).logits, theirs, rtol=1e-5, atol=1e-4)


def test_errors(tiny):
    with pytest.raises(peftlab.ConfigError, match="num_virtual_tokens must be a positive integer"):
        peftlab.PrefixConfig(num_virtual_tokens=0)
    with pytest.raises(peftlab.ConfigError, match="takes no target_modules"):
        peftlab.PrefixConfig(target_modules=["q_proj"])
    model = tiny("llama")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(peftlab.ConfigError, match="supports attn_implementation"):
        peftlab.wrap(model, peftlab.PrefixConfig())


@pytest.mark.slow
def test_short_sst2_runs_lower_the_loss(minilm_dir, sst2_dir, tiny):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2)
    peftlab.wrap(
        model, peftlab.PrefixConfig(num_virtual_tokens=10, projection_dim=128, modules_to_save=["classifier"])
    )
    batches = sst2_batches(minilm_dir, "train", batch_size=32, limit=32 * 60, max_length=40)
    losses = train_steps(model, batches, steps=60, lr=1e-3)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.05


@pytest.mark.slow
def test_short_sst2_generation_run_lowers_the_loss(smollm2_dir, sst2_dir):
    """SmolLM2 with a prefix learns to answer SST-2 prompts with the label word (loss on the answer only)."""
    from peftlab.bench.tasks import get_task

    task = get_task("sst2-gen")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    rows = task.load(sst2_dir.parent, "train", limit=4 * 12 + 16, seed=0)
    held_out = task.collate(tok, rows[:16], max_length=48)
    batches = [task.collate(tok, rows[16 + 4 * i : 20 + 4 * i], max_length=48) for i in range(12)]
    torch.manual_seed(0)
    model = peftlab.wrap(
        AutoModelForCausalLM.from_pretrained(smollm2_dir),
        peftlab.PrefixConfig(num_virtual_tokens=8, projection_dim=64),
    )

    def loss():
        model.eval()
        with torch.no_grad():
            return model(**held_out).loss.item()

    first = loss()
    train_steps(model, batches, steps=12, lr=3e-3)
    last = loss()
    print(f"prefix SmolLM2 sst2-gen: held-out answer loss {first:.3f} -> {last:.3f}")
    assert last < first - 0.2
