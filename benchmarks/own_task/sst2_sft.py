"""SST-2 as an instruction JSONL, trained on SmolLM2-135M with ``peftlab train --task sft``.

Rows: ``{"prompt": "Review: <sentence>\\nSentiment?", "response": "positive" | "negative"}``; training =
SST-2's train split (file order, shuffled by the trainer), eval = the 872 test sentences. The score is
the exact match of the greedy generation (stopped at EOS) with the reference word. Before training, the
script checks on the first training batch that prompt tokens carry no loss: every prompt position has
label -100, and the model's loss equals the cross-entropy over the response positions alone.

    OMP_NUM_THREADS=1 nohup nice -n 10 .venv/bin/python benchmarks/own_task/sst2_sft.py > /tmp/sst2_sft.log 2>&1 &

Writes benchmarks/results/own_task/sst2_sft.{json,md}.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import PROMPT, RESULTS, run, sst2_rows, write_instructions, write_result  # noqa: E402

STEPS, BATCH, LR, MAX_LEN, SEED, RANK = int(os.environ.get("SFT_STEPS", 300)), 16, 5e-4, 96, 0, 16


def masking_check(train_jsonl: Path) -> dict:
    """Prompt tokens carry no loss: labels -100 on every prompt position, loss == response-only CE."""
    import torch

    import peftlab
    import peftlab.data

    torch.set_num_threads(1)
    model, tokenizer = peftlab.load_model("smollm2-135m")
    data = peftlab.data.prepare("sft", tokenizer, str(train_jsonl), max_length=MAX_LEN)
    batch = next(data.batches(BATCH, seed=SEED))
    prompt_tokens = response_tokens = prompt_with_loss = 0
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        n = int(mask.sum())
        answer = [t for t in range(n) if labels[t] != -100]
        first = answer[0]
        prompt_tokens += first
        response_tokens += len(answer)
        prompt_with_loss += int((labels[:first] != -100).sum())
        assert answer == list(range(first, n)), "the response is one span at the end"
        assert labels[first:n].tolist() == ids[first:n].tolist()
    model.eval()
    with torch.no_grad():
        out = model(**batch)
        logits = out.logits[:, :-1].float()
        target = batch["labels"][:, 1:]
        keep = target != -100
        manual = torch.nn.functional.cross_entropy(logits[keep], target[keep])
    return {
        "batch_rows": int(batch["input_ids"].shape[0]),
        "prompt_tokens": prompt_tokens,
        "prompt_tokens_with_loss": prompt_with_loss,
        "response_tokens_with_loss": response_tokens,
        "model_loss": float(out.loss),
        "response_only_cross_entropy": float(manual),
        "equal": abs(float(out.loss) - float(manual)) < 1e-5,
        "example": tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()]),
    }


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = RESULTS / "sst2_sft.log"
    log.write_text("")
    with tempfile.TemporaryDirectory(prefix="sst2-sft-") as tmp:
        tmp = Path(tmp)
        train_jsonl = write_instructions(sst2_rows("train"), tmp / "train.jsonl")
        test_jsonl = write_instructions(sst2_rows("test"), tmp / "test.jsonl")
        masking = masking_check(train_jsonl)
        print(json.dumps(masking, indent=1), flush=True)
        cmd = [
            "peftlab.finetune_cli", "--model", "smollm2-135m", "--data", str(train_jsonl), "--eval-data", str(test_jsonl),
            "--task", "sft", "--method", "lora", "--r", str(RANK), "--alpha", str(2 * RANK), "--target", "all-linear",
            "--max-steps", str(STEPS), "--batch-size", str(BATCH), "--lr", str(LR), "--max-length", str(MAX_LEN),
            "--seed", str(SEED), "--no-progress", "--out", str(tmp / "train"),
        ]  # fmt: skip
        wall = run(cmd, log)
        metrics = json.loads((tmp / "train" / "metrics.json").read_text())
        (RESULTS / "sst2_sft_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    ev = metrics["eval"]
    command = "peftlab train " + " ".join(cmd[1:]).replace(str(tmp), "$TMP")
    data = {
        "recipe": {"model": "smollm2-135m", "method": f"lora r={RANK} alpha={2 * RANK} all-linear", "steps": STEPS,
                   "batch_size": BATCH, "lr": LR, "max_length": MAX_LEN, "seed": SEED, "prompt": PROMPT},
        "test_rows": ev["eval_rows"], "exact_match": ev.get("exact_match"), "response_loss": ev["response_loss"],
        "perplexity": ev["perplexity"], "trainable_params": metrics["trainable_params"], "train_seconds": metrics["train_seconds"],
        "peak_memory_mb": metrics["peak_memory_mb"], "first_train_loss": metrics["first_train_loss"],
        "final_train_loss": metrics["final_train_loss"], "masking": masking, "command": command, "wall_seconds": wall,
        "examples": metrics.get("examples"),
    }  # fmt: skip
    em = ev.get("exact_match")
    md = f"""# SST-2 as instruction tuning: SmolLM2-135M, `peftlab train --task sft`

Rows `{{"prompt": "Review: <sentence>\\nSentiment?", "response": "positive" | "negative"}}` from SST-2's
train split; eval on the 872 test sentences (GLUE's SST-2 dev set). LoRA r={RANK}, alpha={2 * RANK} on every
linear layer, {STEPS} steps of {BATCH}, lr {LR:g}, max length {MAX_LEN}, seed {SEED}, CPU (one thread).

| exact match (greedy, 872 test rows) | response loss | perplexity | trainable params | train time |
|---|---|---|---|---|
| {100 * em:.2f}% | {ev['response_loss']:.4f} | {ev['perplexity']:.3f} | {metrics['trainable_params']:,d} | {metrics['train_seconds'] / 60:.1f} min |

Goal ≥ 85%: {'met' if em is not None and em >= 0.85 else 'NOT met'}.

**Prompt tokens carry no loss** (first training batch, {masking['batch_rows']} rows, before training):
{masking['prompt_tokens']} prompt tokens, {masking['prompt_tokens_with_loss']} of them with a label other than -100;
{masking['response_tokens_with_loss']} response tokens (the word and EOS) carry the loss. The model's loss
{masking['model_loss']:.6f} equals the cross-entropy over the response positions alone
{masking['response_only_cross_entropy']:.6f} ({'equal' if masking['equal'] else 'NOT equal'}).

Command (the JSONL files are written to a temporary folder `$TMP`):

```
OMP_NUM_THREADS=1 {command}
```

Reproduce: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/own_task/sst2_sft.py`
"""
    write_result("sst2_sft", data, md)
    print(md)


if __name__ == "__main__":
    main()
