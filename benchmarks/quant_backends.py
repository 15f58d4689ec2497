"""Backend table: LoRA on a base quantized by each backend, against fp32 LoRA (CPU).

For each configuration and round, in its own fresh subprocess (so peak RSS does not leak between them): load the
model in fp32 (SmolLM2-135M, or the 672M synthetic Llama of ``benchmarks/efficiency.py``), quantize its block
linears (bitsandbytes NF4+double quant / FP4 / int8, torchao int8 / int4 weight-only, FP8 block-scaled e4m3
128×128, MXFP4), wrap LoRA (r=8, alpha=16, every block linear; seeded), train ``--steps`` AdamW steps (lr 1e-3) on
SST-2 sentences as causal-LM text (batch ``--batch`` × ``--seq`` tokens, the same batches in every configuration),
and record:

* **bytes**: the stored bytes and bits per parameter of the quantized linears and the model footprint
  (``peftlab.memory_report``; MB = 10⁶ bytes);
* **output error of the quantized base** against the fp32 base, before any adapter, on a fixed evaluation batch
  (4 × ``--seq`` SST-2 tokens): mean |Δ logits| / mean |fp32 logits| and the change of the causal-LM loss;
* **peak memory of the LoRA training steps**: the rise of VmHWM over the RSS after setup (peak reset with
  ``/proc/self/clear_refs``);
* **step time**: the median of steps 2.. of the run, and per round its ratio to fp32 LoRA's step time in the
  same round (the table shows the median ratio [min–max] over rounds). Run under ``/work/shared/tools/quiet-run``
  (it prints the load average); on a shared machine only the ratios are meaningful;
* **merge / unmerge**: ``peftlab.merge`` (plain requantization) changes the adapted model's logits on the
  evaluation batch by ``merge_rel`` (mean |Δ| / mean |logits|; 0 = exact merge); ``peftlab.unmerge`` must give
  back every stored base weight bit for bit (``unmerge_exact``: dequantized weights and packed data compared
  with ``torch.equal``) and the unmerged logits (``unmerge_max_abs_logits``).

    /work/shared/tools/quiet-run nice -n 10 .venv/bin/python benchmarks/quant_backends.py --rounds 2 --steps 4 \\
        --out benchmarks/results/quant_backends

Writes ``quant_backends_<model>.json`` and ``quant_backends_<model>.md`` into ``--out``.
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
    "bitsandbytes nf4 (+dq)": {
        "backend": "bitsandbytes",
        "bits": 4,
        "quant_type": "nf4",
        "double_quant": True,
    },
    "bitsandbytes fp4": {"backend": "bitsandbytes", "bits": 4, "quant_type": "fp4", "double_quant": False},
    "bitsandbytes int8": {"backend": "bitsandbytes", "bits": 8},
    "torchao int8": {"backend": "torchao", "scheme": "int8"},
    "torchao int4 (g64)": {"backend": "torchao", "scheme": "int4", "group_size": 64},
    "fp8 e4m3 (128×128 blocks)": {"backend": "fp8"},
    "mxfp4 (e2m1 blocks of 32)": {"backend": "mxfp4"},
}
MODELS = ("smollm2-135m", "llama-672m")


def _mem() -> dict[str, int]:
    fields = dict(
        line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line
    )
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def model_path(model: str) -> str:
    import peftlab

    if model == "llama-672m":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from efficiency import LLAMA_672M, synthetic_dir

        return str(synthetic_dir(model, LLAMA_672M))
    return peftlab.resolve_model_path(model)


def batches(tokenizer, n: int, batch: int, seq: int, offset: int = 0) -> list[dict]:
    """n batches of ``batch`` SST-2 training sentences, padded / cut to ``seq`` tokens, labels = inputs."""
    import torch

    from peftlab.bench.tasks import data_dir, read_sst2

    rows = read_sst2(Path(data_dir()), "train")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()[offset:]
    out = []
    for i in range(n):
        texts = [rows[order[i * batch + j]][0] for j in range(batch)]
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return out


def stored(model) -> list:
    """(dequantized weight, packed data) clones of every quantized base layer (weight for float layers)."""
    from peftlab.backends.quant.base import backend_of

    out = []
    for module in model.modules():
        if hasattr(module, "base_layer"):
            base = module.base_layer
            backend = backend_of(base)
            if backend is None:
                out.append((base.weight.detach().clone(), None))
            else:
                w = base.weight
                raw = getattr(w, "qdata", None)
                raw = raw if raw is not None else w.data
                out.append((backend.dequantize(base).detach().clone(), raw.clone()))
    return out


def run_one(name: str, model_name: str, steps: int, batch: int, seq: int, threads: int = 2) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import peftlab

    warnings.simplefilter("ignore")
    torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
    path = model_path(model_name)
    tok = AutoTokenizer.from_pretrained(
        peftlab.resolve_model_path("smollm2-135m")
    )  # 672M: SmolLM2's tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    vocab = model.config.vocab_size
    ev = batches(tok, 1, 4, seq, offset=50_000)[0]
    ev = {k: v.clamp_max(vocab - 1) if k != "attention_mask" else v for k, v in ev.items()}
    with torch.no_grad():
        ref = model(**ev)
    spec = CONFIGS[name]
    t0 = time.perf_counter()
    if spec is not None:
        peftlab.quantize(model, **spec)
    quantize_s = time.perf_counter() - t0
    with torch.no_grad():
        out = model(**ev)
    err = (out.logits - ref.logits).abs().mean().item() / ref.logits.abs().mean().item()
    report = peftlab.memory_report(model)
    torch.manual_seed(1)
    peftlab.wrap(model, peftlab.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    data = [{k: v.clamp_max(vocab - 1) if k != "attention_mask" else v for k, v in b.items()}
            for b in batches(tok, steps, batch, seq)]  # fmt: skip
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
    # merge / unmerge on the trained adapter
    model.eval()
    with torch.no_grad():
        adapted_out = model(**ev)
    adapted = adapted_out.logits
    before = stored(model)
    peftlab.merge(model)
    with torch.no_grad():
        merged = model(**ev).logits
    peftlab.unmerge(model)
    with torch.no_grad():
        unmerged = model(**ev).logits
    after = stored(model)
    exact_w = all(torch.equal(a[0], b[0]) for a, b in zip(before, after))
    exact_raw = all(a[1] is None or torch.equal(a[1], b[1]) for a, b in zip(before, after))
    q = report["quantized_linear"]
    return {
        "config": name,
        "model": model_name,
        "quantized_linears": q["modules"],
        "quantized_linear_bytes": q.get("bytes"),
        "bits_per_param_quantized_linears": q["bits_per_param"],
        "model_mb": report["total_mb"],
        "quantize_s": quantize_s,
        "output_rel_err_vs_fp32": err,
        "loss_fp32_base": ref.loss.item(),
        "loss_quantized_base": out.loss.item(),
        "step_s": times,
        "step_s_median": statistics.median(times[1:] if len(times) > 1 else times),
        "peak_rss_rise_training_mb": (end["VmHWM"] - setup["VmRSS"]) / 1e6 if reset else None,
        "losses": losses,
        "loss_eval_after_training": adapted_out.loss.item(),
        "loss_train_last10_mean": statistics.mean(losses[-10:]),
        "merge_rel": (merged - adapted).abs().mean().item() / adapted.abs().mean().item(),
        "merge_max_abs": (merged - adapted).abs().max().item(),
        "adapter_effect_rel": None,
        "unmerge_exact_weights": exact_w,
        "unmerge_exact_packed": exact_raw,
        "unmerge_max_abs_logits": (unmerged - adapted).abs().max().item(),
        "layers_compared": len(before),
    }


BYTES_SPECS = {  # (backend, scheme, options of bytes_for) per quantized row
    "bitsandbytes nf4 (+dq)": ("bitsandbytes", "nf4", {"double_quant": True}),
    "bitsandbytes nf4": ("bitsandbytes", "nf4", {"double_quant": False}),
    "bitsandbytes fp4": ("bitsandbytes", "fp4", {"double_quant": False}),
    "bitsandbytes int8": ("bitsandbytes", "int8", {}),
    "torchao int8": ("torchao", "int8", {}),
    "torchao int4 (g64)": ("torchao", "int4", {"group_size": 64}),
    "torchao float8": ("torchao", "float8", {}),
    "fp8 e4m3 (128×128 blocks)": ("fp8", "fp8", {}),
    "mxfp4 (e2m1 blocks of 32)": ("mxfp4", "mxfp4", {}),
}


def bytes_rows(model_name: str) -> dict:
    """Stored bytes of every backend for the model's block linears, from each backend's ``bytes_for`` (which
    ``tests/backends/test_quant_backends.py::test_estimator_bytes_equal_what_each_backend_stores`` checks against
    what the backend stores); the model is built on the meta device (no weights read). The rest of the model
    (embeddings, norms, output head; tied weights once) stays fp32."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftlab.backends.quant.base import get_backend

    config = AutoConfig.from_pretrained(model_path(model_name))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    seen, rest = set(), 0
    linear_weights = {id(m.weight) for m in linears}
    for p in model.parameters():
        if id(p) in seen or id(p) in linear_weights:
            continue
        seen.add(id(p))
        rest += p.numel() * 4
    n = sum(m.weight.numel() for m in linears)
    rows = [
        {"config": "fp32", "linear_bytes": 4 * n, "bits_per_param": 32.0, "model_mb": (4 * n + rest) / 1e6}
    ]
    for name, (backend, scheme, opts) in BYTES_SPECS.items():
        b = sum(
            get_backend(backend).bytes_for(m.out_features, m.in_features, scheme, **opts) for m in linears
        )
        rows.append(
            {"config": name, "linear_bytes": b, "bits_per_param": 8 * b / n, "model_mb": (b + rest) / 1e6}
        )
    return {
        "model": model_name,
        "linears": len(linears),
        "linear_params": n,
        "other_fp32_bytes": rest,
        "rows": rows,
    }


def bytes_table(tables: list[dict]) -> str:
    lines = [
        "# Stored bytes of each quantized-base backend (block linears quantized, the rest fp32)",
        "",
        "From each backend's `bytes_for` (checked against what the backend stores by "
        "`tests/backends/test_quant_backends.py::test_estimator_bytes_equal_what_each_backend_stores`), on the "
        "model built on the meta device. MB = 10⁶ bytes. Command: see COMMAND.",
        "",
        "| model | backend | bits/param (block linears) | block linears MB | model MB |",
        "|---|---|---:|---:|---:|",
    ]
    for t in tables:
        for r in t["rows"]:
            lines.append(
                f"| {t['model']} | {r['config']} | {r['bits_per_param']:.3f} | {r['linear_bytes'] / 1e6:.1f} "
                f"| {r['model_mb']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def _ratio_cell(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}×"
    return f"{statistics.median(values):.2f}× [{min(values):.2f}–{max(values):.2f}]"


def table(rounds: list[list[dict]], meta: dict) -> str:
    first = rounds[0]
    ref = next(r for r in first if r["config"] == "fp32 LoRA")
    ratios: dict[str, list[float]] = {}
    for rnd in rounds:
        base = next(r for r in rnd if r["config"] == "fp32 LoRA")["step_s_median"]
        for r in rnd:
            ratios.setdefault(r["config"], []).append(r["step_s_median"] / base)
    lines = [
        f"# Quantized-base backends: {meta['model']} + LoRA (r=8, every block linear), CPU",
        "",
        f"{meta['date']}, {meta['machine']}, torch {meta['torch']}, bitsandbytes {meta['bitsandbytes']}, "
        f"torchao {meta['torchao']}. {meta['steps']} AdamW steps (lr 1e-3), batch {meta['batch']} × {meta['seq']} "
        f"tokens of SST-2 sentences, the same batches in every row; {len(rounds)} round(s), each configuration in "
        f"its own process. Load average {meta['load_before']} before, {meta['load_after']} after (2 cores shared "
        "with other jobs): step times are only meaningful as ratios to fp32 LoRA in the same round "
        "(median [min–max] over rounds; with fewer than 3 steps a run has no steady step and none is shown). "
        "Bytes, memory and errors do not depend on the load. "
        "Command: see COMMAND. MB = 10⁶ bytes.",
        "",
        "| backend | bits/param (quantized linears) | quantized linears MB | model MB | output error vs fp32 base "
        "| LoRA step: peak RSS rise MB (× fp32) | step time × fp32 "
        f"| eval loss after {meta['steps']} steps (Δ vs fp32 LoRA) | merge: logit change | unmerge bit-exact |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in first:
        bpp = (
            f"{r['bits_per_param_quantized_linears']:.2f}" if r["bits_per_param_quantized_linears"] else "32"
        )
        qmb = f"{r['quantized_linear_bytes'] / 1e6:.1f}" if r["quantized_linear_bytes"] else "-"
        rss = r["peak_rss_rise_training_mb"]
        base_rss = ref["peak_rss_rise_training_mb"]
        rss_s = f"{rss:.0f} ({rss / base_rss:.2f}×)" if rss and base_rss else "-"
        err = "0 (reference)" if r["config"] == "fp32 LoRA" else f"{100 * r['output_rel_err_vs_fp32']:.2f}%"
        exact = r["unmerge_exact_weights"] and r["unmerge_exact_packed"]
        after = r.get("loss_eval_after_training")
        if after is None:
            loss_s = "not measured"
        elif r["config"] == "fp32 LoRA":
            loss_s = f"{after:.4f}"
        else:
            loss_s = f"{after:.4f} ({after - ref['loss_eval_after_training']:+.4f})"
        lines.append(
            f"| {r['config']} | {bpp} | {qmb} | {r['model_mb']:.0f} | {err} | {rss_s} "
            f"| {_ratio_cell(ratios[r['config']]) if meta['steps'] >= 3 else 'not measured'} | {loss_s} | {100 * r['merge_rel']:.3g}% | {'yes' if exact else 'NO'} |"
        )
    lines += [
        "",
        "Output error: mean |logits − fp32 logits| / mean |fp32 logits| of the quantized base (no adapter) on 4 × "
        f"{meta['seq']} evaluation tokens; causal-LM loss there: fp32 {ref['loss_fp32_base']:.4f}, "
        + ", ".join(
            f"{r['config']} {r['loss_quantized_base']:.4f}" for r in first if r["config"] != "fp32 LoRA"
        )
        + ". Merge: mean |logits after `merge` − logits of the unmerged adapter| / mean |logits| (plain "
        "requantization of W + ΔW; fp32 merges in float). Unmerge bit-exact: every base weight (dequantized, and "
        "the packed data) equal to before the merge. Eval loss after training: the causal-LM loss of the adapted "
        "model on that evaluation batch (never trained on), the same batches and seed in every row.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads per run (1 on a shared machine)"
    )
    parser.add_argument("--out", default="benchmarks/results/quant_backends")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--tag", default="", help="suffix of the result files' names (e.g. steps50)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--bytes-only", action="store_true", help="only the stored bytes of every backend, "
                        "for every model, from the backends' byte counts (seconds, no weights loaded)")  # fmt: skip
    args = parser.parse_args()
    if args.bytes_only:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        tables = [bytes_rows(m) for m in MODELS]
        (out / "quant_backends_bytes.json").write_text(json.dumps(tables, indent=1))
        (out / "quant_backends_bytes.md").write_text(bytes_table(tables))
        print(bytes_table(tables))
        return
    if args.one:
        print(json.dumps(run_one(args.one, args.model, args.steps, args.batch, args.seq, args.threads)))
        return
    bad = [c for c in args.configs if c not in CONFIGS]
    if bad:
        parser.error(f"unknown configs {bad}; known: {list(CONFIGS)}")
    if "fp32 LoRA" not in args.configs:
        parser.error("--configs must include 'fp32 LoRA' (the reference)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    rounds = []
    for rnd in range(args.rounds):
        results = []
        for name in args.configs:
            cmd = [sys.executable, __file__, "--one", name, "--model", args.model, "--steps", str(args.steps),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            shown = {k: v for k, v in results[-1].items() if k not in ("losses", "step_s")}
            print(time.strftime("%H:%M:%S"), f"round {rnd}", shown, flush=True)
        rounds.append(results)
        (out / f"quant_backends_{args.model}{'_' + args.tag if args.tag else ''}.json").write_text(
            json.dumps({"rounds": rounds}, indent=1)
        )
    import bitsandbytes
    import torch
    import torchao

    meta = {
        "date": dt.date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs", "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
        "torchao": torchao.__version__, "model": args.model, "steps": args.steps, "batch": args.batch,
        "seq": args.seq, "threads": args.threads, "load_before": f"{load_before:.2f}", "load_after": f"{os.getloadavg()[0]:.2f}",
    }  # fmt: skip
    (out / f"quant_backends_{args.model}{'_' + args.tag if args.tag else ''}.json").write_text(
        json.dumps({"meta": meta, "rounds": rounds}, indent=1)
    )
    (out / f"quant_backends_{args.model}{'_' + args.tag if args.tag else ''}.md").write_text(
        table(rounds, meta)
    )
    print(table(rounds, meta))


if __name__ == "__main__":
    main()
