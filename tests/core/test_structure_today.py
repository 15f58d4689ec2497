"""structure() of today's stacks (issue 30): hybrid layers, multi-head latent attention, models without input
embeddings, VLM towers; and the defaults it gives LoRA (no false "no attention module" refusal)."""

from __future__ import annotations

import pytest
from arch_zoo import build

from peftlab.core.structure import structure
from peftlab.core.targeting import default_targets


@pytest.mark.parametrize(
    ("label", "attention_layers"),
    [("Qwen3-Next", [1]), ("Jamba", [1]), ("Granite-4-H", [1]), ("LFM2", [1]), ("Qwen3.5", [1])],
)
def test_hybrid_stacks_have_blocks_without_attention(label, attention_layers):
    found = structure(build(label))
    assert [b.index for b in found.blocks] == [0, 1]
    assert [b.index for b in found.blocks if b.attention] == attention_layers
    assert default_targets(build(label)) == ["q_proj", "v_proj"]
    for block in found.blocks:  # a mixer's projections (Mamba in_proj/out_proj, delta-net, conv) are no ffn
        assert not any(w in (block.ffn_out or "") for w in ("mamba", "linear_attn", "conv"))


def test_mla_projections_have_roles():
    found = structure(build("DeepSeek-V3"))
    site = found.attention()[0]
    assert site.q_a.endswith("q_a_proj") and site.q.endswith("q_b_proj")
    assert site.kv_a.endswith("kv_a_proj_with_mqa") and site.kv.endswith("kv_b_proj") and site.o.endswith("o_proj")
    assert default_targets(build("DeepSeek-V3")) == ["q_b_proj", "kv_b_proj"]
    # layer 0 is dense (its MLP's down_proj is the ffn output), layer 1 a mixture of experts: the whole MoE block
    # (experts, router and shared experts) carries its output
    assert found.blocks[0].ffn_out.endswith("mlp.down_proj") and found.blocks[0].moe_width is None
    assert found.blocks[1].ffn_out == found.blocks[1].ffn_in[0] == "model.layers.1.mlp"
    assert found.blocks[1].moe_width == 32


@pytest.mark.parametrize("label", ["CLIP", "SigLIP", "Wav2Vec2", "ViT", "Swin", "Whisper"])
def test_models_without_input_embeddings_have_a_structure(label):
    found = structure(build(label))  # CLIP / Wav2Vec2 raise NotImplementedError from get_input_embeddings
    assert found.blocks and found.language is None and list(found.towers()) == ["model"]
    assert default_targets(build(label)) == ["q_proj", "v_proj"] or label in ("ViT", "Swin")


def test_swin_stages_are_not_blocks():
    found = structure(build("Swin"))
    assert all(s.endswith(".blocks") for s in found.stacks)
    assert all(len(b.attention) == 1 and b.attention[0].kind == "self" for b in found.blocks)


@pytest.mark.parametrize(
    ("label", "vision"),
    [("Llava", "model.vision_tower"), ("Qwen2-VL", "model.visual"), ("PaliGemma", "model.vision_tower")],
)
def test_vlm_towers_found_separately(label, vision):
    found = structure(build(label))
    assert found.language == "model.language_model"
    towers = found.towers()
    assert set(towers) == {"language", vision}
    main = found.main()
    assert main.stacks == towers["language"] and all(b.stack in main.stacks for b in main.blocks)
    targets = default_targets(build(label))  # the language model's q/v, by full path (the tower has q/v too)
    assert targets and all(t.startswith("model.language_model.") for t in targets)


def test_attention_free_convnext_has_feed_forward_blocks():
    """ConvNeXt has no attention: its blocks are the innermost lists of MLP blocks (not the stages that hold them),
    LoRA's default is their feed-forward (HF PEFT has none), and the backbone is not a head."""
    found = structure(build("ConvNeXt"))
    assert found.stacks == ["convnext.encoder.stages.0.layers", "convnext.encoder.stages.1.layers"]
    assert all(not b.attention for b in found.blocks)
    assert [b.ffn_out.rsplit(".", 1)[-1] for b in found.blocks] == ["pwconv2", "pwconv2"]
    assert [b.ffn_in for b in found.blocks][0] == ["convnext.encoder.stages.0.layers.0.pwconv1"]
    assert found.head == ["classifier"]
    assert default_targets(build("ConvNeXt")) == ["pwconv1", "pwconv2"]


def test_gemma4_per_layer_input_projection_is_not_the_feed_forward():
    """Gemma-4's per-layer-input gate and projection sit beside the MLP in each block; the feed-forward is the MLP."""
    found = structure(build("Gemma-4"))
    for block in found.blocks:
        assert block.ffn_out.endswith("mlp.down_proj")
        assert [p.rsplit(".", 1)[-1] for p in block.ffn_in] == ["gate_proj", "up_proj"]
