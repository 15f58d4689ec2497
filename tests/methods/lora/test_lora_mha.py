"""LoRA on nn.MultiheadAttention (HF PEFT's lora.MultiheadAttention): in_proj_weight and out_proj.weight both take
a rank-r LoRA; the module's own forward runs on W + s·B A (checked against a plain module holding those weights),
the merge is exact, parameter counts and the export layout match HF PEFT's, and HF PEFT computes our logits wherever
it applies the LoRA once (it adds out_proj's delta twice: huggingface/peft#3774)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import peftlab
from helpers import perturb
from peftlab.util.errors import ConfigError

peft = pytest.importorskip("peft")


class Block(nn.Module):
    def __init__(self, kdim=None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True, kdim=kdim, vdim=kdim)
        self.mlp = nn.Linear(16, 16)

    def forward(self, x):
        return self.mlp(self.attn(x, x, x, need_weights=False)[0])


class Net(nn.Module):
    def __init__(self, kdim=None) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(kdim), Block(kdim)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def net(kdim=None) -> nn.Module:
    torch.manual_seed(0)
    return Net(kdim).eval()


X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))


def reference(model, out_factor: float = 1.0) -> nn.Module:
    """A plain Net holding W + s·B A in both projections (out_proj's delta times ``out_factor``)."""
    ref = net()
    with torch.no_grad():
        for mine, plain in zip(model.layers, ref.layers):
            a, s = mine.attn, mine.attn.slots["default"].scaling
            plain.attn.in_proj_weight += s * a.lora_B["default"] @ a.lora_A["default"]
            plain.attn.out_proj.weight += out_factor * s * a.lora_out_B["default"] @ a.lora_out_A["default"]
    return ref


def test_mha_lora_computes_the_adapted_module_and_merges_exactly():
    model = peftlab.wrap(net(), peftlab.LoraConfig(r=2, alpha=4, target_modules=["attn"]))
    with torch.no_grad():
        assert torch.equal(model(X), net()(X))  # B = 0: the base at init
        perturb(model, 0.2)
        ours = model(X)
        assert not torch.allclose(ours, net()(X), atol=1e-3)
        assert torch.allclose(ours, reference(model)(X), atol=1e-6)
        before = model.layers[0].attn.base_layer.out_proj.weight.clone()
        peftlab.merge(model)
        assert torch.allclose(model(X), ours, atol=1e-5)
        peftlab.unmerge(model)
        assert torch.allclose(model.layers[0].attn.base_layer.out_proj.weight, before, atol=1e-6)
    model.train()
    model(X).pow(2).mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}
    assert grads == {f"layers.{i}.attn.lora_{r}.default" for i in (0, 1) for r in ("A", "B", "out_A", "out_B")}


def test_mha_lora_matches_hf_peft(tmp_path):
    model = peftlab.wrap(net(), peftlab.LoraConfig(r=2, alpha=4, target_modules=["attn"]))
    perturb(model, 0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        native = peft.get_peft_model(net(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["attn"]))
    assert peftlab.count_parameters(model)[0] == native.get_nb_trainable_parameters()[0]
    with pytest.warns(UserWarning, match=r"applies the out_proj delta twice \(huggingface/peft#3774\).* at layers\.0\.attn, layers\.1\.attn"):
        peftlab.export_peft(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(net(), tmp_path).eval()
    with torch.no_grad():
        # HF PEFT 0.21 computes W_out + 2·s·B_o A_o (its bug); a peft with the fix computes ours. Either way the
        # in projection's LoRA is ours, and nothing else may come out
        got = theirs(X)
        assert torch.allclose(got, reference(model, out_factor=2.0)(X), atol=1e-5) or torch.allclose(
            got, model(X), atol=1e-5
        )
        theirs.save_pretrained(tmp_path / "peft")
        back = peftlab.import_peft(net(), tmp_path / "peft")
        assert torch.allclose(back(X), model(X), atol=1e-6)  # every factor round-trips
        for layer in model.layers:  # without an out_proj LoRA, peft computes our logits
            layer.attn.lora_out_B["default"].zero_()
        peftlab.export_peft(model, tmp_path / "in_only")
        theirs = peft.PeftModel.from_pretrained(net(), tmp_path / "in_only").eval()
        assert torch.allclose(theirs(X), model(X), atol=1e-5)


def test_mha_lora_refuses_what_it_cannot_do():
    with pytest.raises(ConfigError, match=r"kdim/vdim ≠ embed_dim"):
        peftlab.wrap(net(kdim=8), peftlab.LoraConfig(r=2, target_modules=["attn"]))
    with pytest.raises(ConfigError, match=r"MultiheadAttention\) takes init 'default' or 'gaussian' without DoRA"):
        peftlab.wrap(net(), peftlab.LoraConfig(r=2, target_modules=["attn"], use_dora=True))
