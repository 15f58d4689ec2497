"""``finetune``: one call from a data file to a trained adapter.

    import peftlab.finetune as ft
    metrics = ft.finetune("minilm-l6", "reviews.csv", task="classify", method="lora", out="runs/reviews",
                          eval_split=0.1, max_steps=300)

Steps: read and encode the data (:func:`peftlab.data.prepare`); load the model with the task's head
(classify: sequence classification with the data's label set; tokens: token classification; sft / lm:
causal LM); wrap it with ``method`` (the head trains fully through ``modules_to_save``); train with
peftlab's loop (:func:`peftlab.training.loop.train`, a tqdm bar, linear warm-up and decay); evaluate; write

* ``OUT/adapter``: peftlab's format (:func:`peftlab.save_adapter`); ``OUT/model`` for ``method="full"``;
* ``OUT/peft``: Hugging Face PEFT's format (:func:`peftlab.export_peft`), when the method has an HF
  PEFT equivalent (lora, dora, adalora, prefix, qlora); otherwise ``metrics.json`` says why not;
* ``OUT/metrics.json``: eval metrics, trainable / total parameters, peak memory, steps, labels, settings.

A run resumes from ``OUT/checkpoint`` (:mod:`peftlab.finetune_checkpoint`) when it was interrupted.
Every file is written atomically (temporary + rename), and only files this function wrote are ever
replaced: an existing ``OUT/adapter`` (etc.) that a previous ``finetune`` did not write stops the run.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .finetune_checkpoint import Checkpointer, resumed_lr, write_json
from .util.errors import ConfigError

METHODS = ("lora", "dora", "adalora", "houlsby", "pfeiffer", "parallel", "prefix", "qlora", "full")
#: default learning rate per method (short CPU budgets on small models; override with lr=)
DEFAULT_LR = {
    "full": 5e-5,
    "lora": 1e-3,
    "dora": 1e-3,
    "qlora": 1e-3,
    "adalora": 2e-3,
    "houlsby": 1e-3,
    "pfeiffer": 1e-3,
    "parallel": 1e-3,
    "prefix": 3e-3,
}
HF_PEFT_METHODS = ("lora", "dora", "adalora", "prefix", "qlora")
HEAD_NAMES = ("classifier", "score")
MANIFEST = ".peftlab-train.json"
OUTPUTS = ("adapter", "model", "peft", "metrics.json", "checkpoint")


def head_names(model: nn.Module) -> list[str]:
    """The model's task head modules (trained fully and saved with the adapter)."""
    return [h for h in HEAD_NAMES if isinstance(getattr(model, h, None), nn.Module)]


def method_config(
    method: str,
    model: nn.Module,
    task_kind: str,
    total_steps: int,
    r: int | None = None,
    alpha: float | None = None,
    target_modules=None,
    params: dict | None = None,
):
    """The peftlab config of ``method`` (None for ``full``); ``params`` overrides any config field."""
    import peftlab

    check_method_args(method, r, alpha, target_modules, params)
    params = dict(params or {})
    heads = head_names(model) if task_kind in ("seq-cls", "token-cls") else []
    if method == "full":
        return None
    common = {"modules_to_save": heads or None}
    if target_modules is not None:
        common["target_modules"] = target_modules
    if method in ("lora", "dora", "qlora"):
        rank = r if r is not None else 8
        kwargs = {"r": rank, "alpha": alpha if alpha is not None else 2 * rank, "dropout": 0.05, "use_dora": method == "dora"}
        cls = peftlab.LoraConfig
    elif method == "adalora":
        rank = r if r is not None else 8
        kwargs = {
            "init_r": params.pop("init_r", math.ceil(1.5 * rank)),
            "target_r": rank,
            "alpha": alpha if alpha is not None else 2 * rank,
            "t_init": round(0.1 * total_steps),
            "t_final": round(0.3 * total_steps),
            "delta_t": max(1, total_steps // 50),
            "orth_reg_weight": 0.1,
            "total_steps": total_steps,
        }
        cls = peftlab.AdaLoraConfig
    elif method == "prefix":
        kwargs, cls = {"num_virtual_tokens": 20, "projection_dim": 32}, peftlab.PrefixConfig
    else:
        kwargs, cls = {"style": method, "reduction_factor": 16}, peftlab.AdapterConfig
    return cls(**{**common, **kwargs, **params})


def fixed_fields(method: str) -> dict:
    """The config fields a method name fixes (``dora``: LoRA with use_dora; ``houlsby``: an adapter's style)."""
    if method == "dora":
        return {"use_dora": True}
    if method in ("houlsby", "pfeiffer", "parallel"):
        return {"style": method}
    return {}


def config_class(method: str):
    """The peftlab config class of ``method`` (None for ``full``)."""
    import peftlab

    if method == "full":
        return None
    if method in ("lora", "dora", "qlora"):
        return peftlab.LoraConfig
    return {"adalora": peftlab.AdaLoraConfig, "prefix": peftlab.PrefixConfig}.get(method, peftlab.AdapterConfig)


def check_method_args(method: str, r=None, alpha=None, target_modules=None, params: dict | None = None) -> None:
    """The options given fit ``method`` (before anything is loaded); else one ConfigError naming them."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    if method == "full":
        if r is not None or alpha is not None or target_modules is not None or params:
            raise ConfigError("method 'full' trains every parameter: --r, --alpha, --target and --set do not apply")
        return
    if method in ("prefix", "houlsby", "pfeiffer", "parallel") and (r is not None or alpha is not None):
        raise ConfigError(f"--r / --alpha apply to lora, dora, qlora and adalora, not {method!r}")
    if method == "prefix" and target_modules is not None:
        raise ConfigError("--target does not apply to prefix tuning (it prefixes every attention layer)")
    fields = set(config_class(method).__dataclass_fields__) - {"extra", "method"}
    unknown = sorted(set(params or {}) - fields)
    if unknown:
        raise ConfigError(f"--set {', '.join(unknown)}: not a field of {method}; valid: {', '.join(sorted(fields))}")


def build_model(model_name: str, data, method: str, total_steps: int, device: str, **method_kwargs) -> nn.Module:
    """Load ``model_name`` with the head ``data`` needs and apply ``method``."""
    import peftlab

    model, _ = peftlab.load_model(model_name, kind=data.kind, **data.model_kwargs())
    config = method_config(method, model, data.kind, total_steps, **method_kwargs)
    if method == "qlora":
        model = peftlab.quantize(model, bits=4, quant_type="nf4", double_quant=True, skip_modules=head_names(model))
    if config is None:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = peftlab.wrap(model, config)
    return model.to(device)


def peak_memory_mb(device: str) -> float:
    """CUDA max allocated on a GPU; the process's peak resident set size on a CPU."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _claim_outputs(out: Path) -> dict:
    """The manifest of files this function wrote in ``out``; refuses outputs it did not write."""
    import json

    manifest = out / MANIFEST
    mine = json.loads(manifest.read_text()) if manifest.is_file() else {"written": []}
    for name in OUTPUTS:
        if (out / name).exists() and name not in mine["written"]:
            raise ConfigError(
                f"{out / name} exists and was not written by peftlab train; choose another --out (nothing is overwritten)"
            )
    return mine


def _record(out: Path, mine: dict, name: str) -> None:
    if name not in mine["written"]:
        mine["written"].append(name)
        write_json(out / MANIFEST, mine)


def finetune(
    model: str,
    data,
    task: str,
    method: str = "lora",
    out: str | Path = "peftlab-out",
    *,
    eval_data=None,
    eval_split: float | None = None,
    r: int | None = None,
    alpha: float | None = None,
    target_modules=None,
    params: dict | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    max_steps: int | None = None,
    epochs: float | None = None,
    lr: float | None = None,
    batch_size: int = 16,
    eval_batch_size: int = 64,
    max_length: int | None = None,
    seed: int = 0,
    warmup_ratio: float = 0.06,
    weight_decay: float = 0.0,
    eval_every: int | None = None,
    save_every: int | None = None,
    packing: bool = False,
    chat_template: bool = False,
    exact_match: bool | None = None,
    group_by_length: bool = True,
    precision: str = "fp32",
    device: str | None = None,
    progress: bool = True,
    step_callback: Callable[[int], None] | None = None,
) -> dict:
    """Train ``method`` on ``model`` for ``task`` from ``data`` and write ``out`` (module docstring).

    Args:
        model: a packaged short name (``minilm-l6``, ``smollm2-135m``), a local folder or a hub id.
        data / eval_data / eval_split: files (CSV, TSV, JSONL, Parquet); see :func:`peftlab.data.prepare`.
        task: classify | tokens | sft | lm.   method: one of :data:`METHODS`.
        r / alpha / target_modules / params: the adapter's rank, scale, target modules and any other config
            field (``params={"reduction_factor": 8}``).
        max_steps / epochs: the length of training (default: one epoch).   lr: default :data:`DEFAULT_LR`.
        eval_every: also evaluate every this many steps (recorded in ``metrics.json``).
        save_every: checkpoint every this many steps (default: every 10% of the run, at least 50 steps; 0 = never).
        step_callback: called with the global step number after each optimizer step.

    Returns:
        The dict written to ``out/metrics.json``.
    """
    import peftlab

    from . import data as peftlab_data
    from .training.loop import train

    if task not in peftlab_data.TASKS:
        raise ConfigError(f"unknown task {task!r}; valid tasks: {', '.join(peftlab_data.TASKS)}")
    check_method_args(method, r, alpha, target_modules, params)
    if max_steps is not None and epochs is not None:
        raise ConfigError("give either max_steps or epochs, not both")
    for name, value in (("batch_size", batch_size), ("max_steps", max_steps)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if epochs is not None and not epochs > 0:
        raise ConfigError(f"epochs must be > 0, got {epochs!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder (new or one a previous run wrote)")
    mine = _claim_outputs(out)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(peftlab.resolve_model_path(model))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prepared = peftlab_data.prepare(
        task, tokenizer, data, eval_data, eval_split, text_column=text_column, label_column=label_column,
        max_length=max_length, seed=seed, packing=packing, chat_template=chat_template, exact_match=exact_match,
    )
    steps = max_steps or max(1, math.ceil((epochs or 1) * len(prepared.train) / batch_size))
    lr = lr if lr is not None else DEFAULT_LR[method]
    torch.manual_seed(seed)  # the head and adapter initialisation, then dropout, follow from the seed
    net = build_model(
        model, prepared, method, steps, device, r=r, alpha=alpha, target_modules=target_modules, params=params
    )
    trainable, total = peftlab.count_parameters(net)

    warmup = int(warmup_ratio * steps)
    if save_every is None:
        save_every = max(50, steps // 10)
    if method == "adalora":
        save_every = 0  # its rank allocator's importance scores are not checkpointed: it restarts instead
    fingerprint = {
        "model": model, "task": task, "method": method, "data": str(Path(data).resolve()) if isinstance(data, (str, Path)) else "in-memory",
        "eval_data": str(eval_data), "eval_split": eval_split, "r": r, "alpha": alpha, "target_modules": target_modules,
        "params": params, "steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed, "max_length": max_length,
        "warmup_ratio": warmup_ratio, "weight_decay": weight_decay, "packing": packing, "chat_template": chat_template,
    }  # fmt: skip
    ckpt = Checkpointer(out / "checkpoint", net, fingerprint)
    state = ckpt.read()
    done = 0
    if state is not None:
        ckpt.restore(state)
        done = state["step"]
        print(f"resuming from {out / 'checkpoint'} at step {done} of {steps}")

    def make(params_, base_lr):
        return peftlab.make_optimizer(params_, "adamw", lr=base_lr, weight_decay=weight_decay)

    session_lr = resumed_lr(lr, done, steps, warmup) if done else lr
    evals: list[dict] = []
    current = {"step": done}

    def evaluate() -> float:
        scores = prepared.evaluate(net, batch_size=eval_batch_size)
        evals.append({"step": current["step"], **{k: v for k, v in scores.items() if k != "examples"}})
        return prepared.score(scores)

    def hook(step: int) -> None:
        global_step = done + step + 1
        current["step"] = global_step
        if save_every and global_step % save_every == 0 and warmup <= global_step < steps:
            ckpt.save(global_step)
            _record(out, mine, "checkpoint")
        if step_callback is not None:
            step_callback(global_step)

    result = None
    if done < steps:
        result = train(
            net,
            prepared.batches(batch_size, seed, group_by_length, skip=done),
            steps - done,
            lr=session_lr,
            warmup_ratio=0.0 if done else warmup_ratio,
            weight_decay=weight_decay,
            evaluate=evaluate if prepared.eval is not None and eval_every else None,
            eval_every=eval_every,
            device=device,
            desc=f"{method} {task}",
            progress=progress,
            step_hook=hook,
            optimizer=ckpt.optimizer_factory(make, session_lr, state),
            precision=precision,
            restore_best=False,
        )
    final = prepared.evaluate(net, batch_size=eval_batch_size) if prepared.eval is not None else {}
    notes = []
    if method == "full":
        _save_full(net, tokenizer, out / "model")
        _record(out, mine, "model")
    else:
        _record(out, mine, "adapter")
        peftlab.save_adapter(net, out / "adapter")
        if method in HF_PEFT_METHODS:
            try:
                _record(out, mine, "peft")
                peftlab.export_peft(net, out / "peft")
            except peftlab.PeftlabError as exc:
                notes.append(f"peft: not written: {exc}")
        else:
            notes.append(f"peft: not written: HF PEFT has no {method} adapter (bottleneck adapters are peftlab's own)")
    if method == "full":
        notes.append("peft: not written: full fine-tuning has no adapter; the whole model is in model/")
    metrics = {
        "task": task, "model": model, "kind": prepared.kind, "method": method, "eval": final,
        "metric": prepared.score(final) if final else None, "labels": prepared.labels,
        "trainable_params": trainable, "total_params": total, "trainable_pct": 100 * trainable / total,
        "steps": steps, "resumed_from_step": done or None, "batch_size": batch_size, "lr": lr, "seed": seed,
        "train_rows": len(prepared.train), "eval_rows": len(prepared.eval) if prepared.eval is not None else 0,
        "final_train_loss": sum(result.losses[-20:]) / len(result.losses[-20:]) if result and result.losses else None,
        "first_train_loss": result.losses[0] if result and result.losses and not done else None,
        "train_seconds": result.train_seconds if result else 0.0, "wall_seconds": time.perf_counter() - start,
        "peak_memory_mb": peak_memory_mb(device), "device": device,
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if str(device).startswith("cuda") else "process peak RSS",
        "evals": evals, "notes": notes, "examples": final.get("examples"),
    }  # fmt: skip
    _record(out, mine, "metrics.json")
    write_json(out / "metrics.json", metrics)
    ckpt.remove()  # finished: the outputs are written, the training state is stale
    return metrics


def _save_full(model: nn.Module, tokenizer, target: Path) -> None:
    """``save_pretrained`` (safetensors) into a temporary folder beside ``target``, then swap it in."""
    import shutil
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    old = None
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a previous run's model/ (the manifest says it is ours)
            old = target.with_name(f".{target.name}-old")
            target.rename(old)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists():
            shutil.rmtree(old, ignore_errors=True)


__all__ = ["METHODS", "DEFAULT_LR", "HF_PEFT_METHODS", "finetune", "method_config", "build_model", "head_names", "check_method_args", "config_class"]
