"""CPU: N LoRA jobs of a learning-rate x rank grid three ways (issue 34): packed in one process
(peftlab.train_many), one process per job one after another (as a sweep runs them), and one process per job two
at a time (each on half the threads). MiniLM-L6 on SST-2, batch 32 per job.

Per round, each way's wall time (model loads included: what a sweep costs) and peak RSS; ratios per round:
throughput = wall(other way) / wall(packed); memory = packed peak / Σ of the separate processes' peaks. Results
also record the largest difference between each job's packed and separate losses (the same computation).

    ../shared/tools/quiet-run .venv/bin/python benchmarks/train_many_cpu.py \
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
    results = train_many(model, jobs, jobs_per_pass=args.jobs_per_pass)
    train_s = time.perf_counter() - t0
    return {
        "train_s": train_s,
        "wall_s": time.perf_counter() - start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "losses": {n: r.losses for n, r in results.items()},
        "threads": torch.get_num_threads(),
    }


def run_child(extra: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, __file__, "--child", *extra], capture_output=True, text=True, check=True,
                         env=env)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def start_child(extra: list[str], threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, __file__, "--child", *extra], stdout=subprocess.PIPE, text=True, env=env)


def two_at_once(common: list[str], jobs: int, threads: int) -> list[dict]:
    """The jobs as separate processes, two running at any time (each on half the threads)."""
    pending, running, done = list(range(jobs)), [], []
    while pending or running:
        while pending and len(running) < 2:
            running.append(start_child([*common, "--index", str(pending.pop(0))], max(1, threads // 2)))
        proc = running.pop(0)
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"a child failed with {proc.returncode}")
        done.append(json.loads(out.strip().splitlines()[-1]))
    return done


def _max_loss_diff(separate: list[dict], packed: dict) -> float:
    return max(
        abs(a - b)
        for s in separate
        for name, losses in s["losses"].items()
        for a, b in zip(losses, packed["losses"][name])
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of a lone process")
    ap.add_argument("--jobs-per-pass", type=int, default=None, help="train_many's jobs_per_pass for the packed run")
    ap.add_argument("--ways", default="packed,sequential,two", help="which of packed, sequential, two to run")
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--index", type=int, default=None)
    args = ap.parse_args()
    common = ["--jobs", str(args.jobs), "--steps", str(args.steps)] + (["--data", args.data] if args.data else [])
    if args.child:
        print(json.dumps(child(args)))
        return
    ways = args.ways.split(",")
    pack_extra = ["--jobs-per-pass", str(args.jobs_per_pass)] if args.jobs_per_pass else []
    job_steps = args.jobs * args.steps
    rounds = []
    for k in range(args.rounds):
        row: dict = {}
        packed = None
        if "packed" in ways:
            t0 = time.perf_counter()
            packed = run_child([*common, *pack_extra], args.threads)
            row["packed"] = {"wall_s": time.perf_counter() - t0, "train_s": packed["train_s"],
                             "peak_rss_mb": packed["peak_rss_mb"]}  # fmt: skip
        if "sequential" in ways:
            t0 = time.perf_counter()
            separate = [run_child([*common, "--index", str(i)], args.threads) for i in range(args.jobs)]
            row["sequential"] = {"wall_s": time.perf_counter() - t0,
                                 "train_s": sum(s["train_s"] for s in separate),
                                 "peak_rss_mb_max": max(s["peak_rss_mb"] for s in separate),
                                 "peak_rss_mb_sum": sum(s["peak_rss_mb"] for s in separate)}  # fmt: skip
            if packed:
                row["max_loss_diff_packed_vs_sequential"] = _max_loss_diff(separate, packed)
        if "two" in ways:
            t0 = time.perf_counter()
            separate = two_at_once(common, args.jobs, args.threads)
            row["two"] = {"wall_s": time.perf_counter() - t0,
                          "peak_rss_mb_max": max(s["peak_rss_mb"] for s in separate),
                          "peak_rss_mb_sum": sum(s["peak_rss_mb"] for s in separate)}  # fmt: skip
        for way in ways:
            row[way]["job_steps_per_s"] = job_steps / row[way]["wall_s"]
        if packed and "sequential" in ways:
            row["throughput_vs_sequential"] = row["sequential"]["wall_s"] / row["packed"]["wall_s"]
            row["memory_vs_sum_of_separate"] = row["packed"]["peak_rss_mb"] / row["sequential"]["peak_rss_mb_sum"]
        if packed and "two" in ways:
            row["throughput_vs_two"] = row["two"]["wall_s"] / row["packed"]["wall_s"]
        rounds.append(row)
        print(json.dumps({"round": k, **row}), flush=True)

    def summary(key):
        values = [r[key] for r in rounds if key in r]
        return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else None

    record = {
        "what": f"{args.jobs} LoRA jobs (lr x r grid of lora-qv in recipes-search.yaml), MiniLM-L6, SST-2, "
        f"batch 32/job, max_length 64, {args.steps} steps each: packed (train_many, jobs_per_pass="
        f"{args.jobs_per_pass}) vs one process per job one after another vs two processes at once",
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "rounds": rounds,
        "throughput_vs_sequential": summary("throughput_vs_sequential"),
        "throughput_vs_two": summary("throughput_vs_two"),
        "memory_vs_sum_of_separate": summary("memory_vs_sum_of_separate"),
        "command": " ".join(sys.argv),
    }
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        suffix = f"_pass{args.jobs_per_pass}" if args.jobs_per_pass else ""
        path = out / f"ways{args.jobs}_steps{args.steps}{suffix}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
