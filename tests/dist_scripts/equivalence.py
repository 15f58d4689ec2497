"""Train MiniLM-L6 + LoRA on fixed SST-2 batches in one or several processes; save what happened.

``torchrun --nproc_per_node 2 tests/dist_scripts/equivalence.py OUT ddp fsdp trainer`` runs each named
scenario in turn in the same two processes; ``python equivalence.py OUT single accum`` the one-process
references. Each scenario writes ``OUT/<name>/``: ``losses.json`` (rank 0), ``adapter/`` (save_adapter),
``peft/`` (export_peft), ``merged/`` (save_merged) and ``shapes.json`` (the unsharded parameter shapes).
The same global batches of 8 rows in the same order go to every scenario:

* single: 1 process × batch 8;  accum: 1 process × grad_accum 2 × batch 4;
* ddp: 2 processes × batch 4 (accelerate's DDP);  fsdp: 2 processes × batch 4 (FSDP2 per BertLayer + root);
* trainer / trainer-resume: transformers.Trainer with PeftlabCallback (see tests/training/test_trainer.py).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

STEPS = 6
GLOBAL_BATCH = 8
MAX_LENGTH = 32
LR = 1.0
MAX_GRAD_NORM = 0.05  # small, so that clipping (on the global norm) is active on every step


def sgd(params):
    """SGD with momentum: a linear update, so fp32 summation-order noise stays at its own size. (AdamW divides
    by sqrt(v): entries whose gradient is near 0 turn 1e-7 noise into ~1e-5 weight differences.)"""
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def sst2_rows(n: int) -> list[tuple[str, int]]:
    import csv

    data = Path(os.environ.get("PEFTLAB_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
    rows = []
    with open(data / "sst2" / "train.tsv", newline="") as f:
        for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            rows.append((r["sentence"], int(r["label"])))
            if len(rows) == n:
                break
    return rows


def global_batches(tokenizer, steps: int = STEPS, batch: int = GLOBAL_BATCH) -> list[dict]:
    """Padded to MAX_LENGTH, so that a batch and its slices have the same sequence length."""
    rows = sst2_rows(steps * batch)
    out = []
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        enc = tokenizer(
            [s for s, _ in chunk],
            padding="max_length",
            truncation=True,
            max_length=MAX_LENGTH,
            return_tensors="pt",
        )
        enc["labels"] = torch.tensor([y for _, y in chunk])
        out.append(dict(enc))
    return out


def make_model(method: str = "lora"):
    import peftlab

    torch.manual_seed(0)
    model, tokenizer = peftlab.load_model(
        "minilm-l6", kind="seq-cls", num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    if method == "lora":
        config = peftlab.LoraConfig(
            r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]
        )
    else:
        config = peftlab.AdaLoraConfig(
            init_r=6,
            target_r=2,
            target_modules=["query", "value"],
            total_steps=STEPS,
            t_init=1,
            t_final=2,
            delta_t=1,
            modules_to_save=["classifier"],
        )
    peftlab.wrap(model, config)
    return model, tokenizer


def run_scenario(name: str, out: Path) -> None:
    import peftlab
    from peftlab.training.loop import split_batches, train
    from peftlab.util.dist import get_rank, get_world_size, is_main_process

    target = out / name
    model, tokenizer = make_model()
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    world, rank = get_world_size(), get_rank()
    accum = 2 if name == "accum" else 1
    distributed = "fsdp" if name == "fsdp" else None
    batches = split_batches(iter(global_batches(tokenizer)), world, rank, accum)
    result = train(
        model,
        batches,
        STEPS,
        lr=LR,
        warmup_ratio=0.0,
        max_grad_norm=MAX_GRAD_NORM,
        device="cpu",
        progress=False,
        optimizer=sgd,
        grad_accum=accum,
        distributed=distributed,
    )
    # every rank calls the savers; they gather shards and write once, on rank 0
    peftlab.save_adapter(model, target / "adapter")
    peftlab.export_peft(model, target / "peft")
    peftlab.save_merged(model, target / "merged")
    if is_main_process():
        (target / "losses.json").write_text(
            json.dumps({"losses": result.losses, "grad_norms": result.grad_norms, "world": world})
        )
        (target / "shapes.json").write_text(json.dumps(shapes))
    if name == "fsdp":  # merge and unwrap on the sharded model, checked against the unmerged outputs
        report = {}
        probe = {k: v for k, v in global_batches(tokenizer, 1)[0].items() if k != "labels"}
        with torch.no_grad():
            adapted = model(**probe).logits
            with peftlab.disable_adapters(model):
                base = model(**probe).logits
            for action in ("merge", "unwrap"):
                try:
                    getattr(peftlab, action)(model)
                    logits = model(**probe).logits
                    expected = adapted if action == "merge" else base
                    report[action] = {"max_abs_diff": (logits - expected).abs().max().item()}
                except peftlab.PeftlabError as exc:
                    report[action] = {"error": f"{type(exc).__name__}: {exc}"}
        if is_main_process():
            (target / "merge_unwrap.json").write_text(json.dumps(report, indent=1))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    for name in argv[1:]:
        if name.startswith("trainer"):
            from trainer_scenarios import run as run_trainer

            run_trainer(name, out)
        else:
            run_scenario(name, out)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main(sys.argv[1:]))
