"""Gemma-4's attention variants under prefix tuning and structure(), against HF PEFT.

The matrix row (tests/arch_zoo.py "Gemma-4") has full-attention layers twice as wide as the sliding ones; here
also the two layouts of the released checkpoints the row leaves out: KV-shared layers (the E2B/E4B models: the
last layers have no key/value projections and read an earlier layer's keys and values) and
``attention_k_eq_v`` (the large models: full-attention layers have no value projection, their keys are the
values). HF PEFT's prefix reaches a KV-shared layer through the layer it reads from; ours must give the same
logits, and structure() must see every layer's attention (not take q_proj/o_proj for a feed-forward).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import transformers as tf
from arch_zoo import ARCHS, inputs

import peftlab
from helpers import perturb
from peftlab.core.structure import structure
from peftlab.core.targeting import default_targets

peft = pytest.importorskip("peft")

VARIANTS = {
    "kv-shared": dict(num_hidden_layers=3, num_kv_shared_layers=1,
                      layer_types=["sliding_attention", "full_attention", "full_attention"]),
    "k-eq-v": dict(attention_k_eq_v=True),
}  # fmt: skip


def build(variant: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tf.Gemma4TextConfig(**{**ARCHS["Gemma-4"].config, **VARIANTS[variant]})
    return tf.Gemma4ForCausalLM(config).eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_layer_has_attention_and_its_mlp_is_the_feed_forward(variant):
    model = build(variant)
    found = structure(model)
    layers = model.config.num_hidden_layers
    assert [b.index for b in found.blocks if b.attention] == list(range(layers))
    for block in found.blocks:  # not the per-layer-input gate/projection, not q_proj/o_proj of a KV-shared layer
        assert block.ffn_out.endswith("mlp.down_proj"), block.ffn_out
        assert block.attention[0].o.endswith("self_attn.o_proj")
    if variant == "kv-shared":
        assert found.blocks[-1].attention[0].k is None and found.blocks[-1].attention[0].v is None
    else:  # the full-attention layer's keys are its values
        assert found.blocks[1].attention[0].k and found.blocks[1].attention[0].v is None
    assert default_targets(model) == ["q_proj", "v_proj"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefix_export_gives_hf_peft_our_logits(variant):
    x = inputs("Gemma-4")  # 8 tokens: longer than the window of 4
    model = peftlab.wrap(build(variant), peftlab.PrefixConfig(num_virtual_tokens=3, projection_dim=8))
    perturb(model, 0.5)
    with torch.no_grad():
        ours = model(**x).logits
        with peftlab.disable_adapters(model):
            base = model(**x).logits
    assert (ours - base).abs().max() > 1e-3
    with tempfile.TemporaryDirectory() as tmp:
        peftlab.export_peft(model, Path(tmp))
        theirs = peft.PeftModel.from_pretrained(build(variant), tmp).eval()
        with torch.no_grad():
            torch.testing.assert_close(theirs(**x).logits, ours, rtol=0, atol=1e-5)
