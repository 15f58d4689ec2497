"""Real training: transformers.Trainer on a wrapped model, and LoRA on MiniLM reaching >=80% on SST-2."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

import peftlab
from helpers import accuracy, sst2_batches, train_steps


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_trainer_trains_and_checkpoints_unchanged(tiny, tmp_path):
    model = tiny("llama")
    peftlab.wrap(model, peftlab.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    torch.manual_seed(0)
    seqs = torch.randint(1, 100, (4, 12)).repeat(4, 1)  # 4 distinct sequences to memorise
    rows = [{"input_ids": s, "labels": s.clone()} for s in seqs]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=60,
        per_device_train_batch_size=8,
        learning_rate=2e-2,
        save_steps=60,
        logging_steps=10,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ListDataset(rows))
    first = trainer.evaluate(ListDataset(rows))["eval_loss"]
    trainer.train()
    last = trainer.evaluate(ListDataset(rows))["eval_loss"]
    assert last < first - 0.3, (first, last)  # HF PEFT reaches the same loss on this task
    assert (tmp_path / "checkpoint-60" / "model.safetensors").is_file()
    # the trained adapter is what changed: disabling it restores the first loss
    with peftlab.disable_adapters(model):
        assert trainer.evaluate(ListDataset(rows))["eval_loss"] == pytest.approx(first, rel=1e-5)
    out = model.generate(input_ids=seqs[:2, :4], max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 8)


@pytest.mark.slow
def test_minilm_lora_sst2_reaches_80_percent(minilm_dir, sst2_dir):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2)
    peftlab.wrap(model, peftlab.LoraConfig(r=8, alpha=16, dropout=0.05, modules_to_save=["classifier"]))
    train = sst2_batches(minilm_dir, "train", batch_size=32, limit=32 * 300, max_length=48)
    test = sst2_batches(minilm_dir, "test", batch_size=128, limit=None, max_length=64)
    losses = train_steps(model, train, steps=300, lr=2e-3)
    acc = accuracy(model, test)
    print(f"MiniLM-L6 + LoRA r=8, 300 steps x 32: SST-2 test accuracy {acc:.4f} (872 sentences)")
    assert sum(losses[-30:]) / 30 < sum(losses[:30]) / 30
    assert acc >= 0.80
