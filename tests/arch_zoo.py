"""Tiny random models of every architecture the method x architecture matrix covers (no downloads).

Each entry builds a 2-layer model with hidden size 32 (vocab 96) in a few tens of milliseconds.
``build(arch)`` returns it in eval mode, always with the same weights (seeded), so a "fresh copy
of the base" for HF PEFT is just another ``build(arch)``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import transformers as tf

VOCAB = 96
_SMALL = dict(
    vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64
)
_DECODER = dict(_SMALL, num_key_value_heads=2, max_position_embeddings=64)
_ENCODER = dict(_SMALL, max_position_embeddings=64, num_labels=3)
_TEXT = dict(_SMALL, max_position_embeddings=64)
_VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, image_size=32, patch_size=8)


@dataclass(frozen=True)
class Arch:
    """One matrix row: the label, the model class, its config, and the task head."""

    label: str
    model_cls: str
    config_cls: str
    config: dict
    task: str  # "causal-lm" | "seq-cls" | "seq2seq" | "image-cls" | "contrastive" | "speech2text" | "audio-cls" | "vlm"
    length: int = 6  # token inputs' length (sliding-window models: longer than the window)


ARCHS: dict[str, Arch] = {
    a.label: a
    for a in [
        Arch(
            "GPT-2",
            "GPT2LMHeadModel",
            "GPT2Config",
            dict(n_layer=2, n_head=4, n_embd=32, vocab_size=VOCAB, n_positions=64),
            "causal-lm",
        ),
        Arch(
            "GPT-J",
            "GPTJForCausalLM",
            "GPTJConfig",
            dict(n_layer=2, n_head=4, n_embd=32, vocab_size=VOCAB, n_positions=64, rotary_dim=4),
            "causal-lm",
        ),
        Arch(
            "GPT-NeoX",
            "GPTNeoXForCausalLM",
            "GPTNeoXConfig",
            dict(_SMALL, max_position_embeddings=64),
            "causal-lm",
        ),
        Arch(
            "OPT",
            "OPTForCausalLM",
            "OPTConfig",
            dict(
                num_hidden_layers=2,
                num_attention_heads=4,
                hidden_size=32,
                ffn_dim=64,
                vocab_size=VOCAB,
                max_position_embeddings=64,
                word_embed_proj_dim=32,
            ),
            "causal-lm",
        ),
        Arch(
            "BLOOM",
            "BloomForCausalLM",
            "BloomConfig",
            dict(n_layer=2, n_head=4, hidden_size=32, vocab_size=VOCAB),
            "causal-lm",
        ),
        Arch(
            "Falcon",
            "FalconForCausalLM",
            "FalconConfig",
            dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, vocab_size=VOCAB),
            "causal-lm",
        ),
        Arch("Llama", "LlamaForCausalLM", "LlamaConfig", _DECODER, "causal-lm"),
        Arch("Mistral", "MistralForCausalLM", "MistralConfig", dict(_DECODER, sliding_window=4), "causal-lm", length=8),
        Arch("Qwen2", "Qwen2ForCausalLM", "Qwen2Config", _DECODER, "causal-lm"),
        Arch("Qwen3", "Qwen3ForCausalLM", "Qwen3Config", dict(_DECODER, head_dim=8), "causal-lm"),
        Arch("Gemma", "GemmaForCausalLM", "GemmaConfig", dict(_DECODER, head_dim=8), "causal-lm"),
        Arch("Gemma-2", "Gemma2ForCausalLM", "Gemma2Config", dict(_DECODER, head_dim=8, sliding_window=4), "causal-lm",
             length=8),  # sequences longer than the window: a prefix slides out of it as in HF PEFT
        Arch("Phi", "PhiForCausalLM", "PhiConfig", _DECODER, "causal-lm"),
        Arch("Phi-3", "Phi3ForCausalLM", "Phi3Config", dict(_DECODER, pad_token_id=0), "causal-lm"),
        Arch(
            "Llama (seq-cls)",
            "LlamaForSequenceClassification",
            "LlamaConfig",
            dict(_DECODER, num_labels=3, pad_token_id=0),
            "seq-cls",
        ),
        Arch(
            "T5",
            "T5ForConditionalGeneration",
            "T5Config",
            dict(
                num_layers=2,
                num_heads=4,
                d_model=32,
                d_kv=8,
                d_ff=64,
                vocab_size=VOCAB,
                decoder_start_token_id=0,
            ),
            "seq2seq",
        ),
        Arch(
            "BART",
            "BartForConditionalGeneration",
            "BartConfig",
            dict(
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                d_model=32,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
                vocab_size=VOCAB,
                max_position_embeddings=64,
            ),
            "seq2seq",
        ),
        Arch(
            "BART (seq-cls)",
            "BartForSequenceClassification",
            "BartConfig",
            dict(
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                d_model=32,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
                vocab_size=VOCAB,
                max_position_embeddings=64,
                num_labels=3,
            ),
            "seq-cls",
        ),
        Arch("BERT", "BertForSequenceClassification", "BertConfig", _ENCODER, "seq-cls"),
        Arch(
            "RoBERTa",
            "RobertaForSequenceClassification",
            "RobertaConfig",
            dict(_ENCODER, pad_token_id=1),
            "seq-cls",
        ),
        Arch(
            "DeBERTa-v2",
            "DebertaV2ForSequenceClassification",
            "DebertaV2Config",
            dict(_ENCODER, pooler_hidden_size=32),
            "seq-cls",
        ),
        Arch(
            "DistilBERT",
            "DistilBertForSequenceClassification",
            "DistilBertConfig",
            dict(
                vocab_size=VOCAB,
                dim=32,
                n_heads=4,
                n_layers=2,
                hidden_dim=64,
                max_position_embeddings=64,
                num_labels=3,
            ),
            "seq-cls",
        ),
        Arch(
            "ELECTRA",
            "ElectraForSequenceClassification",
            "ElectraConfig",
            dict(_ENCODER, embedding_size=32),
            "seq-cls",
        ),
        # ---- today's models (issue 30): MoE, MLA, hybrid stacks, VLMs, vision, speech, long-context encoders ----
        Arch("Qwen3-MoE", "Qwen3MoeForCausalLM", "Qwen3MoeConfig",
             dict(_DECODER, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16), "causal-lm"),
        Arch("Mixtral", "MixtralForCausalLM", "MixtralConfig",
             dict(_DECODER, num_local_experts=4, num_experts_per_tok=2), "causal-lm"),
        Arch("GPT-OSS", "GptOssForCausalLM", "GptOssConfig",
             dict(_DECODER, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                  layer_types=["sliding_attention", "full_attention"],
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0)), "causal-lm", length=8),
        Arch("Llama-4", "Llama4ForCausalLM", "Llama4TextConfig",
             dict(_DECODER, head_dim=8, num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=64,
                  moe_layers=[0, 1], no_rope_layers=[1, 1]), "causal-lm"),
        Arch("OLMoE", "OlmoeForCausalLM", "OlmoeConfig",
             dict(_DECODER, num_experts=4, num_experts_per_tok=2, eos_token_id=2, pad_token_id=1), "causal-lm"),
        Arch("DeepSeek-V3", "DeepseekV3ForCausalLM", "DeepseekV3Config",
             dict(_DECODER, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                  first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
                  v_head_dim=8, n_group=1, topk_group=1), "causal-lm"),
        Arch("Qwen3-Next", "Qwen3NextForCausalLM", "Qwen3NextConfig",
             dict(_DECODER, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                  shared_expert_intermediate_size=16, linear_num_value_heads=4, linear_num_key_heads=2,
                  linear_key_head_dim=8, linear_value_head_dim=8, full_attention_interval=2), "causal-lm"),
        Arch("Jamba", "JambaForCausalLM", "JambaConfig",
             dict(_DECODER, num_experts=2, num_experts_per_tok=1, attn_layer_period=2, attn_layer_offset=1,
                  expert_layer_period=2, expert_layer_offset=1, mamba_d_state=4, mamba_expand=2, mamba_dt_rank=4),
             "causal-lm"),
        Arch("Granite-4-H", "GraniteMoeHybridForCausalLM", "GraniteMoeHybridConfig",
             dict(_DECODER, num_local_experts=2, num_experts_per_tok=1, layer_types=["mamba", "attention"],
                  mamba_d_state=4, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_expand=2,
                  shared_intermediate_size=32), "causal-lm"),
        Arch("LFM2", "Lfm2ForCausalLM", "Lfm2Config", dict(_DECODER, layer_types=["conv", "full_attention"]), "causal-lm"),
        Arch("Gemma-3", "Gemma3ForCausalLM", "Gemma3TextConfig", dict(_DECODER, head_dim=8, sliding_window=4),
             "causal-lm", length=8),
        Arch("Gemma-4", "Gemma4ForCausalLM", "Gemma4TextConfig",  # full-attention layers twice as wide, as Gemma-4's
             dict(_DECODER, head_dim=8, global_head_dim=16, sliding_window=4,  # 512 vs 256; per-layer inputs (PLE)
                  layer_types=["sliding_attention", "full_attention"], vocab_size_per_layer_input=VOCAB,
                  hidden_size_per_layer_input=8), "causal-lm", length=8),
        Arch("Qwen3.5", "Qwen3_5ForCausalLM", "Qwen3_5TextConfig",
             dict(_DECODER, head_dim=8, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
                  linear_value_head_dim=8, layer_types=["linear_attention", "full_attention"]), "causal-lm"),
        Arch("Llava", "LlavaForConditionalGeneration", "LlavaConfig",
             dict(vision_config=dict(_VISION, model_type="clip_vision_model"),
                  text_config=dict(_DECODER, model_type="llama"), image_token_index=VOCAB - 1,
                  projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="default"),
             "vlm"),
        Arch("Qwen2-VL", "Qwen2VLForConditionalGeneration", "Qwen2VLConfig",
             dict(text_config=dict(_DECODER, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
                  vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=4,
                                     spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
                  image_token_id=VOCAB - 1, video_token_id=VOCAB - 2, vision_start_token_id=VOCAB - 3), "vlm"),
        Arch("PaliGemma", "PaliGemmaForConditionalGeneration", "PaliGemmaConfig",
             dict(vision_config=dict(_VISION, model_type="siglip_vision_model", vision_use_head=False),
                  text_config=dict(_DECODER, head_dim=8, model_type="gemma"), image_token_index=VOCAB - 1,
                  vocab_size=VOCAB, projection_dim=32, hidden_size=32), "vlm"),
        Arch("CLIP", "CLIPModel", "CLIPConfig",
             dict(text_config=_TEXT, vision_config=_VISION, projection_dim=16), "contrastive"),
        Arch("SigLIP", "SiglipModel", "SiglipConfig", dict(text_config=_TEXT, vision_config=_VISION), "contrastive"),
        Arch("ViT", "ViTForImageClassification", "ViTConfig", dict(_VISION, num_labels=3), "image-cls"),
        Arch("Swin", "SwinForImageClassification", "SwinConfig",
             dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4,
                  num_labels=3), "image-cls"),
        Arch("ConvNeXt", "ConvNextForImageClassification", "ConvNextConfig",  # attention-free: convolutions + MLPs
             dict(num_channels=3, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=3), "image-cls"),
        Arch("Whisper", "WhisperForConditionalGeneration", "WhisperConfig",
             dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
                  max_source_positions=8, max_target_positions=32, decoder_start_token_id=1, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, suppress_tokens=None, begin_suppress_tokens=None), "speech2text"),
        Arch("Wav2Vec2", "Wav2Vec2ForSequenceClassification", "Wav2Vec2Config",
             dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16),
                  conv_stride=(4, 4), conv_kernel=(8, 8), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
                  num_labels=3, vocab_size=VOCAB, mask_time_prob=0.3, mask_time_length=2, classifier_proj_size=16),
             "audio-cls"),
        Arch("Longformer", "LongformerForSequenceClassification", "LongformerConfig",
             dict(_ENCODER, max_position_embeddings=80, attention_window=4, pad_token_id=1), "seq-cls", length=8),
        Arch("ModernBERT", "ModernBertForSequenceClassification", "ModernBertConfig",
             dict(_ENCODER, pad_token_id=0, eos_token_id=2, bos_token_id=1, cls_token_id=1, sep_token_id=2),
             "seq-cls"),
        Arch("XLM-R", "XLMRobertaForSequenceClassification", "XLMRobertaConfig", dict(_ENCODER, pad_token_id=1),
             "seq-cls"),
        Arch("mT5", "MT5ForConditionalGeneration", "MT5Config",
             dict(num_layers=2, num_heads=4, d_model=32, d_kv=8, d_ff=64, vocab_size=VOCAB, decoder_start_token_id=0),
             "seq2seq"),
    ]
}

_CACHE: dict[str, torch.nn.Module] = {}


def build(label: str) -> torch.nn.Module:
    """A tiny random model of ``label`` in eval mode (identical weights on every call)."""
    if label not in _CACHE:
        arch = ARCHS[label]
        torch.manual_seed(0)
        config = getattr(tf, arch.config_cls)(**arch.config)
        model = getattr(tf, arch.model_cls)(config).eval()
        with torch.no_grad():  # a non-trivial head and biases (some inits are zero) so every tensor matters
            for name, p in model.named_parameters():
                if name.endswith("bias") and not p.any():
                    p.normal_(0, 0.02)
        _CACHE[label] = model
    return copy.deepcopy(_CACHE[label])


def _pixels(gen: torch.Generator, batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=gen)


def inputs(label: str, batch: int = 2, length: int | None = None) -> dict[str, torch.Tensor]:
    """Inputs for ``label``'s task: token ids 3.. ending in </s> = 2 (which BART's classifier reads), plus pixels
    (a 32x32 image), mel features or a waveform; a VLM's ids hold its image tokens."""
    arch = ARCHS[label]
    length = length or arch.length
    gen = torch.Generator().manual_seed(1)
    if arch.task == "image-cls":
        return {"pixel_values": _pixels(gen, batch)}
    if arch.task == "audio-cls":
        return {"input_values": torch.randn(batch, 400, generator=gen)}
    if arch.task == "speech2text":
        feats = torch.randn(batch, 8, 16, generator=gen)
        return {"input_features": feats, "decoder_input_ids": torch.randint(3, VOCAB - 3, (batch, 4), generator=gen)}
    ids = torch.randint(3, VOCAB - 3, (batch, length), generator=gen)
    ids[:, -1] = 2
    if arch.task == "vlm":
        return _vlm_inputs(arch, ids, gen)
    mask = torch.ones_like(ids)
    out = {"input_ids": ids, "attention_mask": mask}
    if arch.task == "seq2seq":
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 4), generator=gen)
    if arch.task == "contrastive":
        out["pixel_values"] = _pixels(gen, batch)
        if label == "SigLIP":  # SigLIP's text tower reads the last token, padded to max_length, no mask
            del out["attention_mask"]
    return out


def _vlm_inputs(arch: Arch, ids: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    batch = ids.shape[0]
    image = arch.config["image_token_index" if "image_token_index" in arch.config else "image_token_id"]
    if arch.model_cls.startswith(("Llava", "PaliGemma")):  # 4x4 patches of 8 pixels (Llava drops CLS): 16 tokens
        ids = torch.cat([torch.full((batch, 16), image), ids], dim=1)
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": _pixels(gen, batch)}
        if arch.model_cls.startswith("PaliGemma"):  # as its processor gives them for training: 0 on the image and
            out["token_type_ids"] = (torch.arange(ids.shape[1]) >= ids.shape[1] - 3).long().expand(batch, -1)
        return out  # prompt (attending to each other), 1 on the suffix (3 tokens, causal)
    # Qwen2-VL: a 16x16 image = 4x4 patches of 4 (x2 frames), merged 2x2: 4 image tokens after <vision_start>
    start = arch.config["vision_start_token_id"]
    ids = torch.cat([torch.full((batch, 1), start), torch.full((batch, 4), image), ids], dim=1)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch * 16, 3 * 2 * 4 * 4, generator=gen),
        "image_grid_thw": torch.tensor([[1, 4, 4]] * batch),
        "mm_token_type_ids": (ids == image).long(),  # what the processor returns: 1 on image tokens
    }


def labels(label: str, batch: int = 2, length: int | None = None) -> torch.Tensor | None:
    """The ``labels`` argument for a training step (None: the model computes its loss another way, see
    :func:`loss_kwargs`)."""
    arch = ARCHS[label]
    gen = torch.Generator().manual_seed(2)
    if arch.task in ("seq-cls", "image-cls", "audio-cls"):
        return torch.randint(0, 3, (batch,), generator=gen)
    if arch.task in ("seq2seq", "speech2text"):
        return torch.randint(3, VOCAB - 3, (batch, 4), generator=gen)
    if arch.task == "contrastive":
        return None
    return inputs(label, batch, length)["input_ids"]


def loss_kwargs(label: str) -> dict:
    """Keyword arguments that make ``model(**inputs(label), **loss_kwargs(label))`` return a ``.loss``."""
    target = labels(label)
    return {"return_loss": True} if target is None else {"labels": target}


def logits(output) -> torch.Tensor:
    """The output a matrix cell compares: ``.logits``, or a contrastive model's ``logits_per_image``."""
    value = getattr(output, "logits", None)
    return output.logits_per_image if value is None else value


def gemma4_moe() -> torch.nn.Module:
    """The "Gemma-4" row with its MoE layout (26B-A4B): router and experts held by the decoder layer itself beside
    a dense mlp, the two branches normed, summed and normed again in the layer's forward (no module outputs the
    sum)."""
    torch.manual_seed(0)
    config = tf.Gemma4TextConfig(**{**ARCHS["Gemma-4"].config, "enable_moe_block": True, "num_experts": 4,
                                    "top_k_experts": 2, "moe_intermediate_size": 16})  # fmt: skip
    return tf.Gemma4ForCausalLM(config).eval()
