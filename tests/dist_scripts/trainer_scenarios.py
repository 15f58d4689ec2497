"""transformers.Trainer + PeftlabCallback on MiniLM-L6 with AdaLoRA, in one process or under torchrun (DDP).

* ``trainer``: 6 optimizer steps, checkpoints at steps 3 and 6 (``run/checkpoint-N``), then
  ``trainer.save_model(final)``; writes ``trainer.json`` (per-step losses, ranks, what each folder holds).
* ``trainer-resume``: a fresh model (same initialisation) resumed from ``trainer/run/checkpoint-3``; its
  steps 4-6 and its final adapter must equal the uninterrupted run's. AdaLoRA's allocator masks ranks on
  every step from step 1 and fixes its final pattern at step 4, so a resume that lost the importance EMAs
  (or the optimizer state) would diverge.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from equivalence import GLOBAL_BATCH, MAX_LENGTH, STEPS, make_model, sst2_rows


class RowDataset(torch.utils.data.Dataset):
    def __init__(self, tokenizer, n: int) -> None:
        rows = sst2_rows(n)
        enc = tokenizer([s for s, _ in rows], padding="max_length", truncation=True, max_length=MAX_LENGTH)
        self.items = [
            {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": y}
            for i, (_, y) in enumerate(rows)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def make_trainer(out: Path, resume: bool = False):
    import transformers

    import peftlab
    from peftlab.util.dist import get_world_size

    model, tokenizer = make_model("adalora")
    world = get_world_size()
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        learning_rate=2e-3,
        lr_scheduler_type="linear",
        warmup_steps=0,
        save_strategy="steps",
        save_steps=3,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    data = RowDataset(tokenizer, STEPS * GLOBAL_BATCH)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, callbacks=[peftlab.PeftlabCallback(peft_format=True)]
    )
    return trainer, model


def losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def run(name: str, out: Path) -> None:
    import peftlab
    from peftlab.methods.adalora.method import ranks
    from peftlab.util.dist import get_world_size, is_main_process

    target = out / name
    if name == "trainer":
        trainer, model = make_trainer(target / "run")
        trainer.train()
        trainer.save_model(str(target / "final"))
    else:
        trainer, model = make_trainer(target / "run")
        trainer.train(resume_from_checkpoint=str(out / "trainer" / "run" / "checkpoint-3"))
        if is_main_process():
            peftlab.save_adapter(model, target / "final")
    if is_main_process():
        record = {"losses": losses(trainer), "world": get_world_size(), "ranks": ranks(model)}
        (target / "trainer.json").write_text(json.dumps(record, indent=1))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
