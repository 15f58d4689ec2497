"""LoRA (and DoRA) on nn.Conv1d/2d/3d: equal to HF PEFT's lora.Conv1d/2d/3d in outputs, parameter counts and
export (both ways); a fresh adapter computes the base; the merge is exact (ungrouped); training lowers the loss;
what cannot work is refused with the reason."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as tf
from arch_zoo import build, inputs, logits
from torch import nn

import peftlab
from helpers import perturb
from peftlab.util.errors import ConfigError, MergeError

peft = pytest.importorskip("peft")


class Block(nn.Module):
    """Convolutions of every rank with stride, padding, dilation, a reflect padding mode and groups."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(3, 8, (3, 2), padding=1, dilation=(2, 1))
        self.c3 = nn.Conv3d(3, 4, 2, padding=1, padding_mode="reflect", bias=False)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=4)

    def forward(self, a, b, c):
        return torch.cat([self.c1(a).flatten(1), self.dw(self.c2(b)).flatten(1), self.c3(c).flatten(1)], 1)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block()])

    def forward(self, a, b, c):
        return self.layers[0](a, b, c)


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return ConvNet().eval()


CONV_X = (torch.randn(2, 3, 9), torch.randn(2, 3, 6, 5), torch.randn(2, 3, 4, 4, 4))


def convnext() -> nn.Module:
    """A tiny ConvNeXt: patch-embedding and downsampling convolutions, depthwise (groups = channels) 7×7 convs."""
    torch.manual_seed(0)
    config = tf.ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    return tf.ConvNextForImageClassification(config).eval()


MODELS = {"ViT": lambda: build("ViT"), "Wav2Vec2": lambda: build("Wav2Vec2"), "ConvNeXt": convnext}


def _x(arch):
    return inputs("ViT") if arch == "ConvNeXt" else inputs(arch)


def _out(model, arch):
    with torch.no_grad():
        return logits(model(**_x(arch)))


@pytest.mark.parametrize(
    "arch, targets, r, dora",
    [
        ("ViT", ["projection"], 2, False),  # the patch embedding
        ("Wav2Vec2", ["conv"], 2, False),  # the feature encoder's Conv1d stack and the grouped positional conv
        ("ConvNeXt", ["patch_embeddings", "dwconv", "downsampling_layer.1"], 16, False),  # depthwise: r % groups = 0
        ("ConvNeXt", ["patch_embeddings", "downsampling_layer.1"], 2, True),
    ],
)
def test_conv_lora_equals_hf_peft(tmp_path, arch, targets, r, dora):
    cfg = dict(r=r, target_modules=targets, use_dora=dora)
    model = peftlab.wrap(MODELS[arch](), peftlab.LoraConfig(alpha=2 * r, **cfg))
    base = _out(MODELS[arch](), arch)
    assert _out(model, arch).allclose(base, atol=1e-6)  # B = 0: the base at init
    perturb(model, 0.2)
    ours = _out(model, arch)
    assert not ours.allclose(base, atol=1e-3)
    peftlab.export_peft(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(MODELS[arch](), tmp_path).eval()
        native = peft.get_peft_model(MODELS[arch](), peft.LoraConfig(lora_alpha=2 * r, **cfg))
    assert torch.allclose(_out(theirs, arch), ours, atol=1e-5)
    assert peftlab.count_parameters(model)[0] == native.get_nb_trainable_parameters()[0]
    theirs.save_pretrained(tmp_path / "peft")
    back = peftlab.import_peft(MODELS[arch](), tmp_path / "peft")
    assert torch.allclose(_out(back, arch), ours, atol=1e-5)


@pytest.mark.parametrize("dora", [False, True])
def test_conv_lora_matches_hf_peft_on_every_rank_and_its_merge_is_exact(tmp_path, dora):
    targets = ["c1", "c2", "c3"]  # stride, dilation, reflect padding: not exportable (below), but exact here
    model = peftlab.wrap(conv_net(), peftlab.LoraConfig(r=4, alpha=8, target_modules=targets, use_dora=dora))
    perturb(model, 0.2)
    with torch.no_grad():
        ours = model(*CONV_X)
        weights = {n: getattr(model.layers[0], n).base_layer.weight.clone() for n in targets}
        peftlab.merge(model)
        assert torch.allclose(model(*CONV_X), ours, atol=1e-5)
        peftlab.unmerge(model)
        for name, weight in weights.items():
            assert torch.allclose(getattr(model.layers[0], name).base_layer.weight, weight, atol=1e-6)
    # HF PEFT's lora_A takes no dilation and pads with zeros: c1 (stride, padding) and the grouped dw export
    exported = ["c1"] if dora else ["c1", "dw"]
    single = peftlab.wrap(conv_net(), peftlab.LoraConfig(r=4, alpha=8, target_modules=exported, use_dora=dora))
    perturb(single, 0.2)
    peftlab.export_peft(single, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(conv_net(), tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(theirs(*CONV_X), single(*CONV_X), atol=1e-5)


@pytest.mark.parametrize("dora", [False, True])
def test_conv_lora_trains(dora):
    config = peftlab.LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["c1", "c2", "c3"], use_dora=dora)
    teacher = peftlab.wrap(conv_net(), config.replace(dropout=0.0))
    perturb(teacher, 0.3)  # a target the adapter can reach
    with torch.no_grad():
        target = teacher(*CONV_X)
    model = peftlab.wrap(conv_net(), config).train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(10):
        loss = (model(*CONV_X) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert model.layers[0].c2.base_layer.weight.grad is None  # the base stays frozen


def test_conv_lora_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(ConfigError, match=r"dwconv .*groups=8.* rank divisible by its groups.* got r=4"):
        peftlab.wrap(convnext(), peftlab.LoraConfig(r=4, target_modules=["dwconv"]))
    with pytest.raises(ConfigError, match=r"init 'pissa' is not available on the convolution"):
        peftlab.wrap(convnext(), peftlab.LoraConfig(r=4, target_modules=["patch_embeddings"], init="pissa"))
    with pytest.raises(ConfigError, match=r"DoRA on .*dw .*groups=4"):
        peftlab.wrap(conv_net(), peftlab.LoraConfig(r=4, target_modules=["dw"], use_dora=True))
    grouped = peftlab.wrap(conv_net(), peftlab.LoraConfig(r=4, target_modules=["c1", "dw"]))
    perturb(grouped, 0.2)
    before = grouped.layers[0].c1.base_layer.weight.clone()
    with pytest.raises(MergeError, match=r"groups=4 cannot be merged"):
        peftlab.merge(grouped)
    peftlab.wrap(grouped, peftlab.LoraConfig(r=4, target_modules=["c1", "dw"], adapter_name="b"))
    with pytest.raises(ConfigError, match=r"ConvLoraSlot on layers\.0\.c1 is not a LoRA that combine can rebuild"):
        peftlab.combine(grouped, ["default", "b"], [0.5, 0.5], how="svd", new_name="c")
    assert torch.equal(grouped.layers[0].c1.base_layer.weight, before)  # all or nothing
    dilated = peftlab.wrap(conv_net(), peftlab.LoraConfig(r=4, target_modules=["c2"]))
    with pytest.raises(ConfigError, match=r"HF PEFT can't load the LoRA on layers\.0\.c2 .*dilation=\(2, 1\)"):
        peftlab.export_peft(dilated, tmp_path)
    assert not any(tmp_path.iterdir())
    wav = peftlab.wrap(build("Wav2Vec2"), peftlab.LoraConfig(r=2, target_modules=["pos_conv_embed.conv"]))
    perturb(wav, 0.2)
    with pytest.raises(MergeError, match=r"parametrization \(e\.g\. weight_norm\)"):
        peftlab.merge(wav)


def test_conv_lora_in_a_mixed_batch_equals_each_adapter_alone():
    model = convnext()
    peftlab.wrap(model, peftlab.LoraConfig(r=2, target_modules=["patch_embeddings", "downsampling_layer.1"], adapter_name="a"))
    peftlab.wrap(model, peftlab.LoraConfig(r=2, target_modules=["patch_embeddings"], adapter_name="b", use_dora=True))
    perturb(model, 0.2)
    x = inputs("ViT")["pixel_values"]
    with torch.no_grad():
        mixed = model(pixel_values=x, adapter_names=["a", "b"]).logits
        for row, name in enumerate(["a", "b"]):
            peftlab.set_active_adapters(model, [name])
            assert torch.allclose(mixed[row], model(pixel_values=x).logits[row], atol=1e-5)
