r"""Packed sweeps: up to N compatible runs of a sweep in one process, over one frozen base (``--pack N``).

``python -m peftlab.bench.pack PACK.json OUT_DIR`` trains the runs of PACK.json (a list of run specs) with
:func:`peftlab.training.many.train_many` and writes each run's record to ``OUT_DIR/<run_id>.result.json``
as soon as that run is finished (evaluated on dev and test), so a pack cut short keeps its finished runs.

Each run's record equals that of its separate run (:mod:`peftlab.bench.worker`):

- **initial state**: the worker's seeding, data loading, model load and wrapping are replayed per run (the
  extra model is dropped), and the run's adapter tensors (its head copy included) and the global generator's
  state at the start of training are taken from it: the run trains from exactly those tensors, and every
  dropout draw it makes (its adapter's, the base model's, see :mod:`peftlab.serving.base_rows`) comes from a
  stream that starts at that state, in the same module order;
- **data order**: the run's own seed (``seed · 1000 + epoch``), as in the worker;
- **recipe**: the worker's AdamW, linear warm-up / decay (``warmup = int(warmup_ratio · steps)``), gradient
  clipping at 1.0 on the run's own norm, dev evaluation every ``eval_every`` steps with the best checkpoint
  restored before the final dev and test evaluation.

Runs that cannot share a pass (:func:`unpackable`) run unpacked as before.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

#: methods whose runs can be packed: peftlab adapters whose loss is the task loss alone (AdaLoRA adds its
#: orthogonal regulariser to output.loss; quantized bases and full fine-tuning do not share a frozen base)
PACKABLE_METHODS = ("lora", "houlsby", "pfeiffer", "parallel")
PACKABLE_KINDS = ("seq-cls",)


def unpackable(spec: dict) -> str | None:
    """Why ``spec`` cannot run in a pack (a short reason), or None when it can."""
    from .tasks import get_task

    cfg = spec["train"]
    if spec["method"] not in PACKABLE_METHODS:
        return f"method {spec['method']} (packable: {', '.join(PACKABLE_METHODS)})"
    if (spec.get("params") or {}).get("train_layernorm"):
        return "train_layernorm (trains base tensors, which a pack shares)"
    if get_task(spec["task"]).kind not in PACKABLE_KINDS:
        return f"task kind {get_task(spec['task']).kind} (packable: {', '.join(PACKABLE_KINDS)})"
    device = cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu":
        return f"device {device} (packed runs draw dropout from CPU streams)"
    for key, plain in (("processes", 1), ("grad_accum", 1), ("precision", "fp32"), ("optimizer", "adamw"),
                       ("gradient_checkpointing", "none")):
        if cfg.get(key, plain) not in (plain, None, False):
            return f"{key}={cfg[key]}"
    return None


def pack_key(spec: dict) -> tuple:
    """Runs with equal keys share one frozen base: the same model, task and data source."""
    return (spec["model"], spec["task"], str(spec.get("data")))


def plan(specs: list[dict], size: int) -> tuple[list[list[dict]], list[tuple[dict, str]]]:
    """(packs of at most ``size`` runs, in sweep order of their first run; [(run, why it runs unpacked)])."""
    groups: dict[tuple, list[dict]] = {}
    alone = []
    for spec in specs:
        why = unpackable(spec) if size > 1 else "pack 1"
        if why:
            alone.append((spec, why))
        else:
            groups.setdefault(pack_key(spec), []).append(spec)
    packs = [g[i : i + size] for g in groups.values() for i in range(0, len(g), size)]
    return packs, alone


def job_name(spec: dict) -> str:
    return f"run_{spec['run_id']}"


def _prepare(spec: dict) -> dict:
    """Replay the worker up to the start of training; what the run starts from (module docstring)."""
    from ..api import count_parameters
    from ..core.state import get_state
    from ..core.tensors import adapter_tensors
    from ..util.models import load_model
    from .providers import get_provider
    from .tasks import data_dir, get_task
    from .worker import steps_of_run

    cfg = spec["train"]
    torch.manual_seed(spec["seed"])
    task = get_task(spec["task"])
    folder = data_dir(spec.get("data"))
    rows = {
        "train": task.load(folder, "train", cfg.get("train_limit"), spec["seed"]),
        "dev": task.load(folder, "dev", cfg.get("dev_limit"), 0),
        "test": task.load(folder, "test", cfg.get("test_limit"), 0),
    }
    model, tokenizer = load_model(spec["model"], kind=task.kind, **task.model_kwargs())
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    steps = cfg.get("max_steps") or math.ceil(cfg.get("epochs", 1) * len(rows["train"]) / cfg["batch_size"])
    params = {**steps_of_run(spec.get("params") or {}, steps), "adapter_name": job_name(spec)}
    model = get_provider(spec["method"])(model, params, {"task_kind": task.kind, "total_steps": steps})
    trainable, total = count_parameters(model)
    try:
        from ..estimate_cli import bench_estimate

        estimate = bench_estimate(spec, model, task.kind, "cpu", steps)
    except Exception:
        estimate = None
    name = job_name(spec)
    return {
        "spec": spec, "task": task, "rows": rows, "tokenizer": tokenizer, "base": base, "steps": steps,
        "config": get_state(model, name).config,
        "initial": {k: v.detach().clone() for k, v in adapter_tensors(model, name).items()},
        "rng_state": torch.get_rng_state(),
        "trainable": trainable, "total": total, "estimate": estimate,
        "estimate_mb": None if estimate is None else estimate.total_peak / 2**20,
    }


def _check_base(model, prep: dict) -> None:
    """The shared frozen base equals the run's own, outside the modules its head copies replace."""
    heads = tuple(f"{h}." for h in (getattr(prep["config"], "modules_to_save", None) or []))
    own = prep["base"]
    for key, value in model.state_dict().items():
        if key in own and not key.startswith(heads) and not torch.equal(own[key], value):
            raise RuntimeError(f"run {prep['spec']['run_id']}: its base differs from the pack's at {key} "
                               "(a randomly initialised module that no head copy covers)")


def _counted(batches, prep: dict):
    """``batches``, with each one's tokens (its attention mask's sum) appended to ``prep["tokens"]``."""
    prep["tokens"] = []
    for batch in batches:
        mask = batch.get("attention_mask")
        prep["tokens"].append(int(mask.sum()) if mask is not None else batch["input_ids"].numel())
        yield batch


def run_pack(specs: list[dict], out_dir: str | Path) -> list[dict]:
    """Train ``specs`` in one pack; each run's record goes to ``out_dir/<run_id>.result.json`` when it ends."""
    from ..api import set_active_adapters
    from ..core.tensors import adapter_tensors
    from ..training.loop import cycle
    from ..training.many import Recipe, TrainJob, train_many
    from ..util.files import atomic_write_json
    from ..util.models import load_model
    from .multiprocess import process_context
    from .tasks import get_task
    from .worker import environment, peak_memory_mb

    start = time.perf_counter()
    out_dir = Path(out_dir)
    ranks = process_context(specs[0]["train"], "cpu")
    task = get_task(specs[0]["task"])
    model, _ = load_model(specs[0]["model"], kind=task.kind, **task.model_kwargs())  # the one frozen base
    preps = []
    for spec in specs:  # one run's replayed model at a time (its copy of the base is dropped after the check)
        prep = _prepare(spec)
        _check_base(model, prep)
        prep.pop("base")
        preps.append(prep)
    estimates = [p.pop("estimate") for p in preps]
    from ..estimate_cli import pack_peak_mb

    pack_estimate_mb = pack_peak_mb(estimates) if all(e is not None for e in estimates) else None
    jobs, by_name = [], {}
    for prep in preps:
        spec, cfg, task = prep["spec"], prep["spec"]["train"], prep["task"]
        bs, max_len, grouped = cfg["batch_size"], cfg["max_length"], cfg.get("group_by_length", True)
        tok, rows, seed = prep["tokenizer"], prep["rows"]["train"], spec["seed"]
        batches = _counted(cycle(lambda epoch, t=task, tok=tok, r=rows, s=seed, b=bs, m=max_len, g=grouped:
                                 t.batches(tok, r, b, m, s * 1000 + epoch, g)), prep)
        steps = prep["steps"]
        recipe = Recipe(lr=cfg["lr"], steps=steps, warmup_steps=int(cfg.get("warmup_ratio", 0.06) * steps),
                        schedule="linear", weight_decay=cfg.get("weight_decay", 0.0), max_grad_norm=1.0)
        job = TrainJob(prep["config"], batches, recipe, seed=seed, initial=prep["initial"], rng_state=prep["rng_state"])
        jobs.append(job)
        prep.update(name=job.name, seen=0, evals=[], best=None, best_step=None, best_state=None, step_times=[])
        by_name[job.name] = prep

    def evaluate(prep: dict, split: str, examples=None) -> dict:
        set_active_adapters(model, [prep["name"]])
        model.eval()
        cfg = prep["spec"]["train"]
        return ranks.evaluate(prep["task"], model, prep["tokenizer"], prep["rows"][split],
                              cfg.get("eval_batch_size", 64), cfg["max_length"], examples=examples)

    clock = [time.perf_counter()]

    def on_step(pack_step: int, results) -> None:
        step_s = time.perf_counter() - clock[0]  # the pack's step (evaluations not counted)
        for name, res in results.items():
            prep = by_name[name]
            if res.steps == prep["seen"]:
                continue
            prep["seen"] = res.steps
            prep["step_times"].append(step_s)
            cfg, steps = prep["spec"]["train"], prep["steps"]
            every = cfg.get("eval_every") or steps
            if res.steps % every == 0 or res.steps == steps:
                metric = evaluate(prep, "dev")[prep["task"].metric]
                prep["evals"].append({"step": res.steps, "metric": metric})
                if prep["best"] is None or metric > prep["best"]:
                    prep["best"], prep["best_step"] = metric, res.steps
                    prep["best_state"] = {k: t.detach().clone() for k, t in adapter_tensors(model, name).items()
                                          if isinstance(t, torch.nn.Parameter)}
            if res.finished_at == pack_step:
                _finish(prep, res)
        clock[0] = time.perf_counter()

    def _finish(prep: dict, res) -> None:
        live = adapter_tensors(model, prep["name"])
        with torch.no_grad():
            for k, t in (prep["best_state"] or {}).items():
                live[k].copy_(t)
        dev = evaluate(prep, "dev")
        examples: dict = {}
        test = evaluate(prep, "test", examples)
        spec, rows = prep["spec"], prep["rows"]
        times, tokens = prep["step_times"], prep["tokens"][: len(prep["step_times"])]
        record = {
            **spec, "status": "ok", "metric": prep["task"].metric, "dev": dev, "test": test,
            "test_examples": examples, "dev_size": len(rows["dev"]), "dev_chance": prep["task"].chance(rows["dev"]),
            "best_step": prep["best_step"], "evals": prep["evals"], "steps": prep["steps"],
            "trainable_params": prep["trainable"], "total_params": prep["total"],
            "trainable_pct": 100 * prep["trainable"] / prep["total"],
            "peak_memory_mb": peak_memory_mb("cpu"), "peak_memory_mb_per_process": [peak_memory_mb("cpu")],
            "estimate_mb": prep["estimate_mb"], "processes": 1,
            "packed": {"runs": len(specs), "run_ids": [s["run_id"] for s in specs], "estimate_mb": pack_estimate_mb},
            "median_step_s": statistics.median(times), "train_seconds": sum(times),
            # this run's tokens over the pack's steps after the first (as the worker counts); the pack's
            # throughput is the sum over its runs
            "tokens_per_s": sum(tokens) * (len(times) - 1) / len(times) / max(sum(times[1:]), 1e-9)
            if len(times) > 1 else sum(tokens) / times[0],
            "final_train_loss": statistics.fmean(res.losses[-20:]),
            "wall_s": time.perf_counter() - start, "env": environment("cpu"),
        }
        atomic_write_json(out_dir / f"{spec['run_id']}.result.json", record)

    train_many(model, jobs, base_dropout=True, on_step=on_step)
    return [json.loads((out_dir / f"{s['run_id']}.result.json").read_text()) for s in specs]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from .procs import exit_with_parent

    exit_with_parent()
    specs = json.loads(Path(argv[0]).read_text())
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        run_pack(specs, argv[1])
    except Exception:  # the runner records the runs without a result file as failed, with this message
        sys.stderr.write(traceback.format_exc()[-4000:])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
