"""One LoRA adapter before and after the named-slot redesign, interleaved, same machine, same run.

``before`` is peftlab at the commit before the redesign (a git worktree; its own ``efficiency.py``
worker, its own package on PYTHONPATH); ``after`` is this checkout; HF PEFT LoRA is the peer, from
this checkout's worker. Each config is its own process; rounds are interleaved (before, after, peer,
before, ...) and each round's ratios are taken within the round.

    git worktree add /tmp/peftlab-before f8f0ddf
    python benchmarks/slot_overhead.py --before /tmp/peftlab-before --rounds 3 --out benchmarks/results/slot_overhead
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(cmd: list[str], env: dict) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="worktree of peftlab before the redesign")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/slot_overhead")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    before_env = {**env, "PYTHONPATH": args.before}
    configs = {
        "before": ([sys.executable, f"{args.before}/benchmarks/efficiency.py"], before_env, "peftlab-lora"),
        "after": ([sys.executable, str(HERE / "efficiency.py")], env, "peftlab-lora"),
        "hf-peft": ([sys.executable, str(HERE / "efficiency.py")], env, "hf-peft-lora"),
    }
    rounds = []
    for i in range(args.rounds):
        load = os.getloadavg()[0]
        row = {}
        for name, (cmd, e, config) in configs.items():
            row[name] = run(cmd + ["--worker", args.model, config, "--steps", str(args.steps)], e)
            print(f"round {i + 1} {name}: {row[name]['median_step_s']:.3f} s/step, peak {row[name]['peak_rss_mb']:.0f} MB",
                  flush=True)
        row["load"] = load
        rounds.append(row)
    ratio = [r["after"]["median_step_s"] / r["before"]["median_step_s"] for r in rounds]
    vs_peer = [r["after"]["median_step_s"] / r["hf-peft"]["median_step_s"] for r in rounds]
    mem = [r["after"]["peak_rss_mb"] / r["before"]["peak_rss_mb"] for r in rounds]
    loss = [abs(r["after"]["last_loss"] - r["before"]["last_loss"]) for r in rounds]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# One LoRA adapter before/after the slot redesign ({args.model}, {datetime.date.today()}, CPU)",
        "",
        "| round | load | before s/step | after s/step | HF PEFT s/step | after/before | after/HF PEFT | peak MB before | after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rounds):
        lines.append(
            f"| {i + 1} | {r['load']:.2f} | {r['before']['median_step_s']:.3f} | {r['after']['median_step_s']:.3f} | "
            f"{r['hf-peft']['median_step_s']:.3f} | {ratio[i]:.3f} | {vs_peer[i]:.3f} | "
            f"{r['before']['peak_rss_mb']:.0f} | {r['after']['peak_rss_mb']:.0f} |"
        )
    lines += [
        "",
        f"after/before time: median {statistics.median(ratio):.3f} [{min(ratio):.3f}–{max(ratio):.3f}]; "
        f"after/HF PEFT: median {statistics.median(vs_peer):.3f} [{min(vs_peer):.3f}–{max(vs_peer):.3f}]; "
        f"peak memory after/before: median {statistics.median(mem):.3f}; |last-loss difference| max {max(loss):.2e}",
    ]
    (out / "slot_overhead.md").write_text("\n".join(lines) + "\n")
    (out / "slot_overhead.json").write_text(json.dumps(rounds, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
