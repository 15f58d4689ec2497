r"""GPU at real scale (issue 32): train steps at Llama-3.1-8B / 3.2-1B shapes, one LoRA linear, multi-adapter decode.

    python benchmarks/scale.py --part 1|2|all [--out DIR] [--rounds 2] [--budget S]   # on the GPU
    python benchmarks/scale.py --dry-run [--out DIR]                                  # CPU, toy sizes
    python benchmarks/scale.py --merge DIR1 DIR2 --out DIR                            # join the two calls

**Models** are built on the device with random weights from the real configs below (``MODELS``: shapes
of the published config.json files; rope scaling left out, it changes no cost), in bf16, seed 0, so
nothing is read from disk and every process gets the same weights (:mod:`scale_worker`).

**Parts** (each fits one device call of ≤ 8 minutes; ``--budget`` seconds, default 420):

* part 1: ``train`` rows of Llama-3.1-8B: floor, LoRA, DoRA, QLoRA (when bitsandbytes imports), peftlab vs
  HF PEFT, batch 1 × seq 2048;
* part 2: ``train`` rows of Llama-3.2-1B (floor, LoRA), the ``kernel`` rows (one linear, 8192 tokens) and the
  ``decode`` rows (Llama-3.2-1B, 16 distinct adapters in a batch of 32, vs HF PEFT's ``adapter_names`` and
  the base model).

**Processes and rounds.** Each library runs in its own process (``floor`` + base decode, ``peftlab``,
``hf-peft``, and ``kernel``), one process per library and round, its tasks in a row (each task frees its
model and resets the CUDA peak before the next). Rounds are interleaved (round 2 runs the libraries in the
reverse order). The parent holds a deadline: a process starts only when the time left covers its estimate
(its own duration in round 1, else ``ESTIMATE_S``), and is killed at the deadline or at its cap; a task in
a process stops taking steps past its own cap (after ≥ 1 timed step). What did not run is listed in
``scale.md``; the rows that ran are kept (each finished task is printed at once by the worker).

**Time estimate on an H200** (from the 2026-11-26 runs: 22-26 s per process for imports, CUDA start and a
135M model; an 8B bf16 build on the device adds ~5 s; Triton autotuning of the four 8B projection shapes
~20 s once; an 8B LoRA step at 2048 tokens ~0.2-0.5 s): part 1 ≈ 2 × (floor 40 + peftlab 90 + HF PEFT
75) ≈ 410 s, part 2 ≈ kernel 45 + 2 × (floor+base 35 + peftlab 55 + HF PEFT 55) ≈ 335 s. ``gpu.sh`` gives
part 1 ``--budget 380`` and part 2 ``--budget 350`` (its call also runs the ~60 s ``dora-norm`` step), so a
call stays under 8 minutes with its ~40 s of start-up: round 2's last process (the floor) is the one
skipped when round 1 ran long.

**Output** (``--out``, default ``benchmarks/results/gpu/<date>_<device>``): ``scale.json`` with exactly
the issue's schema (aggregated over rounds: median tokens/s and ms, max peak memory, max loss
difference), ``scale.md`` (the tables, each goal's figure), and ``scale-raw.json`` (every round's rows,
process durations, errors, skipped jobs; what ``--merge`` joins).

``loss_rel_diff``: |last loss − HF PEFT's last loss| / |HF PEFT's last loss| for the same model, method
and round (same weights, same A, B = 0, same batch, same number of steps; its max over rounds); 0 for the
HF PEFT rows; for ``floor`` its first-step loss against HF PEFT LoRA's first step (B = 0: the same function,
so it checks the weights and the loss); null when the HF PEFT row is missing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from scale_report import aggregate, markdown, validate  # noqa: E402

#: Real configs (shapes): meta-llama/Llama-3.2-1B, meta-llama/Llama-3.1-8B; a Qwen3-8B-shaped Llama (head_dim
#: 128, 36 layers, 151936 vocab; no q/k norm) for ``--models``.
MODELS = {
    "llama-3.2-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072,
                     "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True},
    "llama-3.1-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072,
                     "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False},
    "qwen3-8b-shapes": {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
                        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
                        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False},
}  # fmt: skip
#: The dry run's stand-ins: the same families at toy size (different per model, so rows stay distinct).
TOY = {
    "llama-3.2-1b": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256, "tie_word_embeddings": True},
    "llama-3.1-8b": {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "head_dim": 24, "vocab_size": 320, "tie_word_embeddings": False},
    "qwen3-8b-shapes": {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 384, "tie_word_embeddings": False},
}  # fmt: skip
KERNEL_SHAPES = [(8192, 4096, 4096), (8192, 4096, 14336), (8192, 14336, 4096), (8192, 2048, 8192), (8192, 2048, 2048)]
#: Seconds a process is expected to need on an H200 (round 1; round 2 uses round 1's own duration).
ESTIMATE_S = {("1", "floor"): 40, ("1", "peftlab"): 90, ("1", "hf-peft"): 75,
              ("2", "kernel"): 45, ("2", "floor"): 35, ("2", "peftlab"): 55, ("2", "hf-peft"): 55}  # fmt: skip
LIBRARIES = ("floor", "peftlab", "hf-peft")


def bnb_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, or no CUDA library: the QLoRA rows are skipped
        return False
    return True


def jobs(part: str, args) -> dict[tuple[str, str], list[dict]]:
    """{(part, library): [task, ...]} for one part ("1" or "2"); the same every round."""
    dry = args.dry_run
    cfg = lambda name: (TOY if dry else MODELS)[name]  # noqa: E731
    seq = 32 if dry else args.seq
    out: dict[tuple[str, str], list[dict]] = {}

    def train(model, methods, steps, cap):
        for library in LIBRARIES:
            lib = "peftlab" if library == "floor" else library
            for method in (["floor"] if library == "floor" else methods):
                out.setdefault((part, library), []).append(
                    {"kind": "train", "model": model, "method": method, "library": lib, "config": cfg(model),
                     "batch": 1, "seq": seq, "steps": 2 if dry else steps, "cap_s": cap})  # fmt: skip

    if part == "1":
        methods = ["lora", "dora"] + (["qlora"] if args.qlora else [])
        for model in args.models_1:
            train(model, methods, args.steps_8b, 25)
    else:
        for model in args.models_2:
            train(model, ["lora"], args.steps_1b, 15)
        shapes = [(64, 32, 48)] if dry else KERNEL_SHAPES
        out[(part, "kernel")] = [{"kind": "kernel", "tokens": t, "d_in": i, "d_out": o, "repeats": 2 if dry else 20,
                                  "cap_s": 5.0} for t, i, o in shapes]  # fmt: skip
        for library, name in (("floor", "base"), ("peftlab", "peftlab"), ("hf-peft", "hf-peft")):
            out.setdefault((part, library), []).append(
                {"kind": "decode", "model": "llama-3.2-1b", "library": name, "config": cfg("llama-3.2-1b"),
                 "adapters": 4 if dry else 16, "batch": 8 if dry else 32, "prompt": 8 if dry else 64,
                 "new_tokens": 4 if dry else 16, "repeats": 1 if dry else 2, "cap_s": 20})  # fmt: skip
    return out


#: A dry run's processes: its time is the CPU's imports (torch, transformers, peft: ~15 s a process), so the
#: floor's tasks share peftlab's process and the kernel rows HF PEFT's (two processes, run side by side).
DRY_PROCESS = {"floor": "peftlab", "peftlab": "peftlab", "hf-peft": "hf-peft", "kernel": "hf-peft"}


def plan(parts: list[str], args) -> dict[tuple[str, str], list[dict]]:
    """{(part, library): tasks} for the parts run now; a dry run joins all parts into two processes (DRY_PROCESS)."""
    if not args.dry_run:
        return {k: v for part in parts for k, v in jobs(part, args).items()}
    merged: dict[tuple[str, str], list[dict]] = {}
    for part in parts:
        for (_, library), tasks in jobs(part, args).items():
            merged.setdefault(("+".join(parts), DRY_PROCESS[library]), []).extend(tasks)
    return merged


def run_process(key, tasks, args, round_index: int, timeout: float) -> dict:
    """One worker process; returns {"rows": [...], "seconds", "returncode", "stderr_tail"}."""
    spec = {"device": args.device, "dry_run": args.dry_run, "round": round_index, "tasks": tasks,
            "checkpointing": {"peftlab": args.ckpt_peftlab, "hf-peft": args.ckpt_hf}}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.dry_run:  # the CPU: torch paths (the kernels' interpreter tests are tests/kernels), one thread
        env.pop("TRITON_INTERPRET", None)
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(HERE / "scale_worker.py"), json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout))
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        code = f"killed at its cap ({timeout:.0f} s)"
    rows = []
    for line in out.splitlines():
        if line.startswith("SCALE_ROW "):  # scale_worker.MARK
            try:
                rows.append(json.loads(line[len("SCALE_ROW "):]))
            except json.JSONDecodeError:
                pass
    return {"part": key[0], "library": key[1], "round": round_index, "rows": rows, "returncode": code,
            "seconds": time.perf_counter() - t0, "stderr_tail": (err or "")[-2500:]}  # fmt: skip


def run_part(part: list[str], args, deadline: float, log, raw: dict, save) -> None:
    """All processes of the parts over ``args.rounds`` rounds within ``deadline``, appended to ``raw["processes"]``
    (and ``raw["skipped"]``); ``save()`` after every process, so a call killed from outside keeps what finished."""
    tasks = plan(part, args)
    keys = list(tasks)
    procs, skipped, took = raw["processes"], raw["skipped"], {}
    for round_index in range(1, args.rounds + 1):
        order = keys if round_index % 2 else keys[::-1]
        if args.jobs > 1:  # dry run only: processes side by side (the CPU's imports, not timings, matter there)
            from concurrent.futures import ThreadPoolExecutor

            cap = max(1.0, deadline - time.monotonic())
            with ThreadPoolExecutor(args.jobs) as pool:
                records = list(pool.map(lambda key, r=round_index, c=cap: run_process(key, tasks[key], args, r, c), order))
            procs += records
            save()
            for record in records:
                log(f"part {record['part']} round {round_index} {record['library']}: {record['seconds']:.0f} s, "
                    f"exit {record['returncode']}, {len(record['rows'])} row(s)")  # fmt: skip
            continue
        for key in order:
            estimate = took.get(key, 10.0 if args.dry_run else ESTIMATE_S.get(key, 60))
            left = deadline - time.monotonic()
            if left < estimate:
                skipped.append({"part": key[0], "library": key[1], "round": round_index,
                                "why": f"{left:.0f} s left < {estimate:.0f} s estimated"})  # fmt: skip
                log(f"skip {key} round {round_index}: {left:.0f} s left, needs ~{estimate:.0f} s")
                continue
            cap = min(left, max(2.0 * estimate, estimate + 30.0))
            log(f"part {key[0]} round {round_index} {key[1]}: {len(tasks[key])} task(s), cap {cap:.0f} s")
            record = run_process(key, tasks[key], args, round_index, cap)
            took[key] = record["seconds"]
            procs.append(record)
            save()
            errors = [r for r in record["rows"] if "error" in r]
            log(f"  done in {record['seconds']:.0f} s, exit {record['returncode']}, {len(record['rows'])} row(s), "
                f"{len(errors)} error(s)" + "".join(f"\n    {e['error'][:300]}" for e in errors))  # fmt: skip
            if record["returncode"] != 0 and not record["rows"]:
                log("  stderr: " + record["stderr_tail"][-800:])


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name()
    return "cpu"


def commit() -> str:
    """$PEFTLAB_COMMIT if set (a lent box's copy of .git may be stale: pass the local HEAD), else git's HEAD."""
    if os.environ.get("PEFTLAB_COMMIT"):
        return os.environ["PEFTLAB_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              timeout=10).stdout.strip() or "unknown"  # fmt: skip
    except Exception:  # noqa: BLE001
        return "unknown"


def write(out: Path, raw: dict) -> dict:
    """scale.json (the issue's schema), scale.md and scale-raw.json from the raw record; returns scale.json's dict."""
    result = aggregate(raw)
    problems = validate(result)
    raw["schema_problems"] = problems  # never raised mid-run: the next processes still run; main() exits 1
    out.mkdir(parents=True, exist_ok=True)
    files = [("scale-raw.json", json.dumps(raw, indent=1)), ("scale.md", markdown(result, raw))]
    files.append(("scale.invalid.json" if problems else "scale.json", json.dumps(result, indent=1)))
    for name, text in files:
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="all", choices=["1", "2", "all"])
    parser.add_argument("--rounds", type=int, default=None, help="default 2 (1 in a dry run)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 420 a part)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps-8b", type=int, default=4)
    parser.add_argument("--steps-1b", type=int, default=6)
    parser.add_argument("--models-1", nargs="+", default=["llama-3.1-8b"], choices=list(MODELS))
    parser.add_argument("--models-2", nargs="+", default=["llama-3.2-1b"], choices=list(MODELS))
    parser.add_argument("--no-qlora", dest="qlora", action="store_false")
    parser.add_argument("--ckpt-peftlab", default="none", choices=["none", "selective", "full"],
                        help="peftlab rows' gradient checkpointing (stated in settings)")
    parser.add_argument("--ckpt-hf", default="none", choices=["none", "full"], help="HF PEFT rows' gradient checkpointing")
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, kernels in Triton's interpreter")
    parser.add_argument("--jobs", type=int, default=None,
                        help="processes at once: 1 on a GPU (timings), default 2 in a dry run")  # fmt: skip
    parser.add_argument("--out", default=None)
    parser.add_argument("--fresh", action="store_true",
                        help="ignore an existing scale-raw.json in --out (by default the other part's rows are kept)")
    parser.add_argument("--merge", nargs="+", metavar="DIR", help="join the scale-raw.json of DIRs into --out")
    args = parser.parse_args()
    if args.merge:
        raws = [json.loads((Path(d) / "scale-raw.json").read_text()) for d in args.merge]
        raw = {**raws[0], "processes": [p for r in raws for p in r["processes"]],
               "skipped": [s for r in raws for s in r["skipped"]], "parts": sorted({p for r in raws for p in r["parts"]}),
               "merged_from": [str(d) for d in args.merge]}  # fmt: skip
        raw["commit"] = os.environ.get("PEFTLAB_COMMIT", raw["commit"])
        out = Path(args.out or args.merge[0])
        write(out, raw)
        if raw["schema_problems"]:
            print("scale.json NOT written (see scale.invalid.json): " + "; ".join(raw["schema_problems"]), file=sys.stderr)
            return 1
        print(f"merged {len(raws)} run(s) into {out / 'scale.json'}")
        return 0
    if args.dry_run:  # no torch in this process: a dry run's time is imports
        import importlib.metadata

        torch_version = importlib.metadata.version("torch")
        args.device = "cpu"
    else:
        import torch

        torch_version = torch.__version__
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu" and not args.dry_run:
        print("scale.py: no CUDA device; use --dry-run on a CPU", file=sys.stderr)
        return 2
    args.rounds = args.rounds or (1 if args.dry_run else 2)
    args.jobs = 1 if not args.dry_run else (args.jobs or 2)
    if args.dry_run:  # importing bitsandbytes imports torch (seconds); the workers import it anyway
        import importlib.util

        args.qlora = args.qlora and importlib.util.find_spec("bitsandbytes") is not None
    else:
        args.qlora = args.qlora and bnb_available()
    parts = ["1", "2"] if args.part == "all" else [args.part]
    budget = args.budget or 420.0 * len(parts) * (3 if args.dry_run else 1)
    device = device_name(args.device)
    date = datetime.date.today().isoformat()
    slug = "".join(c if c.isalnum() or c in ".-" else "-" for c in device).strip("-")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / "gpu" / f"{date}_{slug}{'_dry-run' if args.dry_run else ''}"
    start = time.monotonic()
    deadline = start + budget

    def log(msg: str) -> None:
        print(f"[scale {time.monotonic() - start:6.1f} s] {msg}", flush=True)

    log(f"device {device}, parts {parts}, rounds {args.rounds}, budget {budget:.0f} s, QLoRA rows: {args.qlora}")
    raw = {"device": device, "date": date, "commit": commit(), "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]),
           "dry_run": args.dry_run, "parts": parts, "rounds": args.rounds, "budget_s": budget, "torch": torch_version,
           "processes": [], "skipped": []}  # fmt: skip
    previous = out / "scale-raw.json"
    if not args.dry_run and not args.fresh and previous.is_file():  # the other part's call, same device: keep it
        old = json.loads(previous.read_text())
        if old.get("device") == device and not old.get("dry_run"):
            raw["processes"] = [p for p in old["processes"] if p["part"] not in parts]
            raw["skipped"] = [s for s in old["skipped"] if s["part"] not in parts]
            raw["parts"] = sorted({p["part"] for p in raw["processes"]} | set(parts))
            raw["earlier"] = {k: old.get(k) for k in ("command", "commit", "date", "seconds")}
            log(f"kept {len(raw['processes'])} process(es) of part(s) {sorted({p['part'] for p in raw['processes']})} "
                f"from {previous} (--fresh to drop them)")  # fmt: skip
    groups = [parts] if args.dry_run else [[p] for p in parts]
    for index, group in enumerate(groups):
        # an even share of what is left for each remaining part
        part_deadline = time.monotonic() + (deadline - time.monotonic()) / (len(groups) - index)
        run_part(group, args, part_deadline, log, raw, save=lambda: write(out, raw))
    raw["seconds"] = time.monotonic() - start
    result = write(out, raw)
    if raw["schema_problems"]:
        log("scale.json NOT written (see scale.invalid.json): " + "; ".join(raw["schema_problems"][:10]))
        return 1
    log(f"wrote {out / 'scale.json'}: {len(result['train'])} train, {len(result['kernel'])} kernel, "
        f"{len(result['decode'])} decode row(s)")  # fmt: skip
    print((out / "scale.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
