"""Backend table: SmolLM2-135M with LoRA on a base quantized by each backend, against fp32 LoRA (CPU).

For each configuration, in its own fresh subprocess (so peak RSS does not leak between them): load SmolLM2-135M,
quantize its block linears (bitsandbytes NF4+double quant / int8, torchao int8 / int4 weight-only), wrap LoRA
(r=8, alpha=16, every block linear), train ``--steps`` AdamW steps (lr 1e-3) on SST-2 sentences as causal-LM
text (batch ``--batch`` × up to ``--seq`` tokens, the same batches for every configuration, seed 0), and record:

* bits per parameter of the quantized linears and the model footprint (``peftlab.memory_report``);
* the median step time over steps 3.. (shared machine: indicative only) and the peak RSS rise while training
  (VmHWM reset with /proc/self/clear_refs after setup), both also as a ratio to fp32 LoRA;
* the loss after the last step (mean of the last 5) against fp32 LoRA's.

    python benchmarks/quant_backends.py --steps 50 --out benchmarks/results/quant

Writes ``quant_backends.json`` and ``quant_backends.md`` into ``--out``. MB = 10⁶ bytes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

CONFIGS = {
    "fp32 LoRA": None,
    "bitsandbytes nf4 (+dq)": {"backend": "bitsandbytes", "bits": 4, "quant_type": "nf4", "double_quant": True},
    "bitsandbytes int8": {"backend": "bitsandbytes", "bits": 8},
    "torchao int8": {"backend": "torchao", "scheme": "int8"},
    "torchao int4 (g64)": {"backend": "torchao", "scheme": "int4", "group_size": 64},
}


def _mem() -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def batches(tokenizer, n: int, batch: int, seq: int) -> list[dict]:
    import torch

    from peftlab.bench.tasks import data_dir, read_sst2

    rows = read_sst2(Path(data_dir()), "train")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    out = []
    for i in range(n):
        texts = [rows[order[i * batch + j]][0] for j in range(batch)]
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return out


def run_one(name: str, steps: int, batch: int, seq: int) -> dict:
    import torch

    import peftlab

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    model, tok = peftlab.load_model("smollm2-135m")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    spec = CONFIGS[name]
    if spec is not None:
        peftlab.quantize(model, **spec)
    report = peftlab.memory_report(model)
    peftlab.wrap(model, peftlab.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    data = batches(tok, steps, batch, seq)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    setup = _mem()
    reset = _reset_peak()
    losses, times = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        loss = model(**data[step]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    end = _mem()
    q = report["quantized_linear"]
    return {
        "config": name,
        "bits_per_param_quantized_linears": q["bits_per_param"],
        "quantized_linears": q["modules"],
        "model_mb": report["total_mb"],
        "step_s_median": statistics.median(times[2:]),
        "peak_rss_rise_training_mb": (end["VmHWM"] - setup["VmRSS"]) / 1e6 if reset else None,
        "loss_first": losses[0],
        "loss_last5": sum(losses[-5:]) / 5,
        "losses": losses,
    }


def table(results: list[dict], meta: dict) -> str:
    ref = next(r for r in results if r["config"] == "fp32 LoRA")
    lines = [
        "# Quantized-base backends: SmolLM2-135M + LoRA (r=8, every block linear), CPU",
        "",
        f"{meta['date']}, {meta['machine']}, torch {meta['torch']}, bitsandbytes {meta['bitsandbytes']}, "
        f"torchao {meta['torchao']}. {meta['steps']} AdamW steps (lr 1e-3), batch {meta['batch']} × {meta['seq']} "
        "tokens of SST-2 sentences, the same batches for every row, 1 seed. **Timings on a shared machine "
        "(2 cores shared with other jobs): indicative only.** Command: see COMMAND.",
        "",
        "| backend | bits/param (quantized linears) | model MB | step s (× fp32) | train peak RSS rise MB (× fp32) "
        "| loss, last 5 of 50 (fp32: {:.3f}) |".format(ref["loss_last5"]),
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        bpp = f"{r['bits_per_param_quantized_linears']:.2f}" if r["bits_per_param_quantized_linears"] else "32 (fp32)"
        rss = r["peak_rss_rise_training_mb"]
        rss_s = f"{rss:.0f} ({rss / ref['peak_rss_rise_training_mb']:.2f}×)" if rss and ref["peak_rss_rise_training_mb"] else "-"
        lines.append(
            f"| {r['config']} | {bpp} | {r['model_mb']:.0f} | {r['step_s_median']:.2f} "
            f"({r['step_s_median'] / ref['step_s_median']:.2f}×) | {rss_s} | {r['loss_last5']:.3f} "
            f"({r['loss_last5'] - ref['loss_last5']:+.3f}) |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results/quant")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.steps, args.batch, args.seq)))
        return
    bad = [c for c in args.configs if c not in CONFIGS]
    if bad:
        parser.error(f"unknown configs {bad}; known: {list(CONFIGS)}")
    results = []
    for name in args.configs:
        cmd = [sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--batch", str(args.batch),
               "--seq", str(args.seq)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(name, {k: v for k, v in results[-1].items() if k != "losses"}, flush=True)
    import bitsandbytes
    import torch
    import torchao

    meta = {
        "date": dt.date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs", "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
        "torchao": torchao.__version__, "steps": args.steps, "batch": args.batch, "seq": args.seq,
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant_backends.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (out / "quant_backends.md").write_text(table(results, meta))
    print(table(results, meta))


if __name__ == "__main__":
    main()
