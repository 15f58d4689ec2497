"""Compile every Triton kernel launch × autotune config × dtype × {sm_80, sm_90} ahead of time (no GPU
needed) and write the table of registers, spills and shared memory per config.

    python benchmarks/kernels/aot_resources.py [--out benchmarks/results/kernels] [--subset full|ci]

Writes ``aot_resources.md`` and ``aot_resources.json`` (Triton version, date, and each kernel's source
hash, which ``tests/kernels/test_aot_compile.py`` compares with the current source so the committed
table cannot go stale). Exit status 1 when any launch breaks a rule (does not compile, spills, shared
memory over the target's limit, or the wrong tensor-core instruction).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path


def markdown(data: dict) -> str:
    from peftlab.kernels.aot import MAX_SHARED

    rows = data["results"]
    bad = [r for r in rows if not r["ok"]]
    lines = [
        f"# Triton kernels compiled ahead of time (Triton {data['triton']}, {data['date']})",
        "",
        "`python benchmarks/kernels/aot_resources.py`: every launch of every kernel in `peftlab.kernels` "
        "(`AOT_LAUNCHES`) × every autotune config the kernel keeps on that target (`prune_configs`) × "
        "dtype × target, compiled with `triton.compile(ASTSource(...), target=GPUTarget('cuda', cc, 32))` "
        "and measured with the wheel's `cuobjdump -res-usage`. No GPU was used: this proves compilation, "
        "instruction selection and resource use, not speed.",
        "",
        f"Rules: compiles; no spills (STACK 0 and LOCAL 0); shared memory (static + dynamic) ≤ the target's "
        f"opt-in limit ({', '.join(f'sm_{cc}: {v} B' for cc, v in MAX_SHARED.items())}); GEMM-shaped launches "
        "emit `wgmma` on sm_90 and `mma.sync` on sm_80, the thin ones (32-row tiles) `mma` (or `wgmma`).",
        "",
        f"**{len(rows)} compiles, {len(bad)} breaking a rule.**",
        "",
        "| launch | dtype | target | config | registers | stack B | local B | shared B | tensor cores | ok |",
        "|---|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        ok = (
            "yes"
            if r["ok"]
            else "**no**: " + "; ".join(r["problems"]) + (f" ({r['error']})" if r["error"] else "")
        )
        lines.append(
            f"| {r['launch']} | {r['dtype']} | sm_{r['cc']} | {r['config']} | {r['registers']} | {r['stack']} | "
            f"{r['local']} | {r['shared']} | {r['tensor_core']} | {ok} |"
        )
    lines += [
        "",
        "Kernel source hashes (Triton `cache_key`): "
        + ", ".join(f"`{k}` {v[:12]}" for k, v in sorted(data["hashes"].items())),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/kernels")
    parser.add_argument("--subset", default="full", choices=["full", "ci"])
    args = parser.parse_args()
    from peftlab.kernels.aot import run_subprocess

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = run_subprocess(args.subset, Path(tmp) / "aot.json")
    data["date"] = datetime.date.today().isoformat()
    data["subset"] = args.subset
    for name, text in (
        ("aot_resources.json", json.dumps(data, indent=1)),
        ("aot_resources.md", markdown(data)),
    ):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)  # atomic
    bad = [r for r in data["results"] if not r["ok"]]
    print(f"{len(data['results'])} compiles, {len(bad)} breaking a rule; wrote {out / 'aot_resources.md'}")
    for r in bad:
        print(
            f"  {r['launch']} {r['dtype']} sm_{r['cc']} {r['config']}: {'; '.join(r['problems'])} {r['error']}"
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
