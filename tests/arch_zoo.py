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


@dataclass(frozen=True)
class Arch:
    """One matrix row: the label, the model class, its config, and the task head."""

    label: str
    model_cls: str
    config_cls: str
    config: dict
    task: str  # "causal-lm" | "seq-cls" | "seq2seq"


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
        Arch("Mistral", "MistralForCausalLM", "MistralConfig", _DECODER, "causal-lm"),
        Arch("Qwen2", "Qwen2ForCausalLM", "Qwen2Config", _DECODER, "causal-lm"),
        Arch("Qwen3", "Qwen3ForCausalLM", "Qwen3Config", dict(_DECODER, head_dim=8), "causal-lm"),
        Arch("Gemma", "GemmaForCausalLM", "GemmaConfig", dict(_DECODER, head_dim=8), "causal-lm"),
        Arch("Gemma-2", "Gemma2ForCausalLM", "Gemma2Config", dict(_DECODER, head_dim=8), "causal-lm"),
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


def inputs(label: str, batch: int = 2, length: int = 6) -> dict[str, torch.Tensor]:
    """Token inputs for ``label``'s task (ids 3.., ending in </s> = 2, which BART's classifier reads)."""
    arch = ARCHS[label]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    ids[:, -1] = 2
    mask = torch.ones_like(ids)
    out = {"input_ids": ids, "attention_mask": mask}
    if arch.task == "seq2seq":
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 4), generator=gen)
    return out


def labels(label: str, batch: int = 2, length: int = 6) -> torch.Tensor:
    arch = ARCHS[label]
    gen = torch.Generator().manual_seed(2)
    if arch.task == "seq-cls":
        return torch.randint(0, 3, (batch,), generator=gen)
    if arch.task == "seq2seq":
        return torch.randint(3, VOCAB, (batch, 4), generator=gen)
    return inputs(label, batch, length)["input_ids"]
