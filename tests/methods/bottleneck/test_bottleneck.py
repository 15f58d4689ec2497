"""Bottleneck adapters: identity at init, gradients, save/load, merge refusal, counts, training."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import peftlab
from helpers import slots, sst2_batches, train_steps


def perturb(model, scale=0.05):
    torch.manual_seed(5)
    with torch.no_grad():
        for slot in slots(model, "BottleneckSlot"):
            slot.tensor("adapter_up").weight.normal_(0, scale)


def ids(vocab=100):
    torch.manual_seed(3)
    return torch.randint(1, vocab, (2, 9))


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2", "opt"])
@pytest.mark.parametrize("style", ["houlsby", "pfeiffer", "parallel"])
@torch.no_grad()
def test_identity_at_init_then_change_disable_unwrap(tiny, family, style):
    model = tiny(family)
    x = ids()
    base = model(input_ids=x)[0].clone()
    peftlab.wrap(model, peftlab.AdapterConfig(style=style, bottleneck_size=4, activation="gelu"))
    model.eval()
    torch.testing.assert_close(model(input_ids=x)[0], base, rtol=0, atol=0)
    n_adapters = len(slots(model, "BottleneckSlot"))
    assert n_adapters == (2 if style == "pfeiffer" else 4)
    perturb(model)
    assert (model(input_ids=x)[0] - base).abs().max() > 1e-4
    with peftlab.disable_adapters(model):
        torch.testing.assert_close(model(input_ids=x)[0], base, rtol=0, atol=0)
    peftlab.unwrap(model)
    torch.testing.assert_close(model(input_ids=x)[0], base, rtol=0, atol=0)


def test_parameter_count_formula_and_grads_only_on_adapters(minilm_dir):
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2)
    peftlab.wrap(model, peftlab.AdapterConfig(style="houlsby", reduction_factor=16))
    d, m = 384, 24
    trainable, _ = peftlab.count_parameters(model)
    assert trainable == 6 * 2 * (2 * d * m + d + m)
    pf = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2)
    peftlab.wrap(
        pf,
        peftlab.AdapterConfig(style="pfeiffer", bottleneck_size={0: 8}, reduction_factor=16, layers=[0, 1]),
    )
    assert peftlab.count_parameters(pf)[0] == (2 * d * 8 + d + 8) + (2 * d * m + d + m)
    perturb(model)
    model.train()
    loss = model(input_ids=torch.randint(1, 1000, (2, 8)), labels=torch.tensor([0, 1])).loss
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == ("adapter_" in n), n
        if p.grad is not None:
            assert p.grad.abs().sum() > 0, n


def test_train_layernorm_is_trainable_and_saved(tiny, tmp_path):
    model = tiny("bert")
    peftlab.wrap(model, peftlab.AdapterConfig(style="houlsby", bottleneck_size=4, train_layernorm=True))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum("LayerNorm" in n for n in trainable) == 2 * 2 * 2  # 2 layers x 2 norms x (weight, bias)
    perturb(model)
    with torch.no_grad():
        model.bert.encoder.layer[0].output.LayerNorm.weight.add_(0.5)
    x = ids()
    out = model(input_ids=x).logits
    peftlab.save_adapter(model, tmp_path)
    fresh = peftlab.load_adapter(tiny("bert"), tmp_path)
    torch.testing.assert_close(fresh(input_ids=x).logits, out, rtol=0, atol=0)


def test_merge_is_refused_with_reason(tiny):
    model = peftlab.wrap(tiny("llama"), peftlab.AdapterConfig(style="pfeiffer", bottleneck_size=4))
    with pytest.raises(peftlab.MergeError, match="cannot be merged.*not linear"):
        peftlab.merge(model)


def test_unknown_architecture_error_says_how_to_name_modules(tiny):
    plain = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    with pytest.raises(peftlab.TargetError, match=r"found no transformer blocks.*attn_out=.*ffn_out="):
        peftlab.wrap(plain, peftlab.AdapterConfig())
    model = tiny("t5")  # structure finds T5's blocks; explicit regexes still override them
    peftlab.wrap(
        model,
        peftlab.AdapterConfig(
            style="houlsby",
            bottleneck_size=4,
            attn_out=r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.o",
            ffn_out=r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo",
        ),
    )
    assert len(peftlab.core.state.get_state(model).targets) == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"style": "serial"}, "style must be one of"),
        ({"activation": "elu"}, "activation must be one of"),
        ({"reduction_factor": 0}, "reduction_factor must be a positive integer"),
        ({"bottleneck_size": {3: -1}}, "bottleneck_size must be a positive integer"),
        ({"target_modules": ["dense"]}, "don't use target_modules"),
    ],
)
def test_invalid_config(kwargs, message):
    with pytest.raises(peftlab.ConfigError, match=message):
        peftlab.AdapterConfig(**kwargs)


@torch.no_grad()
def test_smollm2_identity(smollm2_dir):
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    x = torch.randint(1, 1000, (1, 8))
    base = model(input_ids=x).logits.clone()
    peftlab.wrap(model, peftlab.AdapterConfig(style="houlsby", reduction_factor=16))
    model.eval()
    torch.testing.assert_close(model(input_ids=x).logits, base, rtol=0, atol=0)


def test_adapter_counts_match_adapterhub_formula_or_package(minilm_dir):
    adapters = pytest.importorskip(
        "adapters", reason="AdapterHub `adapters` does not install with transformers 5.x"
    )
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2)
    adapters.init(model)
    model.add_adapter("p", config="seq_bn")
    model.train_adapter("p")
    theirs = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "adapters" in n)
    ours = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2)
    peftlab.wrap(ours, peftlab.AdapterConfig(style="pfeiffer", reduction_factor=16))
    assert peftlab.count_parameters(ours)[0] == theirs


@pytest.mark.slow
@pytest.mark.parametrize("style", ["houlsby", "parallel"])
def test_short_sst2_run_lowers_loss(minilm_dir, sst2_dir, style):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2)
    peftlab.wrap(
        model, peftlab.AdapterConfig(style=style, reduction_factor=16, modules_to_save=["classifier"])
    )
    batches = sst2_batches(minilm_dir, "train", batch_size=32, limit=32 * 60, max_length=40)
    losses = train_steps(model, batches, steps=60, lr=2e-3)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"{style}: loss {first:.3f} -> {last:.3f}")
    assert last < first - 0.1
