"""Training-step efficiency: peftlab LoRA vs HF PEFT LoRA vs full fine-tuning, same config, same run.

Each configuration runs in its own subprocess (peak RSS on a CPU, max allocated on a GPU), takes
``--steps`` AdamW steps on one fixed batch (same seed), and reports the median step time after a
warm-up step, tokens/s, peak memory and the loss after the last step (peftlab's must equal HF PEFT's:
LoRA A gets the same values in both, dropout is off). Rows: ``frozen-floor`` (no adapters, only the forward and the
input-gradient backward through the frozen base: what any LoRA step must at least pay), full fine-tuning,
HF PEFT LoRA, peftlab LoRA,
peftlab LoRA with selective checkpointing (``-sac``: GEMM outputs kept, element-wise ops recomputed) and
with full activation checkpointing (``-ckpt``).

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
CONFIGS = ["frozen-floor", "full", "hf-peft-lora", "peftlab-lora", "peftlab-lora-sac", "peftlab-lora-ckpt"]


def match_lora_init(model: torch.nn.Module) -> None:
    """Give every LoRA A the same values in peftlab and HF PEFT (seeded by its module path); B stays 0.

    HF PEFT and peftlab draw their random A in different orders, so without this only the first-step
    loss (where B = 0) could be compared; with it, the whole loss trajectory must agree.
    """
    import zlib

    for name, param in model.named_parameters():
        if "lora_A" not in name:
            continue
        path = name.removeprefix("base_model.model.").split(".lora_A")[0]
        gen = torch.Generator().manual_seed(zlib.crc32(path.encode()))
        flat = param.data.reshape(-1, param.shape[-1]) if param.dim() == 2 else param.data
        flat.copy_(torch.randn(flat.shape, generator=gen) / flat.shape[-1] ** 0.5)


def worker(model_name: str, config: str, steps: int, lora_dropout: float = 0.0) -> dict:
    import peftlab

    setup = SETUPS[model_name]
    kwargs = {"num_labels": 2} if setup["kind"] == "seq-cls" else {}
    torch.manual_seed(0)  # the new classifier head gets the same init in every config
    model, _ = peftlab.load_model(model_name, kind=setup["kind"], **kwargs)
    torch.manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (setup["batch"], setup["length"]))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["labels"] = ids.clone() if setup["kind"] == "causal-lm" else torch.randint(0, 2, (setup["batch"],))
    heads = ["classifier"] if setup["kind"] == "seq-cls" else None
    for module in model.modules():  # no dropout: the loss trajectories must be comparable across configs
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    torch.manual_seed(1)
    if config.startswith("peftlab-lora"):
        peftlab.wrap(
            model,
            peftlab.LoraConfig(
                r=16, alpha=32, dropout=lora_dropout, target_modules=setup["targets"], modules_to_save=heads
            ),
        )
    elif config == "hf-peft-lora":
        import peft

        task = "SEQ_CLS" if heads else "CAUSAL_LM"
        model = peft.get_peft_model(
            model,
            peft.LoraConfig(
                r=16,
                lora_alpha=32,
                lora_dropout=lora_dropout,
                target_modules=setup["targets"],
                task_type=task,
            ),
        )
    elif config == "frozen-floor":  # no adapters: forward + input-gradient backward through the frozen base
        model.requires_grad_(False)
        embeds = model.get_input_embeddings()(batch.pop("input_ids")).detach().requires_grad_()
        batch["inputs_embeds"] = embeds
    if config not in ("full", "frozen-floor"):
        match_lora_init(model)
    if config.endswith(("-ckpt", "-sac")):  # full / selective (matmuls kept) activation checkpointing
        from peftlab.memory import enable_gradient_checkpointing

        enable_gradient_checkpointing(model, selective=config.endswith("-sac"))
    model.train()
    load_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if config.startswith(("peftlab-lora", "frozen-floor")) and setup["kind"] == "causal-lm":
        from peftlab.losses import causal_lm_loss

        def loss_fn():
            return causal_lm_loss(model, batch)
    else:

        def loss_fn():
            return model(**batch).loss

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    times, losses = [], []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    step = statistics.median(times[1:])
    return {
        "model": model_name,
        "config": config,
        "median_step_s": step,
        "tokens_per_s": ids.numel() / step,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "losses": losses,
        "rss_after_load_mb": load_rss,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "steps": steps,
        "lora_dropout": lora_dropout,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--configs", nargs="*", default=CONFIGS, choices=CONFIGS)
    parser.add_argument("--out", default="benchmarks/results/efficiency")
    parser.add_argument(
        "--merge", action="store_true", help="keep the rows of out/efficiency.json for configs not run now"
    )
    parser.add_argument(
        "--lora-dropout",
        type=float,
        default=0.0,
        help="dropout on the LoRA input (both libraries); > 0 makes the losses differ (different masks)",
    )
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.steps, args.lora_dropout)))
        return
    rows = []
    for model_name in args.model:
        for config in args.configs:
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", model_name, config, "--steps", str(args.steps)]
                + ["--lora-dropout", str(args.lora_dropout)],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    device = (
        f"cpu ({torch.get_num_threads()} threads)"
        if not torch.cuda.is_available()
        else torch.cuda.get_device_name()
    )
    stamp = datetime.date.today().isoformat()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge and (out / "efficiency.json").is_file():
        done = {(r["model"], r["config"]) for r in rows}
        old = json.loads((out / "efficiency.json").read_text())["rows"]
        rows = [r for r in old if (r["model"], r["config"]) not in done] + rows
        order = {c: i for i, c in enumerate(CONFIGS)}
        rows.sort(key=lambda r: (list(SETUPS).index(r["model"]), order[r["config"]]))
    (out / "efficiency.json").write_text(
        json.dumps({"device": device, "date": stamp, "rows": rows}, indent=2)
    )
    lines = [
        f"# Training-step efficiency ({device}, {stamp})",
        "",
        f"`python benchmarks/efficiency.py {' '.join(sys.argv[1:])}`: one fixed batch, AdamW lr 1e-4, median step "
        "time after one warm-up step, peak RSS of the run's own process (model load included; 'after load' is "
        "the peak before the first step). LoRA A matrices get identical values in peftlab and HF PEFT, so the "
        + (
            "loss after the last step compares whole training trajectories."
            if not args.lora_dropout
            else f"losses would match but for the dropout masks (p = {args.lora_dropout:g}), which differ between "
            "the libraries: the loss column shows both still train, not equality."
        ),
        "",
        "| model | config | median step (s) | tokens/s | peak RSS (MB) | RSS after load (MB) | × HF PEFT time "
        "| × HF PEFT memory | last loss | rel. diff vs HF PEFT |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        hf = next((h for h in rows if h["model"] == r["model"] and h["config"] == "hf-peft-lora"), None)
        time_ratio = f"{r['median_step_s'] / hf['median_step_s']:.2f}" if hf else "–"
        mem_ratio = f"{r['peak_rss_mb'] / hf['peak_rss_mb']:.2f}" if hf else "–"
        diff = (
            f"{abs(r['last_loss'] - hf['last_loss']) / abs(hf['last_loss']):.1e}"
            if hf and r["config"] not in ("full", "frozen-floor")
            else "–"
        )
        lines.append(
            f"| {r['model']} | {r['config']} | {r['median_step_s']:.3f} | {r['tokens_per_s']:.0f} | "
            f"{r['peak_rss_mb']:.0f} | {r['rss_after_load_mb']:.0f} | {time_ratio} | "
            f"{mem_ratio} | {r['last_loss']:.6f} | {diff} |"
        )
    (out / "efficiency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
