"""Run a sweep: one subprocess per run, results appended atomically to ``results.jsonl``, resumable.

A run whose ``run_id`` is already recorded with status ``ok`` is skipped, so a sweep killed
part-way and started again with the same command loses nothing; failed runs are retried and
their record replaced.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..io import atomic_write_json

RESULTS = "results.jsonl"


def read_results(out_dir: str | Path) -> list[dict]:
    path = Path(out_dir) / RESULTS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_result(out_dir: str | Path, record: dict) -> None:
    """Add (or replace, by run_id) one record; the file is rewritten via a temp file + rename."""
    path = Path(out_dir) / RESULTS
    records = [r for r in read_results(out_dir) if r.get("run_id") != record["run_id"]] + [record]
    fd, tmp = tempfile.mkstemp(prefix=".results.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_in_subprocess(spec: dict, work: Path, timeout: float | None) -> dict:
    spec_path, result_path = work / f"{spec['run_id']}.spec.json", work / f"{spec['run_id']}.result.json"
    atomic_write_json(spec_path, spec)
    result_path.unlink(missing_ok=True)
    start = time.perf_counter()
    env = {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        # keep the working directory off sys.path: a repo checkout's top-level kernels/ folder must not
        # shadow the PyPI package `kernels` that bitsandbytes imports
        "PYTHONSAFEPATH": "1",
    }
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "peftlab.bench.worker", str(spec_path), str(result_path)],
            timeout=timeout,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        code = proc.returncode
    except subprocess.TimeoutExpired:
        return {**spec, "status": "failed", "error": f"timed out after {timeout:.0f} s"}
    if result_path.is_file():
        return json.loads(result_path.read_text())
    return {
        **spec,
        "status": "failed",
        "error": f"worker exited with code {code} and wrote no result "
        f"(killed for memory?) after {time.perf_counter() - start:.0f} s",
    }


def run_sweep(
    specs: list[dict], out_dir: str | Path, timeout: float | None = None, progress: bool = True
) -> list[dict]:
    """Run every spec not finished yet; returns all records of this sweep's runs."""
    out = Path(out_dir)
    work = out / "runs"
    work.mkdir(parents=True, exist_ok=True)
    done = {r["run_id"] for r in read_results(out) if r.get("status") == "ok"}
    todo = [s for s in specs if s["run_id"] not in done]
    if progress and len(todo) < len(specs):
        print(f"resuming: {len(specs) - len(todo)} of {len(specs)} runs already finished in {out / RESULTS}")
    bar = tqdm(todo, desc="sweep", disable=not progress, dynamic_ncols=True)
    for spec in bar:
        bar.set_postfix_str(f"{spec['label']} {spec['task']} {spec['model']} seed={spec['seed']}")
        record = run_in_subprocess({**spec, "train": {**spec["train"], "progress": progress}}, work, timeout)
        record["train"] = spec["train"]
        append_result(out, record)
        if record.get("status") != "ok" and progress:
            tqdm.write(
                f"run {spec['run_id']} ({spec['label']} on {spec['task']}) failed: {record.get('error')}"
            )
    ids = {s["run_id"] for s in specs}
    return [r for r in read_results(out) if r["run_id"] in ids]
