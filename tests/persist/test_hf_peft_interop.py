"""HF PEFT interop both ways, and trainable-parameter counts equal to HF PEFT's for the same config."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import peftlab
from helpers import slots

peft = pytest.importorskip("peft")


def randomize(model, scale=0.05):
    torch.manual_seed(1)
    with torch.no_grad():
        for m in slots(model, "LoraSlot"):
            m.lora_B.normal_(0, scale)
            m.lora_A.normal_(0, scale)


def peft_count(model, **kwargs):
    trainable, _ = peft.get_peft_model(model, peft.LoraConfig(**kwargs)).get_nb_trainable_parameters()
    return trainable


@pytest.mark.parametrize(
    "family, ours, theirs",
    [
        ("llama", {"r": 8}, {"r": 8, "target_modules": ["q_proj", "v_proj"]}),
        ("llama", {"r": 4, "target_modules": "all-linear"}, {"r": 4, "target_modules": "all-linear"}),
        (
            "llama",
            {"r": 4, "bias": "all", "target_modules": ["q_proj"]},
            {"r": 4, "bias": "all", "target_modules": ["q_proj"]},
        ),
        ("gpt2", {"r": 4}, {"r": 4, "target_modules": ["c_attn"], "fan_in_fan_out": True}),
        (
            "opt",
            {"r": 2, "rank_pattern": {"q_proj": 6}},
            {"r": 2, "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"q_proj": 6}},
        ),
        (
            "bert",
            {"r": 8, "bias": "lora_only", "modules_to_save": ["classifier"]},
            {"r": 8, "bias": "lora_only", "target_modules": ["query", "value"], "task_type": "SEQ_CLS"},
        ),
    ],
)
def test_trainable_counts_equal_hf_peft(tiny, family, ours, theirs):
    model = peftlab.wrap(tiny(family), peftlab.LoraConfig(**ours))
    assert peftlab.count_parameters(model)[0] == peft_count(tiny(family), **theirs)


def test_minilm_count_equals_hf_peft(minilm_dir):
    def load():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2)

    ours = peftlab.wrap(
        load(), peftlab.LoraConfig(r=8, alpha=16, dropout=0.05, modules_to_save=["classifier"])
    )
    assert peftlab.count_parameters(ours)[0] == peft_count(
        load(), r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["query", "value"], task_type="SEQ_CLS"
    )


def max_diff(a, b):
    return (a - b).abs().max().item()


def test_export_loads_in_peft_with_equal_outputs_seq_cls(minilm_dir, tmp_path):
    def load():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2).eval()

    model = peftlab.wrap(
        load(), peftlab.LoraConfig(r=8, alpha=16, use_rslora=True, modules_to_save=["classifier"])
    )
    randomize(model)
    with torch.no_grad():
        model.classifier.weight.normal_(0, 0.2)
    x = torch.randint(1, 1000, (3, 14))
    mask = torch.ones_like(x)
    mask[0, 10:] = 0
    ours = model(input_ids=x, attention_mask=mask).logits
    peftlab.export_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(load(), str(tmp_path)).eval()
    diff = max_diff(theirs(input_ids=x, attention_mask=mask).logits, ours)
    print(f"export max abs diff (MiniLM seq-cls): {diff:.3g}")
    assert diff <= 1e-5


def test_export_and_import_causal_lm_all_linear(smollm2_dir, tmp_path):
    def load():
        return AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()

    model = peftlab.wrap(
        load(), peftlab.LoraConfig(r=4, alpha=8, target_modules="all-linear", rank_pattern={"down_proj": 2})
    )
    randomize(model, 0.02)
    x = torch.randint(1, 1000, (2, 10))
    ours = model(input_ids=x).logits
    peftlab.export_peft(model, tmp_path / "exp")
    theirs_model = peft.PeftModel.from_pretrained(load(), str(tmp_path / "exp")).eval()
    theirs = theirs_model(input_ids=x).logits
    diff = max_diff(theirs, ours)
    print(f"export max abs diff (SmolLM2 all-linear): {diff:.3g}")
    assert diff <= 1e-5
    # and back: a folder saved by peft itself loads into peftlab with peft's outputs
    theirs_model.save_pretrained(str(tmp_path / "saved_by_peft"))
    back = peftlab.import_peft(load(), tmp_path / "saved_by_peft")
    diff_back = max_diff(back(input_ids=x).logits, theirs)
    print(f"import max abs diff (SmolLM2 all-linear): {diff_back:.3g}")
    assert diff_back <= 1e-5


def test_import_adapter_trained_by_peft_gpt2_conv1d(tiny, tmp_path):
    base = tiny("gpt2")
    pm = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    )
    torch.manual_seed(2)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    pm.eval()
    x = torch.randint(1, 100, (2, 7))
    want = pm(input_ids=x).logits
    pm.save_pretrained(str(tmp_path))
    ours = peftlab.import_peft(tiny("gpt2"), tmp_path)
    assert max_diff(ours(input_ids=x).logits, want) <= 1e-5
    assert len(peftlab.core.state.get_state(ours).targets) == 6  # c_attn + attn.c_proj + mlp.c_proj, x2 layers


def test_import_peft_errors(tmp_path, tiny):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    with pytest.raises(peftlab.ConfigError, match=r"'IA3' is not supported; supported: .*LORA"):
        peftlab.import_peft(tiny("llama"), tmp_path)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_export_with_trained_biases(tiny, tmp_path, bias):
    model = peftlab.wrap(tiny("bert"), peftlab.LoraConfig(r=4, bias=bias, target_modules=["query", "value"]))
    randomize(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and n.endswith("bias"):
                p.add_(0.3)
    x = torch.randint(1, 100, (2, 9))
    ours = model(input_ids=x).logits
    peftlab.export_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny("bert"), str(tmp_path)).eval()
    assert max_diff(theirs(input_ids=x).logits, ours) <= 1e-5
    back = peftlab.import_peft(tiny("bert"), tmp_path)
    assert max_diff(back(input_ids=x).logits, ours) <= 1e-5
