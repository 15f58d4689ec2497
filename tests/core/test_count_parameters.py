"""count_parameters: a copied head (modules_to_save) is counted once, with exact expected counts."""

from __future__ import annotations

import peftlab

MINILM_BASE = 22_713_986  # MiniLM-L6 with a 2-class head (384 × 2 + 2 = 770)
LORA_QV = 6 * 2 * (384 + 384)  # 6 layers × (query, value) × r (A: r × 384, B: 384 × r), per unit of rank


def test_head_copy_replaces_the_original_in_the_total():
    """The README's count: 22,713,986 + 8 × 9,216 = 22,787,714 parameters, of which 73,728 LoRA + the head
    copy's 770 train. A second adapter with its own head adds its LoRA tensors and one more head copy."""
    model, _ = peftlab.load_model("minilm-l6", kind="seq-cls", num_labels=2)
    assert peftlab.count_parameters(model) == (MINILM_BASE, MINILM_BASE)
    config = dict(target_modules=["query", "value"], modules_to_save=["classifier"])
    peftlab.wrap(model, peftlab.LoraConfig(r=8, alpha=16, **config))
    assert peftlab.count_parameters(model) == (8 * LORA_QV + 770, 22_787_714)
    assert "trainable params: 74,498 || all params: 22,787,714" in peftlab.print_trainable_parameters(model)
    peftlab.wrap(model, peftlab.LoraConfig(r=4, adapter_name="second", **config))
    trainable, total = peftlab.count_parameters(model)
    assert total == MINILM_BASE + 8 * LORA_QV + 4 * LORA_QV + 770
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_a_head_tied_to_the_embeddings_keeps_them_in_the_total(tiny):
    """GPT-2 ties lm_head to the input embeddings: copying lm_head must not drop the embeddings (still used)."""
    model = tiny("gpt2")
    base = peftlab.count_parameters(model)[1]
    peftlab.wrap(model, peftlab.LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=["lm_head"]))
    trainable, total = peftlab.count_parameters(model)
    head = 100 * 32  # the copy: vocab × width, no bias
    lora = 2 * 2 * (32 + 3 * 32)  # 2 layers × r × (in + out) of c_attn (32 -> 96)
    assert (trainable, total) == (lora + head, base + lora + head)
