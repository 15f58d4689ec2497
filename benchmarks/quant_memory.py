"""SmolLM2-135M: memory footprint in fp32 / int8 / NF4 / NF4+double-quant, load-time peak RSS, and
QLoRA vs LoRA training step time and peak memory. Every configuration runs in its own fresh
subprocess, so peak-RSS numbers do not leak between them.

    python benchmarks/quant_memory.py [--steps 6] [--out benchmarks/results]

Writes ``quant_memory.json`` and ``quant_memory.md`` (device and date included) into ``--out``.
Memory on CPU is the process RSS (``/proc/self/status``; the peak is reset with
``/proc/self/clear_refs`` before the phase measured); on CUDA, ``torch.cuda.max_memory_allocated``.
MB = 10⁶ bytes.
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
import tempfile
import time
import warnings
from pathlib import Path

LOAD_MODES = {
    "fp32": {},
    "int8": {"bits": 8},
    "nf4": {"bits": 4, "quant_type": "nf4", "double_quant": False},
    "nf4+dq": {"bits": 4, "quant_type": "nf4", "double_quant": True},
}
TRAIN_MODES = {
    "lora (fp32 base)": {"quant": None, "checkpointing": False},
    "qlora (nf4+dq base)": {"quant": "nf4+dq", "checkpointing": False},
    "qlora (nf4+dq) + grad. checkpointing": {"quant": "nf4+dq", "checkpointing": True},
    "qlora (int8 base)": {"quant": "int8", "checkpointing": False},
}


def proc_mem() -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def load(mode: str, device: str):
    import torch

    import peftlab
    from peftlab.backends.quant.load import load_quantized

    path = peftlab.resolve_model_path("smollm2-135m")
    if mode == "fp32":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return load_quantized(path, device=device, **LOAD_MODES[mode])


def worker_load(mode: str, device: str) -> dict:
    """Peak RSS rise while loading (and after one forward pass, which touches every weight), memory_report."""
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (import cost is not loading cost)

    import peftlab.backends.quant.model as quant

    torch.set_num_threads(2)
    before = proc_mem()
    t0 = time.perf_counter()
    model = load(mode, device)
    load_s = time.perf_counter() - t0
    after_load = proc_mem()
    with torch.no_grad():
        model(torch.randint(0, 1000, (1, 32), device=device))
    after_fwd = proc_mem()
    report = quant.memory_report(model)
    return {
        "mode": mode,
        "load_s": load_s,
        "rss_before_mb": before["VmRSS"] / 1e6,
        "peak_rise_load_mb": (after_load["VmHWM"] - before["VmRSS"]) / 1e6,
        "peak_rise_load_forward_mb": (after_fwd["VmHWM"] - before["VmRSS"]) / 1e6,
        "footprint_mb": report["total_mb"],
        "bits_per_param": report["bits_per_param"],
        "linear_bits_per_param": report["quantized_linear"]["bits_per_param"] or 32.0,
        "kinds_mb": {k: round(v["mb"], 3) for k, v in report["kinds"].items()},
    }


def sst2_generation_batches(tokenizer, batch_size: int, n_batches: int, max_length: int = 64):
    """SST-2 as generation: ``Review: <s>\\nSentiment: positive|negative``; loss on all non-pad tokens."""
    import csv

    data = Path(os.environ.get("PEFTLAB_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    rows = []
    with open(data / "sst2" / "train.tsv", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            rows.append(
                f"Review: {row['sentence']}\nSentiment: {'positive' if row['label'] == '1' else 'negative'}"
            )
            if len(rows) >= batch_size * n_batches:
                break
    batches = []
    for i in range(0, len(rows), batch_size):
        enc = tokenizer(
            rows[i : i + batch_size],
            padding="max_length",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        batches.append(
            {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}
        )
    return batches


def saved_bytes_hooks(seen: dict[int, int], skip: set[int]):
    """saved_tensors_hooks that record the bytes autograd keeps for backward (unique storages, parameters excluded)."""

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in skip and t.device.type != "meta":
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    return pack, lambda t: t


def worker_train(name: str, device: str, steps: int, batch_size: int) -> dict:
    """Step time (median of ``steps`` after 2 warm-up steps) and peak memory of one training run."""
    import torch
    from transformers import AutoTokenizer

    import peftlab
    from peftlab.backends.quant.model import memory_report, prepare_for_kbit_training
    from peftlab.persist.quantized_merge import merge_quantized

    torch.set_num_threads(2)
    torch.manual_seed(0)
    spec = TRAIN_MODES[name]
    before = proc_mem()
    model = load(spec["quant"] or "fp32", device)
    if spec["quant"]:
        prepare_for_kbit_training(model, use_gradient_checkpointing=spec["checkpointing"])
    peftlab.wrap(model, peftlab.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    tok = AutoTokenizer.from_pretrained(peftlab.resolve_model_path("smollm2-135m"))
    tok.pad_token = tok.pad_token or tok.eos_token
    batches = [
        {k: v.to(device) for k, v in b.items()} for b in sst2_generation_batches(tok, batch_size, steps + 2)
    ]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    setup = proc_mem()
    peak_reset = reset_peak()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses, saved = [], [], []
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for step, batch in enumerate(batches):
        t0 = time.perf_counter()
        seen: dict[int, int] = {}
        with torch.autograd.graph.saved_tensors_hooks(*saved_bytes_hooks(seen, param_storages)):
            loss = model(**batch).loss
        saved.append(sum(seen.values()))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    end = proc_mem()
    trainable, total = peftlab.count_parameters(model)
    # merge into the (quantized) base and measure how much the logits move on the first batch
    probe = {k: v for k, v in batches[0].items() if k != "labels"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the int8 warning carries the same numbers as the report
        merge = merge_quantized(model, probe)
    out = {
        "mode": name,
        "step_s_median": statistics.median(times),
        "step_s_all": [round(t, 3) for t in times],
        "losses": [round(v, 4) for v in losses],
        "trainable_params": trainable,
        "weights_mb": memory_report(model)["total_mb"],
        "saved_for_backward_mb": max(saved) / 1e6,
        "merge": {
            k: merge.get(k)
            for k in ("max_abs", "mean_abs", "rel", "adapter_effect_mean_abs", "quantized_layers")
        },
        "rss_after_setup_mb": (setup["VmRSS"] - before["VmRSS"]) / 1e6,
        "peak_rss_rise_training_mb": (end["VmHWM"] - setup["VmRSS"]) / 1e6 if peak_reset else None,
        "peak_rss_rise_total_mb": (end["VmHWM"] - before["VmRSS"]) / 1e6,
    }
    if device == "cuda":
        out["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 1e6
    return out


def run_worker(args: list[str]) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        cmd = [sys.executable, __file__, "--worker", *args, "--result", out.name]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"worker {args} failed:\n{proc.stderr[-3000:]}")
        return json.loads(Path(out.name).read_text())


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        "# SmolLM2-135M: quantized memory footprint and QLoRA vs LoRA",
        "",
        f"Measured {meta['date']} on {meta['device']} ({meta['cpu_threads']} torch threads), torch {meta['torch']}, "
        f"bitsandbytes {meta['bitsandbytes']}, transformers {meta['transformers']}. MB = 10⁶ bytes. "
        f"Produced by `python benchmarks/quant_memory.py`."
        + (
            f" The machine was shared: 1-minute load average {meta['loadavg_start']:.1f} at the start and "
            f"{meta['loadavg_end']:.1f} at the end on {meta['cpu_count']} cores, so step times are noisy; "
            "the minimum over steps is the least disturbed."
            if "loadavg_start" in meta and "loadavg_end" in meta
            else ""
        ),
        "",
        "## Footprint and load-time peak memory",
        "",
        "Footprint: every stored tensor of the loaded model (weights, quantization constants, buffers; tied "
        "weights once), from `peftlab.memory_report`. Peak rise: VmHWM after loading (and after one forward pass "
        "that touches every weight) minus RSS just before loading, in a fresh process. fp32 uses "
        "`from_pretrained`, which memory-maps the checkpoint, so its pages only count once touched.",
        "",
        "| format | footprint MB | linear bits/param | all bits/param | peak RSS rise: load | load + 1 forward | load s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["load"]:
        lines.append(
            f"| {r['mode']} | {r['footprint_mb']:.1f} | {r['linear_bits_per_param']:.3f} | {r['bits_per_param']:.2f} | "
            f"{r['peak_rise_load_mb']:.0f} | {r['peak_rise_load_forward_mb']:.0f} | {r['load_s']:.1f} |"
        )
    t = result["train_config"]
    lines += [
        "",
        "## QLoRA vs LoRA, one run",
        "",
        f"LoRA r=8 on all linear layers, SST-2 as generation, batch {t['batch_size']} × {t['max_length']} tokens, "
        f"AdamW; step time = median of {t['steps']} steps after 2 warm-up steps. Weights: `memory_report` of the "
        "wrapped model. Saved for backward: the largest per-step total of distinct tensors autograd kept "
        "(parameters excluded; a `saved_tensors_hooks` count, independent of the allocator). Peak RSS: rise over "
        "the process before loading (whole run) and over the state after setup (training only); on the CPU it "
        "includes memory glibc's heap keeps after freeing transients (e.g. the per-layer dequantized weights).",
        "",
        "| run | step s (median) | step s (min) | weights MB | saved for backward MB | peak RSS rise, total MB | peak RSS rise, training MB | first → last loss |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["train"]:
        train_peak = (
            f"{r['peak_rss_rise_training_mb']:.0f}" if r["peak_rss_rise_training_mb"] is not None else "n/a"
        )
        lines.append(
            f"| {r['mode']} | {r['step_s_median']:.2f} | {min(r['step_s_all']):.2f} | {r['weights_mb']:.0f} | {r['saved_for_backward_mb']:.0f} | "
            f"{r['peak_rss_rise_total_mb']:.0f} | {train_peak} | "
            f"{r['losses'][0]:.3f} → {r['losses'][-1]:.3f} |"
        )
    lines += [
        "",
        "## Merging the trained adapter into its base",
        "",
        "`peftlab.merge_quantized(model, first_batch)` after the run above: quantized bases are dequantized, "
        "ΔW added, and requantized. Change of the logits on the batch (merged vs. unmerged adapter), against "
        "what the adapter itself changes (adapter vs. disabled adapter).",
        "",
        "| run | quantized layers | max abs change | mean abs change | mean change / mean |logit| | adapter effect (mean abs) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["train"]:
        m = r["merge"]
        lines.append(
            f"| {r['mode']} | {m['quantized_layers']} | {m['max_abs']:.3g} | {m['mean_abs']:.3g} | {m['rel']:.2e} | "
            f"{m['adapter_effect_mean_abs']:.3g} |"
        )
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs="+")
    parser.add_argument("--result")
    parser.add_argument("--device", default=None)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument(
        "--render", action="store_true", help="only re-render quant_memory.md from the JSON in --out"
    )
    args = parser.parse_args()
    if args.render:
        result = json.loads((Path(args.out) / "quant_memory.json").read_text())
        write_atomic(Path(args.out) / "quant_memory.md", markdown(result))
        print(markdown(result))
        return
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.worker:
        kind, name = args.worker[0], " ".join(args.worker[1:])
        res = (
            worker_load(name, device)
            if kind == "load"
            else worker_train(name, device, args.steps, args.batch_size)
        )
        Path(args.result).write_text(json.dumps(res))
        return
    import bitsandbytes
    import transformers

    common = ["--device", device, "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    result = {
        "meta": {
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": torch.cuda.get_device_name()
            if device == "cuda"
            else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "cpu_threads": 2,
            "cpu_count": os.cpu_count(),
            "loadavg_start": os.getloadavg()[0],
            "torch": torch.__version__,
            "bitsandbytes": bitsandbytes.__version__,
            "transformers": transformers.__version__,
        },
        "train_config": {"steps": args.steps, "batch_size": args.batch_size, "max_length": 64, "r": 8},
        "load": [],
        "train": [],
    }
    for mode in LOAD_MODES:
        result["load"].append(run_worker(["load", mode, *common]))
        print(json.dumps(result["load"][-1]))
    for name in TRAIN_MODES:
        result["train"].append(run_worker(["train", *name.split(" "), *common]))
        print(json.dumps({k: v for k, v in result["train"][-1].items() if k != "losses"}))
    result["meta"]["loadavg_end"] = os.getloadavg()[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "quant_memory.json", json.dumps(result, indent=2))  # the data first, then the table
    write_atomic(out / "quant_memory.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
