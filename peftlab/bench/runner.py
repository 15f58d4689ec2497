"""Run a sweep: one subprocess per run, results appended atomically to ``results.jsonl``, resumable.

A run whose ``run_id`` is already recorded with status ``ok`` is skipped, so a sweep killed
part-way and started again with the same command loses nothing; failed runs are retried and
their record replaced. Several sweep processes may share one output folder (one per core): each run is
claimed before it starts (``runs/<run_id>.claim``), so they divide the runs between them as they go.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

from tqdm.auto import tqdm

from ..util.errors import ConfigError
from ..util.files import atomic_write_json
from . import procs
from .multiprocess import check_train_config, worker_command
from .sweep import run_id

RESULTS = "results.jsonl"


def read_results(out_dir: str | Path) -> list[dict]:
    """The records of ``results.jsonl``, one per run id (the last one wins).

    A torn last line (a write cut short) is skipped with a warning, and dropped from the file at the
    next :func:`append_result`, so the sweep resumes; an unreadable line elsewhere is an error naming it.
    Each record's id is recomputed from its fields (:func:`run_id`), so records written before a
    change to the id keep matching their runs.
    """
    path = Path(out_dir) / RESULTS
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    records: dict[str, dict] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if any(rest.strip() for rest in lines[number:]):
                raise ConfigError(
                    f"{path}:{number}: not a JSON record ({exc.msg}); fix or delete that line to resume"
                ) from None
            warnings.warn(
                f"{path}:{number}: skipping a torn last line ({len(line)} characters, {exc.msg}); "
                "that run will be redone",
                stacklevel=1,  # one place, so the warning shows once however often the file is read
            )
            continue
        if all(k in record for k in ("model", "task", "method", "params", "train", "seed")):
            record["run_id"] = run_id(record)
        records[record.get("run_id")] = record
    return list(records.values())


@contextlib.contextmanager
def _results_lock(out_dir: Path):
    """An exclusive lock on the folder's results, so sweeps sharing one ``--out`` never drop a record."""
    with open(out_dir / ".results.lock", "a") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: no concurrent sweeps there
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def append_result(out_dir: str | Path, record: dict) -> None:
    """Add (or replace, by run_id) one record; the file is rewritten via a temp file + rename.

    Read, modify and rename happen under a file lock: two sweeps (e.g. split by method or seed, one per
    core) can write one results file without losing each other's records.
    """
    path = Path(out_dir) / RESULTS
    with _results_lock(path.parent):
        records = [r for r in read_results(out_dir) if r.get("run_id") != record["run_id"]] + [record]
        fd, tmp = tempfile.mkstemp(prefix=".results.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            for r in records:
                f.write(json.dumps(r, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def claim_run(out_dir: Path, spec: dict) -> bool:
    """Take ``spec`` for this process: False when it is already recorded ``ok`` or another live process of
    this machine holds it (``runs/<run_id>.claim`` names that process). A claim whose process is gone
    (killed sweep) is stale and taken over. Decided under the results lock, so two sweeps started on one
    ``--out`` (one per core, no ``--part`` needed) share the runs out between them as they go."""
    claim = out_dir / "runs" / f"{spec['run_id']}.claim"
    with _results_lock(out_dir):
        if any(r.get("run_id") == spec["run_id"] and r.get("status") == "ok" for r in read_results(out_dir)):
            return False
        if claim.is_file():
            try:
                holder = int(claim.read_text().split()[0])
            except (ValueError, IndexError, OSError):
                holder = -1
            if holder > 0 and holder != os.getpid() and _pid_alive(holder):
                return False
        claim.write_text(f"{os.getpid()}\n")
    return True


def release_run(out_dir: Path, spec: dict) -> None:
    (out_dir / "runs" / f"{spec['run_id']}.claim").unlink(missing_ok=True)


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
        proc = procs.run(  # the worker is ended with this process (SIGTERM, Ctrl-C, kill -9)
            worker_command(spec, spec_path, result_path),  # torchrun / accelerate launch for processes > 1
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


def run_pack_in_subprocess(specs: list[dict], work: Path, timeout: float | None) -> list[dict]:
    """Run ``specs`` packed in one worker process (:mod:`peftlab.bench.pack`); one record per run (a run
    without a result file is recorded failed, with the end of the worker's error output)."""
    import sys

    pack_path = work / f"pack-{specs[0]['run_id']}.json"
    atomic_write_json(pack_path, specs)
    for spec in specs:
        (work / f"{spec['run_id']}.result.json").unlink(missing_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONSAFEPATH": "1",
           "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    error = ""
    try:
        proc = procs.run([sys.executable, "-m", "peftlab.bench.pack", str(pack_path), str(work)],
                         timeout=timeout, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode:
            error = f"pack worker exited with code {proc.returncode}: {(proc.stderr or '').strip()[-2000:]}"
    except subprocess.TimeoutExpired:
        error = f"the pack timed out after {timeout:.0f} s"
    records = []
    for spec in specs:
        path = work / f"{spec['run_id']}.result.json"
        if path.is_file():
            records.append(json.loads(path.read_text()))
        else:
            records.append({**spec, "status": "failed", "error": error or "the pack wrote no result for this run"})
    return records


def _run_packs(specs: list[dict], out: Path, work: Path, size: int, timeout, progress: bool) -> list[dict]:
    """Run the packable specs in packs of at most ``size`` (each run claimed and recorded on its own, so a
    resumed sweep redoes only unfinished runs); returns the specs left to run unpacked."""
    from .pack import plan

    packs, alone = plan(specs, size)
    for spec, why in alone:
        if progress:
            print(f"run {spec['run_id']} ({spec['label']} {spec['task']} seed={spec['seed']}) runs unpacked: {why}")
    for group in packs:
        mine = [s for s in group if claim_run(out, s)]
        if not mine:
            continue
        if progress:
            print(f"pack of {len(mine)}: " + ", ".join(f"{s['label']} seed={s['seed']}" for s in mine))
        try:
            records = run_pack_in_subprocess([{**s, "train": {**s["train"], "progress": False}} for s in mine],
                                             work, None if timeout is None else timeout * len(mine))
            for spec, record in zip(mine, records):
                record["train"] = spec["train"]
                append_result(out, record)
                if record.get("status") != "ok" and progress:
                    tqdm.write(f"run {spec['run_id']} ({spec['label']} on {spec['task']}) failed: {record.get('error')}")
        finally:
            for spec in mine:
                release_run(out, spec)
    return [spec for spec, _ in alone]


def run_sweep(
    specs: list[dict], out_dir: str | Path, timeout: float | None = None, progress: bool = True, pack: int = 1
) -> list[dict]:
    """Run every spec not finished yet; returns all records of this sweep's runs.

    ``pack`` > 1: compatible runs train up to ``pack`` at a time in one process over one frozen base
    (:mod:`peftlab.bench.pack`, records equal to the separate runs'); the others run one by one as before.
    """
    if not isinstance(pack, int) or isinstance(pack, bool) or pack < 1:
        raise ConfigError(f"pack must be a whole number >= 1 (runs per process), got {pack!r}")
    out = Path(out_dir)
    work = out / "runs"
    work.mkdir(parents=True, exist_ok=True)
    done = {r["run_id"] for r in read_results(out) if r.get("status") == "ok"}
    todo = [s for s in specs if s["run_id"] not in done]
    for spec in todo:  # bad precision / processes / batch split: a clear error before anything starts
        check_train_config(spec["train"])
    if progress and len(todo) < len(specs):
        print(f"resuming: {len(specs) - len(todo)} of {len(specs)} runs already finished in {out / RESULTS}")
    if pack > 1:
        todo = _run_packs(todo, out, work, pack, timeout, progress)
    bar = tqdm(todo, desc="sweep", disable=not progress, dynamic_ncols=True)
    for spec in bar:
        if not claim_run(out, spec):  # finished or running in another sweep process on this --out
            bar.set_postfix_str(f"{spec['label']} seed={spec['seed']}: taken by another process")
            continue
        bar.set_postfix_str(f"{spec['label']} {spec['task']} {spec['model']} seed={spec['seed']}")
        try:
            record = run_in_subprocess({**spec, "train": {**spec["train"], "progress": progress}}, work, timeout)
            record["train"] = spec["train"]
            append_result(out, record)
        finally:
            release_run(out, spec)
        if record.get("status") != "ok" and progress:
            tqdm.write(
                f"run {spec['run_id']} ({spec['label']} on {spec['task']}) failed: {record.get('error')}"
            )
    ids = {s["run_id"] for s in specs}
    return [r for r in read_results(out) if r["run_id"] in ids]
