"""Prefixes in a mixed batch on VLMs: each row equals that row's adapter run alone.

A VLM's prefix shifts the positions its language model gets (PaliGemma's count from 1, Qwen2-VL's are multimodal,
(3, batch, T)); a mixed batch must shift each row's by its own prefix length there too, not the VLM's input
positions (which the VLM recomputes), and only once per forward however often the batch is routed.
"""

from __future__ import annotations

import pytest
import torch
from arch_zoo import build, inputs, logits

import peftlab
from helpers import perturb
from peftlab.serving.router import BASE


@pytest.mark.parametrize("label", ["Llava", "Qwen2-VL", "PaliGemma"])
def test_each_row_of_a_mixed_prefix_batch_equals_its_adapter_alone(label):
    model = build(label)
    peftlab.wrap(model, peftlab.PrefixConfig(num_virtual_tokens=3, adapter_name="p3"))
    peftlab.wrap(model, peftlab.PrefixConfig(num_virtual_tokens=5, projection_dim=8, adapter_name="p5"))
    perturb(model, 0.5)
    x = inputs(label, batch=3)
    names = ["p5", BASE, "p3"]
    with torch.no_grad():
        first = logits(model(**x, adapter_names=names))
        again = logits(model(**x, adapter_names=names))  # routed twice: the positions move once
        alone = {}
        for name in ("p3", "p5"):
            peftlab.set_active_adapters(model, name)
            alone[name] = logits(model(**x))
        with peftlab.disable_adapters(model):
            alone[BASE] = logits(model(**x))
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    for m, name in enumerate(names):
        torch.testing.assert_close(first[m], alone[name][m], rtol=1e-5, atol=1e-5, msg=f"row {m} ({name})")
    assert (alone["p3"] - alone["p5"]).abs().max() > 1e-3


@pytest.mark.parametrize("label", ["Llava", "PaliGemma"])
def test_mixed_prefix_generate_on_a_vlm_equals_each_adapter_alone(label):
    """generate routes every decoding step without clearing in between: the language model's positions must still
    move by each row's prefix once per step."""
    model = build(label)
    peftlab.wrap(model, peftlab.PrefixConfig(num_virtual_tokens=3, adapter_name="p3"))
    peftlab.wrap(model, peftlab.PrefixConfig(num_virtual_tokens=5, adapter_name="p5"))
    perturb(model, 0.5)
    x = inputs(label, batch=2)
    kw = {"max_new_tokens": 4, "do_sample": False, "return_dict_in_generate": True, "output_scores": True}
    out = model.generate(**x, adapter_names=["p5", "p3"], **kw)
    for m, name in enumerate(["p5", "p3"]):
        peftlab.set_active_adapters(model, name)
        ref = model.generate(**x, **kw)
        assert torch.equal(out.sequences[m], ref.sequences[m]), name
        for step, scores in enumerate(ref.scores):
            torch.testing.assert_close(out.scores[step][m], scores[m], rtol=1e-5, atol=1e-5, msg=f"{name} step {step}")
