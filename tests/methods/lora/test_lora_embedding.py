"""LoRA on nn.Embedding: equal to HF PEFT's lora.Embedding in outputs, parameter counts and export (both ways);
the merge is exact, and a merge into a weight the output head shares (tied) warns."""

from __future__ import annotations

import warnings

import pytest
import torch
from arch_zoo import build, inputs, logits

import peftlab
from helpers import perturb
from peftlab.util.errors import ConfigError

peft = pytest.importorskip("peft")


def _out(model, arch):
    with torch.no_grad():
        return logits(model(**inputs(arch)))


@pytest.mark.parametrize(
    "arch, targets",
    [
        ("Llama", ["embed_tokens", "q_proj"]),  # untied
        ("Gemma-3", ["embed_tokens"]),  # scaled embedding (embed_scale), tied head
        ("GPT-2", ["wte", "c_attn"]),  # tied head, Conv1D beside it
    ],
)
def test_embedding_lora_equals_hf_peft(tmp_path, arch, targets):
    model = peftlab.wrap(build(arch), peftlab.LoraConfig(r=2, alpha=4, target_modules=targets))
    assert _out(model, arch).allclose(_out(build(arch), arch), atol=1e-6)  # A = 0: the base at init
    perturb(model, 0.2)
    ours = _out(model, arch)
    peftlab.export_peft(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(build(arch), tmp_path).eval()
        native = peft.get_peft_model(build(arch), peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    assert torch.allclose(_out(theirs, arch), ours, atol=1e-5)
    assert peftlab.count_parameters(model)[0] == native.get_nb_trainable_parameters()[0]
    theirs.save_pretrained(tmp_path / "peft")
    back = peftlab.import_peft(build(arch), tmp_path / "peft")
    assert torch.allclose(_out(back, arch), ours, atol=1e-5)


def test_embedding_merge_is_exact_when_untied():
    model = peftlab.wrap(build("Llama"), peftlab.LoraConfig(r=2, target_modules=["embed_tokens"]))
    perturb(model, 0.2)
    before = model.model.embed_tokens.base_layer.weight.detach().clone()
    ours = _out(model, "Llama")
    peftlab.merge(model)
    assert torch.allclose(_out(model, "Llama"), ours, atol=1e-5)
    peftlab.unmerge(model)
    assert torch.allclose(model.model.embed_tokens.base_layer.weight, before, atol=1e-6)


def test_merging_into_a_tied_embedding_warns():
    model = peftlab.wrap(build("GPT-2"), peftlab.LoraConfig(r=2, target_modules=["wte"]))
    perturb(model, 0.2)
    with pytest.warns(UserWarning, match=r"also changes lm_head\.weight, which shares it \(tied weights\)"):
        peftlab.merge(model)


def test_embedding_lora_trains_and_refuses_what_it_cannot_do():
    model = peftlab.wrap(build("Llama"), peftlab.LoraConfig(r=2, target_modules=["embed_tokens"])).train()
    x = inputs("Llama")
    model(**x, labels=x["input_ids"]).loss.backward()
    grad = model.model.embed_tokens.lora_A["default"].grad
    unseen = torch.ones(grad.shape[1], dtype=torch.bool)
    unseen[x["input_ids"].flatten()] = False
    assert grad[:, ~unseen].abs().sum() > 0 and not grad[:, unseen].any()  # only the seen tokens' columns of A
    with pytest.raises(ConfigError, match="embedding .* default init"):
        peftlab.wrap(build("Llama"), peftlab.LoraConfig(r=2, target_modules=["embed_tokens"], use_dora=True))
