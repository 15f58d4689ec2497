"""Sweeps lose nothing and leave nothing running.

* the run id covers the data source and the label, so ``--data hf`` after a local run, or two
  entries differing only by label, are separate runs with separate rows;
* a torn last line of ``results.jsonl`` is skipped with a warning and the sweep resumes;
* a worker never outlives the sweep process: SIGTERM, SIGINT or SIGKILL of the parent ends it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peftlab.bench.runner import RESULTS, append_result, read_results, run_sweep
from peftlab.bench.sweep import expand, run_id
from peftlab.util.errors import ConfigError

TRAIN = {"max_steps": 6}


def finished(spec: dict) -> dict:
    """The record a successful run of ``spec`` leaves in results.jsonl (as the runner writes it)."""
    return {**spec, "status": "ok", "metric": "accuracy", "test": {"accuracy": 0.5}}


def test_ids_recorded_before_stay_valid(monkeypatch):
    """No label and no data source: the id is the one computed before they joined it (old results resume)."""
    monkeypatch.delenv("PEFTLAB_DATA", raising=False)
    [spec] = expand({"models": ["minilm-l6"], "tasks": ["sst2"], "methods": ["lora"], "train": TRAIN})
    assert spec["run_id"] == "1a0c8488515d"


def test_label_only_difference_keeps_both_rows(tmp_path, monkeypatch):
    monkeypatch.delenv("PEFTLAB_DATA", raising=False)
    sweep = {
        "models": ["minilm-l6"],
        "tasks": ["sst2"],
        "methods": [{"method": "lora", "label": "a"}, {"method": "lora", "label": "b"}],
        "train": TRAIN,
    }
    specs = expand(sweep)
    assert len({s["run_id"] for s in specs}) == 2
    for spec in specs:
        append_result(tmp_path, finished(spec))
    assert sorted(r["label"] for r in read_results(tmp_path)) == ["a", "b"]
    # both count as finished: nothing is rerun, both rows come back
    records = run_sweep(specs, tmp_path, progress=False)
    assert sorted(r["label"] for r in records) == ["a", "b"]


def test_data_source_is_part_of_the_run(tmp_path, monkeypatch):
    monkeypatch.delenv("PEFTLAB_DATA", raising=False)
    sweep = {"models": ["minilm-l6"], "tasks": ["sst2"], "methods": ["lora"], "train": TRAIN}
    [local] = expand(sweep)
    [hub] = expand({**sweep, "data": "hf:peftlab-tests/nowhere"})
    assert hub["run_id"] != local["run_id"]
    monkeypatch.setenv("PEFTLAB_DATA", "hf:peftlab-tests/nowhere")  # the environment's source counts too
    [from_env] = expand(sweep)
    assert from_env["data"] == hub["data"] and from_env["run_id"] == hub["run_id"]

    append_result(tmp_path, finished(local))
    # the hub run is not taken for the finished local one: it runs (and fails: no hub here)
    [record] = run_sweep([hub], tmp_path, progress=False)
    assert record["data"] == "hf:peftlab-tests/nowhere" and record["status"] == "failed", record
    assert {r["run_id"]: r["status"] for r in read_results(tmp_path)} == {
        local["run_id"]: "ok",
        hub["run_id"]: "failed",
    }


def test_torn_last_line_is_skipped_with_a_warning_and_resume_works(tmp_path, monkeypatch):
    monkeypatch.delenv("PEFTLAB_DATA", raising=False)
    specs = expand(
        {
            "models": ["minilm-l6"],
            "tasks": ["sst2"],
            "methods": ["full", "lora"],
            "seeds": [0, 1],
            "train": TRAIN,
        }
    )
    for spec in specs[:3]:
        append_result(tmp_path, finished(spec))
    path = tmp_path / RESULTS
    whole = json.dumps(finished(specs[3]), sort_keys=True)
    with open(path, "a") as f:  # a write cut short: half of the fourth record, no newline
        f.write(whole[: len(whole) // 2])

    with pytest.warns(UserWarning, match=rf"{RESULTS}:4: skipping a torn last line"):
        assert [r["run_id"] for r in read_results(tmp_path)] == [s["run_id"] for s in specs[:3]]
    with pytest.warns(UserWarning, match="torn last line"):
        records = run_sweep(specs[:3], tmp_path, progress=False)  # resumes: nothing to run, no error
    assert len(records) == 3
    # the next record written repairs the file
    with pytest.warns(UserWarning, match="torn last line"):
        append_result(tmp_path, finished(specs[3]))
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["status"] == "ok" for line in lines)

    # a bad line that is not the last one is not a torn write: refuse, naming the line
    path.write_text(lines[0] + "\n{not json\n" + lines[1] + "\n")
    with pytest.raises(ConfigError, match=rf"{RESULTS}:2: not a JSON record"):
        read_results(tmp_path)


# --- the worker never outlives the sweep ---------------------------------------------------------


def children_running(parent: int, needle: str) -> list[int]:
    """Pids of live (not zombie) processes whose parent is ``parent`` and whose command line holds ``needle``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == parent and needle in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_killing_the_sweep_ends_its_worker(tmp_path, sst2_dir, sig):
    """``peftlab bench`` with a long run: signal the parent alone; its worker must be gone soon after."""
    env = {k: v for k, v in os.environ.items() if k != "PEFTLAB_DATA"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    log = open(tmp_path / "sweep.log", "w")
    parent = subprocess.Popen(
        [sys.executable, "-m", "peftlab", "bench", "--model", "minilm-l6", "--task", "sst2", "--methods", "lora",
         "--max-steps", "100000", "--data", str(sst2_dir.parent), "--out", str(tmp_path / "out")],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
        # a background job (nohup ... &) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt
        # handler: give the sweep the default disposition, as a terminal would
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    worker = None
    try:
        deadline = time.monotonic() + 120
        while worker is None and time.monotonic() < deadline and parent.poll() is None:
            found = children_running(parent.pid, "peftlab.bench.worker")
            worker = found[0] if found else None
            time.sleep(0.2)
        assert worker is not None, (tmp_path / "sweep.log").read_text()[-3000:]
        time.sleep(1.0)  # let it get going
        assert alive(worker), (tmp_path / "sweep.log").read_text()[-3000:]
        parent.send_signal(sig)  # the parent only, not its process group
        code = parent.wait(60)
        deadline = time.monotonic() + 60  # after SIGKILL the worker notices its parent is gone by polling
        while alive(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(worker), f"worker {worker} still running after the sweep got {sig.name}"
        expected = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 130, signal.SIGKILL: -signal.SIGKILL}
        assert code == expected[sig], (code, (tmp_path / "sweep.log").read_text()[-3000:])
    finally:
        for pid in [parent.pid] + ([worker] if worker else []):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        parent.wait()
        log.close()
    assert not (tmp_path / "out" / RESULTS).exists()  # an interrupted run is not recorded as a result


def test_run_id_is_a_pure_function_of_the_record():
    """``read_results`` recomputes ids from the stored fields; that must equal the id expand() gave."""
    [spec] = expand(
        {"models": ["m"], "tasks": ["sst2"], "methods": [{"method": "lora", "label": "x"}], "data": "d"}
    )
    assert run_id(json.loads(json.dumps(finished(spec)))) == spec["run_id"]


def test_worker_under_a_launcher_ends_with_the_sweep(tmp_path):
    """As under torchrun: sweep -> launcher -> worker. The worker runs while the sweep lives (its grandparent
    counts), and exits when the sweep is killed with SIGKILL, though the launcher is still there."""
    pid_file = tmp_path / "worker.pid"
    worker = (
        "import os, sys, time; from peftlab.bench.procs import exit_with_parent; exit_with_parent(0.2); "
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    )
    launcher = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {worker!r}])"
    sweep = (
        "import sys, time; from peftlab.bench import procs; "
        f"procs.start([sys.executable, '-c', {launcher!r}]); time.sleep(120)"
    )
    parent = subprocess.Popen([sys.executable, "-c", sweep], cwd=tmp_path)
    pid = None
    try:
        deadline = time.monotonic() + 120
        while not pid_file.is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.2)
        pid = int(pid_file.read_text())
        time.sleep(1.0)  # several checks: the sweep is the grandparent, not the parent; it must keep running
        assert alive(pid)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 30
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(pid), "the worker outlived its sweep"
    finally:
        if pid and alive(pid):
            os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
        parent.wait()


def _append_many(out: str, start: int, count: int) -> None:
    for i in range(start, start + count):
        append_result(out, {"run_id": f"run{i:03d}", "status": "ok"})


def test_two_sweeps_sharing_one_folder_lose_no_record(tmp_path):
    """Two processes appending at once (sweeps split by method, one per core): every record survives."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path), k * 100, 25)) for k in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    ids = {r["run_id"] for r in read_results(tmp_path)}
    assert ids == {f"run{i:03d}" for k in range(2) for i in range(k * 100, k * 100 + 25)}


def test_sweep_parts_split_the_runs_exactly_once():
    from peftlab.cli import _sweep_part

    specs = expand({"models": ["minilm-l6"], "tasks": ["sst2"], "methods": ["full", "lora", "adalora"],
                    "seeds": [0, 1, 2], "train": TRAIN})  # fmt: skip
    parts = [_sweep_part(f"{k}/3", specs) for k in (1, 2, 3)]
    ids = [s["run_id"] for part in parts for s in part]
    assert sorted(ids) == sorted(s["run_id"] for s in specs) and len(set(ids)) == len(specs) == 9
    assert _sweep_part(None, specs) == specs
    for bad in ("0/2", "3/2", "2", "a/b"):
        with pytest.raises(ConfigError, match="expected K/N"):
            _sweep_part(bad, specs)


def _sweep_with_fake_runs(out: str, specs: list[dict], log: str) -> None:
    """A sweep process whose runs take 100 ms each and log which process ran them."""
    from peftlab.bench import runner

    def fake_run(spec, work, timeout):
        with open(log, "a") as f:
            f.write(f"{spec['run_id']} {os.getpid()}\n")
        time.sleep(0.1)
        return finished(spec)

    runner.run_in_subprocess = fake_run
    run_sweep(specs, out, progress=False)


def test_two_sweep_processes_without_parts_run_every_run_once(tmp_path, monkeypatch):
    """Two processes over the same sweep and folder (no --part): the claims divide the runs, none runs twice."""
    import multiprocessing

    monkeypatch.delenv("PEFTLAB_DATA", raising=False)
    specs = expand({"models": ["minilm-l6"], "tasks": ["sst2"], "methods": ["full", "lora", "adalora", "houlsby"],
                    "seeds": [0, 1, 2], "train": TRAIN})  # fmt: skip
    log = tmp_path / "ran.txt"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_sweep_with_fake_runs, args=(str(tmp_path), specs, str(log))) for _ in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    ran = [line.split() for line in log.read_text().splitlines()]
    assert sorted(run for run, _ in ran) == sorted(s["run_id"] for s in specs)  # each exactly once
    assert len({pid for _, pid in ran}) == 2  # and both processes worked
    assert {r["run_id"] for r in read_results(tmp_path)} == {s["run_id"] for s in specs}
    assert not list((tmp_path / "runs").glob("*.claim"))  # released


def test_a_claim_of_a_live_process_is_respected_and_a_dead_ones_taken_over(tmp_path, monkeypatch):
    from peftlab.bench import runner

    monkeypatch.delenv("PEFTLAB_DATA", raising=False)
    specs = expand({"models": ["minilm-l6"], "tasks": ["sst2"], "methods": ["full", "lora"], "train": TRAIN})
    (tmp_path / "runs").mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "runs" / f"{specs[0]['run_id']}.claim").write_text(f"{live.pid}\n")
        (tmp_path / "runs" / f"{specs[1]['run_id']}.claim").write_text(f"{dead.pid}\n")
        ran = []
        monkeypatch.setattr(runner, "run_in_subprocess", lambda spec, work, timeout: ran.append(spec["run_id"]) or finished(spec))
        run_sweep(specs, tmp_path, progress=False)
        assert ran == [specs[1]["run_id"]]  # the live claim is skipped, the stale one is run
        assert runner.claim_run(tmp_path, specs[1]) is False  # recorded ok: never claimed again
    finally:
        live.kill()
        live.wait()


def test_seed_major_order_runs_every_method_of_a_seed_first():
    sweep = {"models": ["minilm-l6"], "tasks": ["sst2"], "methods": ["full", "lora", "adalora"], "seeds": [0, 1],
             "train": TRAIN}  # fmt: skip
    default = expand(sweep)
    assert [(s["method"], s["seed"]) for s in default][:2] == [("full", 0), ("full", 1)]
    seed_major = expand({**sweep, "order": "seed-major"})
    assert [(s["method"], s["seed"]) for s in seed_major] == [
        ("full", 0), ("lora", 0), ("adalora", 0), ("full", 1), ("lora", 1), ("adalora", 1)
    ]  # fmt: skip
    assert {s["run_id"] for s in seed_major} == {s["run_id"] for s in default}  # same runs, same ids
    with pytest.raises(ConfigError, match="order: 'random' is not one of method-major, seed-major"):
        expand({**sweep, "order": "random"})
