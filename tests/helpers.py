"""Test utilities shared by every test module (plain functions, importable as `helpers`)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    T5Config,
    T5EncoderModel,
)

import peftlab

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("PEFTLAB_DATA", REPO.parent / "shared" / "data"))


def minilm_path() -> str:
    return peftlab.resolve_model_path("minilm-l6")


def smollm2_path() -> str:
    return peftlab.resolve_model_path("smollm2-135m")


def tiny_model(family: str) -> torch.nn.Module:
    """A tiny randomly initialised model of ``family`` (no download), in eval mode."""
    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64))
    elif family == "opt":
        model = OPTForCausalLM(
            OPTConfig(
                num_hidden_layers=2,
                num_attention_heads=2,
                hidden_size=32,
                ffn_dim=64,
                vocab_size=100,
                max_position_embeddings=64,
                word_embed_proj_dim=32,
            )
        )
    elif family == "t5":
        model = T5EncoderModel(
            T5Config(num_layers=2, num_heads=2, d_model=32, d_kv=16, d_ff=64, vocab_size=100)
        )
    elif family == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                hidden_size=32,
                intermediate_size=64,
                vocab_size=100,
                max_position_embeddings=64,
            )
        )
    elif family == "bert":
        model = BertForSequenceClassification(
            BertConfig(
                num_hidden_layers=2,
                num_attention_heads=2,
                hidden_size=32,
                intermediate_size=64,
                vocab_size=100,
                num_labels=2,
            )
        )
    else:
        raise ValueError(family)
    return model.eval()


def perturb(model: torch.nn.Module, scale: float = 0.05, adapter_name: str | None = None) -> None:
    """Add N(0, scale²) noise to every tensor of the adapter(s), so that they change the output.

    Works for every method (LoRA's zero B, AdaLoRA's zero Λ, a bottleneck's zero W_up, prefix tables,
    head copies) through the generic adapter tensor selection.
    """
    from peftlab.core.tensors import adapter_tensors

    names = [adapter_name] if adapter_name else peftlab.list_adapters(model)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name in names:
            for tensor in adapter_tensors(model, name).values():
                if tensor.is_floating_point():
                    noise = torch.randn(tensor.shape, generator=gen) * scale
                    tensor.add_(noise.to(tensor.device, tensor.dtype))


def slots(model: torch.nn.Module, kind: str | None = None, adapter_name: str | None = None) -> list:
    """Every adapter slot in ``model`` (of class name ``kind``, e.g. "LoraSlot"), in module order."""
    from peftlab.core.layer import AdapterLayer

    out = []
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            for name, slot in module.slots.items():
                if (kind is None or type(slot).__name__ == kind) and adapter_name in (None, name):
                    out.append(slot)
    return out


def read_sst2(split: str, limit: int | None = None) -> tuple[list[str], list[int]]:
    """(sentences, labels) of ``../shared/data/sst2/<split>.tsv``."""
    sentences, labels = [], []
    with open(DATA_DIR / "sst2" / f"{split}.tsv", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            sentences.append(row["sentence"])
            labels.append(int(row["label"]))
            if limit and len(sentences) >= limit:
                break
    return sentences, labels


def sst2_batches(
    tokenizer_dir: str, split: str, batch_size: int, limit: int, max_length: int = 64, seed: int = 0
):
    """Tokenised SST-2 batches (dicts with input_ids, attention_mask, labels)."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    sentences, labels = read_sst2(split, limit)
    order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed)).tolist()
    batches = []
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        enc = tok(
            [sentences[j] for j in idx],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        enc["labels"] = torch.tensor([labels[j] for j in idx])
        batches.append(dict(enc))
    return batches


def train_steps(model, batches, steps: int, lr: float = 1e-3, on_step=None) -> list[float]:
    """A plain AdamW loop over ``batches`` (cycled) for ``steps`` steps; returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        peftlab.on_train_step(model, step)
        if on_step is not None:
            on_step(step)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def accuracy(model, batches) -> float:
    model.eval()
    correct = total = 0
    for batch in batches:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        correct += (logits.argmax(-1) == batch["labels"]).sum().item()
        total += len(batch["labels"])
    return correct / total
