"""Training-step efficiency: peftlab LoRA vs HF PEFT LoRA vs full fine-tuning, same config, same run.

Each configuration runs in its own subprocess (peak RSS on a CPU, max allocated on a GPU), takes
``--steps`` AdamW steps on one fixed batch (same seed), and reports the median step time after a
warm-up step, tokens/s, peak memory and the first-step loss (peftlab's must equal HF PEFT's).

    python benchmarks/efficiency.py [--model smollm2-135m] [--out benchmarks/results/efficiency]

Models: SmolLM2-135M (causal LM, 8×128 tokens, LoRA r=16 on all linear layers) and MiniLM-L6
(sequence classification, 32×64). Writes efficiency.md and efficiency.json with device and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SETUPS = {
    "smollm2-135m": {"kind": "causal-lm", "batch": 8, "length": 128, "targets": "all-linear"},
    "minilm-l6": {"kind": "seq-cls", "batch": 32, "length": 64, "targets": "all-linear"},
}
CONFIGS = ["full", "hf-peft-lora", "peftlab-lora"]


def worker(model_name: str, config: str, steps: int) -> dict:
    import peftlab

    setup = SETUPS[model_name]
    kwargs = {"num_labels": 2} if setup["kind"] == "seq-cls" else {}
    model, _ = peftlab.load_model(model_name, kind=setup["kind"], **kwargs)
    torch.manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (setup["batch"], setup["length"]))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["labels"] = ids.clone() if setup["kind"] == "causal-lm" else torch.randint(0, 2, (setup["batch"],))
    heads = ["classifier"] if setup["kind"] == "seq-cls" else None
    torch.manual_seed(1)
    if config == "peftlab-lora":
        peftlab.wrap(model, peftlab.LoraConfig(r=16, alpha=32, target_modules=setup["targets"], modules_to_save=heads))
    elif config == "hf-peft-lora":
        import peft

        task = "SEQ_CLS" if heads else "CAUSAL_LM"
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=setup["targets"], task_type=task))
    model.train()
    if config == "peftlab-lora" and setup["kind"] == "causal-lm":
        from peftlab.losses import causal_lm_loss

        def loss_fn():
            return causal_lm_loss(model, batch)
    else:
        def loss_fn():
            return model(**batch).loss

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times, losses = [], []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    step = statistics.median(times[1:])
    return {
        "model": model_name, "config": config, "median_step_s": step, "tokens_per_s": ids.numel() / step,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "first_loss": losses[0],
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad), "steps": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/efficiency")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.steps)))
        return
    rows = []
    for model_name in args.model:
        for config in CONFIGS:
            proc = subprocess.run([sys.executable, __file__, "--worker", model_name, config, "--steps", str(args.steps)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    device = f"cpu ({torch.get_num_threads()} threads)" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    stamp = datetime.date.today().isoformat()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "efficiency.json").write_text(json.dumps({"device": device, "date": stamp, "rows": rows}, indent=2))
    lines = [f"# Training-step efficiency ({device}, {stamp})", "",
             "| model | config | median step (s) | tokens/s | peak RSS (MB) | × HF PEFT time | × HF PEFT memory | first loss |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hf = next((h for h in rows if h["model"] == r["model"] and h["config"] == "hf-peft-lora"), None)
        lines.append(f"| {r['model']} | {r['config']} | {r['median_step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['median_step_s'] / hf['median_step_s']:.2f} | {r['peak_rss_mb'] / hf['peak_rss_mb']:.2f} | {r['first_loss']:.6f} |"
                     if hf else f"| {r['model']} | {r['config']} | {r['median_step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} | – | – | {r['first_loss']:.6f} |")
    (out / "efficiency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
