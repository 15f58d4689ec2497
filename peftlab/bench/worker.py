"""One benchmark run, executed in its own subprocess so its peak memory is its own.

``python -m peftlab.bench.worker SPEC.json RESULT.json``: build the model for the method,
train with :func:`peftlab.training.loop.train` (best dev checkpoint kept), evaluate on dev and test,
measure, and write one result record (JSON). Failures are recorded, not raised.
"""

from __future__ import annotations

import json
import math
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch


def peak_memory_mb(device: str) -> float:
    """CUDA max allocated on a GPU; the process's peak RSS on a CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def environment(device: str) -> dict:
    import transformers

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    name = (
        torch.cuda.get_device_name()
        if device.startswith("cuda")
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    return {
        "device": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "git_commit": commit,
    }


STEP_PARAMS = ("t_init", "t_final", "delta_t")


def steps_of_run(params: dict, steps: int) -> dict:
    """Schedule parameters given as a share of the run (``t_init: "10%"``) -> steps of this run.

    AdaLoRA's t_init/t_final/delta_t count steps, so a schedule written for one run length is wrong
    for another (t_init + t_final can exceed a short run). ``"p%"`` means round(p/100 · steps)
    (delta_t at least 1).
    """
    out = dict(params)
    for key in STEP_PARAMS:
        value = out.get(key)
        if isinstance(value, str) and value.endswith("%"):
            try:
                share = float(value[:-1]) / 100
            except ValueError:
                raise ValueError(
                    f"{key} must be a step count or a percentage like '10%', got {value!r}"
                ) from None
            out[key] = max(1 if key == "delta_t" else 0, round(share * steps))
    return out


def run(spec: dict) -> dict:
    import peftlab

    from ..training.loop import cycle, train
    from ..util.errors import ConfigError
    from ..util.models import load_model
    from .multiprocess import process_context
    from .providers import get_provider
    from .tasks import data_dir, get_task

    start = time.perf_counter()
    cfg = spec["train"]
    device = cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    ranks = process_context(cfg, device)  # one process, or this rank of a torchrun / accelerate launch run
    device = ranks.device if ranks.world > 1 else device
    torch.manual_seed(spec["seed"])
    if isinstance(spec.get("data"), dict):  # your own data file (peftlab.bench.user_data)
        from .user_data import UserTask

        task, folder = UserTask(spec["task"], spec["data"], spec["model"], cfg["max_length"]), None
    else:
        task, folder = get_task(spec["task"]), data_dir(spec.get("data"))
    train_rows = task.load(folder, "train", cfg.get("train_limit"), spec["seed"])
    dev_rows = task.load(folder, "dev", cfg.get("dev_limit"), 0)
    test_rows = task.load(folder, "test", cfg.get("test_limit"), 0)

    model, tokenizer = load_model(spec["model"], kind=task.kind, **task.model_kwargs())
    ctx = {"task_kind": task.kind}
    bs = cfg["batch_size"]
    steps = cfg.get("max_steps") or math.ceil(cfg.get("epochs", 1) * len(train_rows) / bs)
    ctx["total_steps"] = steps
    model = get_provider(spec["method"])(model, steps_of_run(spec.get("params") or {}, steps), ctx)
    model.to(device)
    checkpointing = cfg.get("gradient_checkpointing", "none")
    if checkpointing not in ("none", "full", "selective"):
        raise ConfigError(f"gradient_checkpointing must be none, full or selective, got {checkpointing!r}")
    if checkpointing != "none":
        peftlab.enable_gradient_checkpointing(model, selective=checkpointing == "selective")
    trainable, total = peftlab.count_parameters(model)
    estimate_mb = expected_mb = None
    try:  # peftlab.estimate's tensor peak and expected process peak, shown beside the measured one in the report
        from ..estimate_cli import bench_estimate

        est = bench_estimate(spec, model, task.kind, device, steps)
        if est is not None:
            estimate_mb = est.total_peak / 2**20
            expected = est.expected_process_peak
            expected_mb = None if expected is None else expected / 2**20
    except Exception:  # the estimate never fails a run (an architecture it does not know, say)
        pass

    max_len, eval_bs = cfg["max_length"], cfg.get("eval_batch_size", 64)

    def evaluate_dev() -> float:
        return ranks.evaluate(task, model, tokenizer, dev_rows, eval_bs, max_len)[task.metric]

    grouped = cfg.get("group_by_length", True)
    batches = cycle(
        lambda epoch: task.batches(tokenizer, train_rows, bs, max_len, spec["seed"] * 1000 + epoch, grouped)
    )
    batches = ranks.split(batches)  # this process's micro-batches of each global batch
    if device != "cpu":
        batches = ({k: v.to(device) for k, v in b.items()} for b in batches)
    loss_fn = (lambda m, b: m(**b).loss) if spec["method"].startswith("hf-") else None
    kwargs = {"loss_fn": loss_fn} if loss_fn else {}
    if spec["method"] == "hf-adalora":  # HF PEFT's AdaLoRA needs its own per-step allocation call
        kwargs["step_hook"] = model.base_model.update_and_allocate
    result = train(
        model,
        batches,
        steps,
        lr=cfg["lr"],
        warmup_ratio=cfg.get("warmup_ratio", 0.06),
        weight_decay=cfg.get("weight_decay", 0.0),
        evaluate=evaluate_dev,
        eval_every=cfg.get("eval_every") or steps,
        desc=f"{spec['method']} {spec['task']}",
        progress=cfg.get("progress", True),
        optimizer=cfg.get("optimizer", "adamw"),
        **ranks.train_kwargs(),
        **kwargs,
    )
    dev = ranks.evaluate(task, model, tokenizer, dev_rows, eval_bs, max_len)
    test_examples: dict = {}  # per-example columns for the report's paired bootstrap (stats.py)
    test = ranks.evaluate(task, model, tokenizer, test_rows, eval_bs, max_len, examples=test_examples)
    peaks = ranks.gather_floats(peak_memory_mb(device))
    median_step = statistics.median(result.step_times)
    return {
        "status": "ok",
        "metric": task.metric,
        "dev": dev,
        "test": test,
        "test_examples": test_examples,
        "dev_size": len(dev_rows),
        "dev_chance": task.chance(dev_rows),
        "best_step": result.best_step,
        "evals": result.evals,
        "steps": steps,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": 100 * trainable / total,
        "peak_memory_mb": max(peaks),
        "peak_memory_mb_per_process": peaks,
        "estimate_mb": estimate_mb,
        "expected_process_mb": expected_mb,
        "processes": ranks.world,
        # throughput over the steps after the first (which pays one-time allocation and warm-up costs)
        "tokens_per_s": result.tokens
        * (len(result.step_times) - 1)
        / len(result.step_times)
        / max(sum(result.step_times[1:]), 1e-9)
        if len(result.step_times) > 1
        else result.tokens / result.step_times[0],
        "median_step_s": median_step,
        "train_seconds": result.train_seconds,
        "final_train_loss": statistics.fmean(result.losses[-20:]),
        "wall_s": time.perf_counter() - start,
        "env": environment(device),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from .procs import exit_with_parent

    exit_with_parent()  # never outlive the sweep that started this worker
    spec = json.loads(Path(argv[0]).read_text())
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        record = run(spec)
    except Exception as exc:  # recorded as a failed run; the sweep goes on
        record = {
            "status": "failed",
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc()[-4000:],
        }
    from ..util.files import atomic_write_json

    atomic_write_json(argv[1], {**spec, **record})
    return 0


if __name__ == "__main__":
    sys.exit(main())
