"""Time ``import peftlab`` in fresh interpreters: total, and the part beyond importing torch (best of N).

    ../shared/tools/quiet-run .venv/bin/python benchmarks/import_time.py --runs 5

Writes benchmarks/results/import_time.json. Goal: under 0.5 s beyond torch on a quiet machine (torch alone takes about 2.2 s on our 2-core CPU box).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

PROBE = """
import sys, time, json
start = time.perf_counter()
import torch
torch_s = time.perf_counter() - start
import peftlab
total_s = time.perf_counter() - start
print(json.dumps({"total_s": total_s, "torch_s": torch_s, "beyond_torch_s": total_s - torch_s}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "import_time.json"))
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as cwd:
        for _ in range(args.runs):
            proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=cwd, check=True)
            runs.append(json.loads(proc.stdout))
    best = {key: round(min(r[key] for r in runs), 3) for key in runs[0]}
    result = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              "python": platform.python_version(), "runs": args.runs, "best": best}  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"import peftlab: {best['total_s']:.2f} s, torch {best['torch_s']:.2f} s, "
          f"beyond torch {best['beyond_torch_s']:.2f} s (best of {args.runs})")  # fmt: skip


if __name__ == "__main__":
    main()
