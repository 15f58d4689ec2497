"""Shared helpers of the own-task measurements: SST-2 converted into user files (in a temporary folder),
subprocess runs of the CLI with one thread each (a contended 2-thread pool is several times slower here),
and result writing."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("PEFTLAB_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "benchmarks" / "results" / "own_task"
PROMPT = "Review: {sentence}\nSentiment?"
WORDS = {0: "negative", 1: "positive"}


def sst2_rows(split: str) -> list[tuple[str, int]]:
    """SST-2 rows read as peftlab.bench.tasks reads them (TSV, no quoting; sentences unchanged)."""
    with open(DATA / "sst2" / f"{split}.tsv", newline="") as f:
        return [(r["sentence"], int(r["label"])) for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def write_csv(rows: list[tuple[str, int]], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence", "label"])
        writer.writerows(rows)
    return path


def write_instructions(rows: list[tuple[str, int]], path: Path) -> Path:
    with open(path, "w") as f:
        for sentence, label in rows:
            f.write(json.dumps({"prompt": PROMPT.format(sentence=sentence.strip()), "response": WORDS[label]}) + "\n")
    return path


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}  # fmt: skip


def run(args: list[str], log: Path) -> float:
    """Run ``python -m <args>`` from the repository root, output appended to ``log``; returns seconds."""
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ python -m {' '.join(args)}\n")
        f.flush()
        subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env(), stdout=f, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def write_result(name: str, data: dict, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
