"""Module paths through adapter wrappers: ``replace_module`` swaps the wrapper's own ``base_layer`` (dequantizing
a wrapped layer), and a child of the wrapped module (the router inside a bottleneck-wrapped MoE block)."""

from __future__ import annotations

import torch
from arch_zoo import build
from torch import nn

import peftlab
from peftlab.core.state import get_submodule_parent, replace_module, submodule


def test_replace_the_wrappers_own_base_layer():
    torch.manual_seed(0)
    model = peftlab.wrap(nn.Sequential(nn.Linear(4, 4)), peftlab.LoraConfig(r=2, target_modules=["0"]))
    wrapper, new = model[0], nn.Linear(4, 4)
    assert get_submodule_parent(model, "0.base_layer") == (wrapper, "base_layer")
    replace_module(model, "0.base_layer", new)
    assert model[0] is wrapper and wrapper.base_layer is new and not hasattr(new, "base_layer")


def test_replace_a_child_of_the_wrapped_moe_block():
    model = peftlab.wrap(build("Qwen3-MoE"), peftlab.AdapterConfig(style="pfeiffer", bottleneck_size=4))
    block = model.model.layers[0].mlp
    router = block.base_layer.gate
    assert submodule(model, "model.layers.0.mlp.gate") is router
    new = nn.Identity()
    replace_module(model, "model.layers.0.mlp.gate", new)
    assert block.base_layer.gate is new and model.model.layers[0].mlp is block
