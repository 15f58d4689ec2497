"""CPU: N LoRA jobs of a learning-rate x rank grid packed in one process (peftlab.train_many) against the same jobs
one after another, each in its own process (as a sweep runs them). MiniLM-L6 on SST-2, batch 32 per job.

Per round: the packed process, then the N separate processes; each process reports its training seconds, its
wall seconds (model load included) and its peak RSS. Ratios per round: throughput = (Σ separate training s) /
(packed training s); memory = packed peak / Σ separate peaks. Results also record the largest difference between
each job's packed and separate losses (the runs are the same computation).

    OMP_NUM_THREADS=1 ../shared/tools/quiet-run .venv/bin/python benchmarks/train_many_cpu.py \
        --steps 40 --rounds 2 --out benchmarks/results/train_many
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

LRS = [5.0e-4, 1.0e-3, 2.0e-3, 4.0e-3]
RANKS = [4, 8]  # lora-qv of recipes-search.yaml: r in {4, 8} x 4 learning rates = 8 runs


def grid(n: int) -> list[tuple[float, int]]:
    return [(lr, r) for r in RANKS for lr in LRS][:n]


def child(args) -> dict:
    import torch

    import peftlab
    from peftlab.bench.tasks import data_dir, get_task
    from peftlab.training.many import Recipe, TrainJob, train_many
    from peftlab.util.models import load_model

    start = time.perf_counter()
    task = get_task("sst2")
    rows = task.load(data_dir(args.data), "train", 20000, 0)
    torch.manual_seed(0)
    model, tokenizer = load_model("minilm-l6", kind=task.kind, **task.model_kwargs())
    which = grid(args.jobs) if args.index is None else [grid(args.jobs)[args.index]]
    jobs = []
    for lr, r in which:
        name = f"lr{lr:g}-r{r}".replace(".", "_")
        data = task.batches(tokenizer, rows, 32, 64, 0, True)
        cfg = peftlab.LoraConfig(r=r, alpha=2 * r, dropout=0.05, modules_to_save=["classifier"], adapter_name=name)
        recipe = Recipe(lr=lr, steps=args.steps, warmup_steps=round(0.06 * args.steps), max_grad_norm=1.0)
        jobs.append(TrainJob(cfg, data, recipe, seed=0))
    t0 = time.perf_counter()
    results = train_many(model, jobs)
    train_s = time.perf_counter() - t0
    return {
        "train_s": train_s,
        "wall_s": time.perf_counter() - start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "losses": {n: r.losses for n, r in results.items()},
        "threads": torch.get_num_threads(),
    }


def run_child(extra: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *extra], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--index", type=int, default=None)
    args = ap.parse_args()
    common = ["--jobs", str(args.jobs), "--steps", str(args.steps)] + (["--data", args.data] if args.data else [])
    if args.child:
        print(json.dumps(child(args)))
        return
    rounds = []
    for k in range(args.rounds):
        packed = run_child(common)
        separate = [run_child([*common, "--index", str(i)]) for i in range(args.jobs)]
        diff = max(
            abs(a - b)
            for s in separate
            for name, losses in s["losses"].items()
            for a, b in zip(losses, packed["losses"][name])
        )
        row = {
            "packed_train_s": packed["train_s"],
            "packed_wall_s": packed["wall_s"],
            "packed_peak_rss_mb": packed["peak_rss_mb"],
            "separate_train_s": sum(s["train_s"] for s in separate),
            "separate_wall_s": sum(s["wall_s"] for s in separate),
            "separate_peak_rss_mb_sum": sum(s["peak_rss_mb"] for s in separate),
            "separate_peak_rss_mb_max": max(s["peak_rss_mb"] for s in separate),
            "max_loss_diff": diff,
        }
        row["train_throughput_ratio"] = row["separate_train_s"] / row["packed_train_s"]
        row["wall_ratio"] = row["separate_wall_s"] / row["packed_wall_s"]
        row["memory_ratio_vs_sum"] = row["packed_peak_rss_mb"] / row["separate_peak_rss_mb_sum"]
        rounds.append(row)
        print(json.dumps({"round": k, **row}), flush=True)

    def summary(key):
        values = [r[key] for r in rounds]
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    record = {
        "what": f"{args.jobs} LoRA jobs (lr x r grid of lora-qv in recipes-search.yaml), MiniLM-L6, SST-2, "
        f"batch 32/job, max_length 64, {args.steps} steps each: packed (train_many) vs one process per job",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "rounds": rounds,
        "train_throughput_ratio": summary("train_throughput_ratio"),
        "wall_ratio": summary("wall_ratio"),
        "memory_ratio_vs_sum": summary("memory_ratio_vs_sum"),
        "command": " ".join(sys.argv),
    }
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"pack{args.jobs}_steps{args.steps}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
