"""Adapter files (round trip, atomic writes, damaged files) and every bad-input error of the spine."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import peftlab
from helpers import slots


def randomize(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for m in slots(model, "LoraSlot"):
            m.lora_B.normal_(0, 0.05)


def ids():
    torch.manual_seed(3)
    return torch.randint(1, 100, (2, 9))


def saved_llama(tiny, tmp_path):
    model = tiny("llama")
    peftlab.wrap(model, peftlab.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize(model)
    peftlab.save_adapter(model, tmp_path / "ad")
    return model


def test_roundtrip_equal_outputs_and_config_content(tiny, tmp_path):
    model = saved_llama(tiny, tmp_path)
    out = model(input_ids=ids()).logits
    files = sorted(p.name for p in (tmp_path / "ad").iterdir())
    assert len(files) == 3 and files[0] == ".peftlab.lock" and files[2] == "adapter_config.json"  # no temp files
    assert files[1].startswith("adapter-") and files[1].endswith(".safetensors")
    assert not list(tmp_path.glob(".*lock"))  # the lock lives inside the folder it guards
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["method"] == "lora" and cfg["peftlab_version"] == peftlab.__version__
    assert cfg["config"]["r"] == 4 and len(cfg["targets"]) == 6
    assert cfg["shapes"]["model.layers.0.mlp.down_proj"] == [32, 64]
    fresh = peftlab.load_adapter(tiny("llama"), tmp_path / "ad")
    torch.testing.assert_close(fresh(input_ids=ids()).logits, out, rtol=0, atol=0)
    assert not any(p.requires_grad for p in fresh.parameters())
    again = peftlab.load_adapter(tiny("llama"), tmp_path / "ad", trainable=True)
    assert sum(p.requires_grad for p in again.parameters()) == 12


def test_adapter_modules_follow_the_model_mode(tiny):
    model = tiny("llama")  # in eval mode
    peftlab.wrap(model, peftlab.LoraConfig(r=2, dropout=0.5))
    assert not any(m.training for m in model.modules())
    x = ids()
    randomize(model)
    torch.testing.assert_close(model(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=0)


def test_modules_to_save_roundtrip(minilm_dir, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=3).eval()
    peftlab.wrap(model, peftlab.LoraConfig(r=2, modules_to_save=["classifier"]))
    randomize(model)
    x = torch.randint(1, 1000, (2, 12))
    out = model(input_ids=x).logits
    peftlab.save_adapter(model, tmp_path)
    torch.manual_seed(123)  # a different random classifier in the fresh base
    fresh = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=3).eval()
    peftlab.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(input_ids=x).logits, out, rtol=0, atol=0)


def test_save_merged_is_a_plain_checkpoint(tiny, tmp_path):
    from transformers import LlamaForCausalLM

    model = saved_llama(tiny, tmp_path)
    out = model(input_ids=ids()).logits
    peftlab.save_merged(model, tmp_path / "merged")
    assert not peftlab.is_merged(model)  # the wrapped model is left as it was
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(plain(input_ids=ids()).logits, out, rtol=1e-5, atol=1e-5)


def test_shape_mismatch_names_module_and_shapes(tiny, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    saved_llama(tiny, tmp_path)
    other = LlamaForCausalLM(
        LlamaConfig(
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            hidden_size=32,
            intermediate_size=48,
            vocab_size=100,
        )
    )
    with pytest.raises(peftlab.AdapterFileError, match=r"down_proj.*\[32, 64\].*\[32, 48\]"):
        peftlab.load_adapter(other, tmp_path / "ad")
    assert not hasattr(other, "peftlab_adapters")  # nothing was half-applied


def test_missing_corrupt_and_truncated_files(tiny, tmp_path):
    saved_llama(tiny, tmp_path)
    with pytest.raises(peftlab.AdapterFileError, match="does not exist"):
        peftlab.load_adapter(tiny("llama"), tmp_path / "nowhere")
    (weights,) = (tmp_path / "ad").glob("adapter-*.safetensors")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(peftlab.AdapterFileError, match="corrupt or truncated"):
        peftlab.load_adapter(tiny("llama"), tmp_path / "ad")
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(peftlab.AdapterFileError, match="corrupt or truncated"):
        peftlab.load_adapter(tiny("llama"), tmp_path / "ad")
    weights.unlink()
    with pytest.raises(peftlab.AdapterFileError, match="does not exist"):
        peftlab.load_adapter(tiny("llama"), tmp_path / "ad")
    (tmp_path / "ad" / "adapter_config.json").write_text("{not json")
    with pytest.raises(peftlab.AdapterFileError, match="not valid JSON"):
        peftlab.load_adapter(tiny("llama"), tmp_path / "ad")


def test_config_unknown_keys_and_unknown_method(tiny, tmp_path):
    saved_llama(tiny, tmp_path)
    path = tmp_path / "ad" / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["config"]["rank"] = 3
    path.write_text(json.dumps(cfg))
    with pytest.raises(
        peftlab.ConfigError, match=r"unknown keys for method 'lora': rank; valid keys: .*alpha"
    ):
        peftlab.load_adapter(tiny("llama"), tmp_path / "ad")
    del cfg["config"]["rank"]
    cfg["config"]["method"] = "nope"
    path.write_text(json.dumps(cfg))
    with pytest.raises(peftlab.ConfigError, match=r"unknown method 'nope'; valid methods: .*lora"):
        peftlab.load_adapter(tiny("llama"), tmp_path / "ad")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "rank r must be an integer ≥ 1, got 0"),
        ({"r": -2}, "rank r must be an integer ≥ 1"),
        ({"alpha": 0}, r"alpha must be a finite number in \(0, inf\)"),
        ({"dropout": 1.0}, r"dropout must be a finite number in \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout must be a finite number in \[0, 1\)"),
        ({"bias": "some"}, "bias must be one of"),
        ({"target_modules": []}, "empty list"),
    ],
)
def test_invalid_lora_config(kwargs, message):
    with pytest.raises(peftlab.ConfigError, match=message):
        peftlab.LoraConfig(**kwargs)


def test_unknown_targets_list_candidates(tiny):
    with pytest.raises(
        peftlab.TargetError, match=r"\['qkv'\] not found.*candidate linear layers: q_proj, k_proj"
    ):
        peftlab.wrap(tiny("llama"), peftlab.LoraConfig(target_modules=["qkv"]))
    with pytest.raises(peftlab.TargetError, match="matched no module"):
        peftlab.wrap(tiny("llama"), peftlab.LoraConfig(target_modules=r".*nothing.*"))
    with pytest.raises(peftlab.TargetError, match="cannot adapt"):
        peftlab.wrap(tiny("llama"), peftlab.LoraConfig(target_modules=["input_layernorm"]))


def test_regex_and_all_linear_targets(tiny):
    model = tiny("bert")
    peftlab.wrap(model, peftlab.LoraConfig(target_modules=r".*layer\.1\.attention\.self\.(query|key)"))
    assert peftlab.core.state.get_state(model).targets == [
        "bert.encoder.layer.1.attention.self.query",
        "bert.encoder.layer.1.attention.self.key",
    ]
    model = tiny("bert")
    peftlab.wrap(model, peftlab.LoraConfig(target_modules="all-linear"))
    targets = peftlab.core.state.get_state(model).targets
    assert "classifier" not in targets and "bert.pooler.dense" in targets and len(targets) == 2 * 6 + 1


def test_wrap_twice_same_name_and_not_wrapped_errors(tiny):
    model = tiny("llama")
    peftlab.wrap(model, peftlab.LoraConfig())
    with pytest.raises(peftlab.WrapError, match="already has an adapter named 'default'"):
        peftlab.wrap(model, peftlab.LoraConfig())
    with pytest.raises(peftlab.WrapError, match="not wrapped"):
        peftlab.merge(tiny("llama"))
    with pytest.raises(peftlab.ConfigError, match="needs a peftlab config"):
        peftlab.wrap(tiny("llama"), {"r": 8})


def test_unknown_model_name_says_what_is_valid(monkeypatch, tmp_path):
    """A name that is neither packaged, nor a folder, nor on the (offline) hub: one clear ConfigError."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(peftlab.ConfigError, match=r"not a packaged short name \(minilm-l6, smollm2-135m\)"):
        peftlab.load_model("does-not-exist", kind="seq-cls")
