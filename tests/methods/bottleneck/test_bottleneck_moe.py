"""Bottleneck adapters around a whole mixture-of-experts block (experts, router and shared expert together).

Reference: the base model with a forward hook on the MoE block that applies the same adapter by hand.
"""

from __future__ import annotations

import tempfile

import pytest
import torch
from arch_zoo import build, gemma4_moe, inputs, labels, logits

import peftlab
from helpers import perturb


def _out(model, arch):
    with torch.no_grad():
        return logits(model(**inputs(arch)))


@pytest.mark.parametrize(
    "arch, block", [("Qwen3-MoE", "mlp"), ("Llama-4", "feed_forward")]  # Llama-4: shared expert, tuple output
)
@pytest.mark.parametrize("style", ["pfeiffer", "parallel"])
def test_adapter_wraps_the_whole_moe_block(arch, block, style):
    model = peftlab.wrap(build(arch), peftlab.AdapterConfig(style=style, bottleneck_size=4, scale=0.5))
    targets = [t for t in model.peftlab_adapters["default"].targets if "attn" not in t]
    assert targets == [f"model.layers.{i}.{block}" for i in (0, 1)]
    perturb(model, 0.3)
    with torch.no_grad():  # parallel also adapts attention: switch those off, the reference has the MoE blocks only
        for path in model.peftlab_adapters["default"].targets:
            if path not in targets:
                model.get_submodule(path).adapter_up["default"].weight.zero_()
                model.get_submodule(path).adapter_up["default"].bias.zero_()
    reference = build(arch)
    for path in targets:
        wrapper = model.get_submodule(path)
        down, up = wrapper.adapter_down["default"], wrapper.adapter_up["default"]
        a = lambda h, down=down, up=up: up(torch.relu(down(h)))  # noqa: E731

        def hook(module, args, out, a=a):
            hidden = out[0] if isinstance(out, tuple) else out
            extra = 0.5 * a(args[0]) if style == "parallel" else a(hidden)  # parallel reads the block input
            new = hidden + extra.reshape(hidden.shape)
            return (new, *out[1:]) if isinstance(out, tuple) else new

        reference.get_submodule(path).register_forward_hook(hook)
    assert torch.allclose(_out(model, arch), _out(reference, arch), atol=1e-5)
    assert not torch.allclose(_out(model, arch), _out(build(arch), arch), atol=1e-3)


def test_moe_block_adapter_trains_and_leaves_the_experts_targetable():
    """Houlsby around the MoE block trains; a LoRA on the experts inside it still finds them by their plain paths,
    and each adapter saves and loads on its own."""
    arch = "Qwen3-MoE"
    model = peftlab.wrap(build(arch), peftlab.AdapterConfig(style="houlsby", bottleneck_size=4)).train()
    batch = dict(inputs(arch, batch=4), labels=labels(arch, batch=4))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    model.eval()
    peftlab.wrap(model, peftlab.LoraConfig(target_parameters=["experts.gate_up_proj"], adapter_name="lora"))
    assert model.peftlab_adapters["lora"].info["target_parameters"] == [
        f"model.layers.{i}.mlp.experts.gate_up_proj" for i in (0, 1)
    ]
    perturb(model, 0.3, adapter_name="lora")
    peftlab.set_active_adapters(model, ["lora"])
    ours = _out(model, arch)
    with tempfile.TemporaryDirectory() as tmp:
        peftlab.save_adapter(model, tmp, adapter_name="lora")
        fresh = peftlab.load_adapter(build(arch), tmp)
        assert torch.allclose(_out(fresh, arch), ours, atol=1e-6)


def test_inline_experts_refusal_names_the_experts_and_the_override():
    model = gemma4_moe()
    with pytest.raises(peftlab.TargetError, match=r"hold their experts directly \(model\.layers\.0\.experts\).*ffn_out="):
        peftlab.wrap(model, peftlab.AdapterConfig(style="pfeiffer", bottleneck_size=4))
    assert not peftlab.list_adapters(model)


@pytest.mark.parametrize("style", ["pfeiffer", "parallel"])
def test_adapter_on_the_norm_of_the_combined_feed_forward(style):
    """ffn_out names post_feedforward_layernorm (its output is the whole feed-forward sublayer's, before the
    residual add; its width comes from its scale), ffn_in the pre-feed-forward norm, whose input (the residual
    stream) both branches read: equal to hooks applying the adapter by hand."""
    config = peftlab.AdapterConfig(style=style, bottleneck_size=4, scale=0.5,
                                   ffn_out=r".*layers\.(\d+)\.post_feedforward_layernorm",
                                   ffn_in=r".*layers\.(\d+)\.pre_feedforward_layernorm")  # fmt: skip
    model = peftlab.wrap(gemma4_moe(), config)
    x = inputs("Gemma-4")
    with torch.no_grad():
        assert torch.allclose(model(**x).logits, gemma4_moe()(**x).logits, atol=1e-6)  # identity at init
    perturb(model, 0.3)
    targets = [t for t in model.peftlab_adapters["default"].targets if "post_feedforward_layernorm" in t]
    assert targets == [f"model.layers.{i}.post_feedforward_layernorm" for i in (0, 1)]
    with torch.no_grad():  # the reference has the feed-forward adapters only
        for path in model.peftlab_adapters["default"].targets:
            if path not in targets:
                model.get_submodule(path).adapter_up["default"].weight.zero_()
                model.get_submodule(path).adapter_up["default"].bias.zero_()
    reference = gemma4_moe()
    for i, path in enumerate(targets):
        wrapper = model.get_submodule(path)
        down, up = wrapper.adapter_down["default"], wrapper.adapter_up["default"]
        a = lambda h, down=down, up=up: up(torch.relu(down(h)))  # noqa: E731
        captured = {}
        reference.get_submodule(f"model.layers.{i}.pre_feedforward_layernorm").register_forward_pre_hook(
            lambda mod, args, c=captured: c.update(u=args[0])
        )

        def hook(module, args, out, a=a, c=captured):
            return out + (0.5 * a(c["u"]) if style == "parallel" else a(out))

        reference.get_submodule(path).register_forward_hook(hook)
    with torch.no_grad():
        ours, ref = model(**x).logits, reference(**x).logits
        assert torch.allclose(ours, ref, atol=1e-5)
        assert not torch.allclose(ours, gemma4_moe()(**x).logits, atol=1e-3)
