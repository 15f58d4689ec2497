"""Measure what a training process holds beyond the estimator's tensors: the runtime and the allocator's slack.

``peftlab.estimate`` counts live tensor bytes (validated within a few % with glibc's mmap threshold lowered, so
RSS follows live bytes: ``benchmarks/results/estimator/``). A real process also holds the Python / torch /
transformers runtime, and under glibc's default allocator freed heap blocks stay cached, so the step's RSS
grows by more than the live bytes. Each configuration runs in its own subprocess with the default allocator:

* ``imports``: RSS after ``import torch, transformers, peftlab`` (nothing loaded);
* ``after_load``: RSS after building the model (random weights from its config), the method and the optimizer;
  ``runtime`` = after_load − the estimate's weights: the interpreter, the libraries, the model classes' code;
* ``process_peak``: the process's peak RSS (VmHWM) after three AdamW steps (what ``peftlab bench`` reports
  on a CPU: ``ru_maxrss``);
* the estimate's ``weights`` and ``training_peak`` (total peak minus weights) for the same run.

Fitted per device (:data:`peftlab.estimator.process.PROCESS`): ``slack`` = median over configurations of
(process_peak − after_load) / training_peak and ``runtime`` = its median; the expected process peak is
``runtime + weights + slack × training_peak``. The output lists each configuration's measured peak beside
that formula (leave-one-out: each row's slack is fitted on the other rows).

    python benchmarks/process_peak.py [--out benchmarks/results/process_peak]
    python benchmarks/process_peak.py --refit benchmarks/results/process_peak   # refit a saved run
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
GRID = [
    ("minilm-l6", method, batch, seq)
    for method in ("full", "lora", "houlsby", "prefix")
    for batch, seq in ((16, 128), (64, 64))
] + [("smollm2-135m", method, 4, 128) for method in ("full", "lora")]
STEPS = 3


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def worker(model_name: str, method: str, batch: int, seq: int) -> dict:
    import torch
    import transformers  # noqa: F401 - part of the runtime every run holds

    import peftlab

    imports = _kib("VmRSS")
    spec = importlib.util.spec_from_file_location("estimator_bench", HERE / "estimator.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from peftlab.bench.providers import get_provider, head_names
    from peftlab.estimator.estimate import estimate
    from peftlab.estimator.model import load_config
    from peftlab.training.loop import default_loss
    from peftlab.training.memory import make_optimizer
    from peftlab.util.models import auto_class

    kind = bench.MODELS[model_name]["kind"]
    extra = {"num_labels": 2} if kind == "seq-cls" else {}
    torch.manual_seed(0)
    config = load_config(peftlab.resolve_model_path(model_name))
    config = type(config).from_dict({**config.to_dict(), **extra})
    config._attn_implementation = "sdpa"
    model = auto_class(kind).from_config(config)
    heads = head_names(model) if kind == "seq-cls" else []
    provider, params, cfg, quant = bench.method_setup(method, kind, heads)
    model = get_provider(provider)(model, dict(params), {"task_kind": kind, "total_steps": STEPS})
    model.train()
    ids = torch.randint(5, model.config.vocab_size, (batch, seq))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    data["labels"] = ids.clone() if kind == "causal-lm" else torch.randint(0, 2, (batch,))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(trainable, "adamw", lr=1e-5)
    after_load = _kib("VmRSS")
    for _ in range(STEPS):
        default_loss(model, data).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = _kib("VmHWM")
    est = estimate(
        config, cfg, batch, seq, precision="fp32", quant=quant, optimizer="adamw", kind=kind, device="cpu"
    )
    mib = 1024
    return {
        "model": model_name, "method": method, "batch": batch, "seq": seq,
        "runtime_mib": imports / mib, "after_load_mib": after_load / mib, "process_peak_mib": peak / mib,
        "weights_mib": est.weights / 2**20, "training_peak_mib": est.training_peak / 2**20,
        "total_peak_mib": est.total_peak / 2**20, "threads": torch.get_num_threads(),
    }  # fmt: skip


def fit(records: list[dict]) -> dict:
    """The runtime and slack constants, and each row's expected peak with a leave-one-out slack."""
    slack = [(r["process_peak_mib"] - r["after_load_mib"]) / r["training_peak_mib"] for r in records]
    runtime = [r["after_load_mib"] - r["weights_mib"] for r in records]
    for i, r in enumerate(records):
        if "imports_mib" not in r:  # the worker's runtime_mib is the RSS after the imports
            r["imports_mib"] = r.pop("runtime_mib")
        r["slack"], r["runtime_mib"] = slack[i], runtime[i]
        s = statistics.median(slack[:i] + slack[i + 1 :])
        rt = statistics.median(runtime[:i] + runtime[i + 1 :])
        r["expected_loo_mib"] = rt + r["weights_mib"] + s * r["training_peak_mib"]
        r["error_loo"] = r["expected_loo_mib"] / r["process_peak_mib"] - 1
    return {
        "runtime_mib": statistics.median(runtime),
        "runtime_min_mib": min(runtime),
        "runtime_max_mib": max(runtime),
        "slack": statistics.median(slack),
        "slack_min": min(slack),
        "slack_max": max(slack),
        "tensor_only_ratio": statistics.median(r["process_peak_mib"] / r["total_peak_mib"] for r in records),
        "median_abs_error_loo": statistics.median(abs(r["error_loo"]) for r in records),
        "worst_abs_error_loo": max(abs(r["error_loo"]) for r in records),
    }


def write(records: list[dict], meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    summary = fit(records)
    (out / "process_peak.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "records": records}, indent=1)
    )
    lines = [
        f"# Expected process peak on a CPU ({meta['device']}, {meta['date']})",
        "",
        f"`{meta['command']}` (peftlab {meta['commit']}, glibc's default allocator). Each row: its own process, "
        f"{STEPS} AdamW steps (fp32, random tokens). Fitted: runtime **{summary['runtime_mib']:.0f} MiB** (range "
        f"{summary['runtime_min_mib']:.0f}–{summary['runtime_max_mib']:.0f}), slack "
        f"**{summary['slack']:.2f}×** the estimate's training peak (range {summary['slack_min']:.2f}–"
        f"{summary['slack_max']:.2f}). Expected process peak = runtime + weights + slack × training peak: "
        f"leave-one-out median |error| {100 * summary['median_abs_error_loo']:.1f}%, worst "
        f"{100 * summary['worst_abs_error_loo']:.1f}%. The measured process peak is "
        f"{summary['tensor_only_ratio']:.2f}× the estimate's tensor-only total peak (median).",
        "",
        "| model | method | batch × seq | runtime MiB (after load − weights) | after load MiB | process peak MiB | estimate total MiB | "
        "training peak MiB | slack | expected (LOO) MiB | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['batch']} × {r['seq']} | {r['runtime_mib']:.0f} | "
            f"{r['after_load_mib']:.0f} | {r['process_peak_mib']:.0f} | {r['total_peak_mib']:.0f} | "
            f"{r['training_peak_mib']:.0f} | {r['slack']:.2f} | {r['expected_loo_mib']:.0f} | {100 * r['error_loo']:+.1f}% |"
        )
    (out / "process_peak.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/process_peak")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--refit", metavar="DIR", help="refit and rewrite DIR/process_peak.{json,md}")
    args = parser.parse_args()
    if args.refit:
        saved = json.loads((Path(args.refit) / "process_peak.json").read_text())
        write(saved["records"], saved["meta"], Path(args.refit))
        return
    if args.worker:
        name, method, batch, seq = args.worker
        print(json.dumps(worker(name, method, int(batch), int(seq))))
        return
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("MALLOC_MMAP_THRESHOLD_", None)  # glibc's default allocator
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    meta = {
        "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores)", "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/process_peak.py", "commit": commit, "steps": STEPS,
    }  # fmt: skip
    records = []
    for cfg in GRID:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", *map(str, cfg)], capture_output=True, text=True, env=env
        )
        try:
            records.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        except (IndexError, json.JSONDecodeError):
            print(f"{cfg}: failed: {proc.stderr.strip()[-500:]}", file=sys.stderr)
            continue
        print(json.dumps(records[-1]), flush=True)
        if len(records) >= 2:
            write(records, meta, Path(args.out))


if __name__ == "__main__":
    main()
