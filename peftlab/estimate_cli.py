"""``peftlab estimate``: the memory breakdown of a training run as a table, or the largest batch / length that fits.

    peftlab estimate --model smollm2-135m --method lora --r 16 --target all-linear --batch 8 --seq 2048 --quant nf4
    peftlab estimate --model meta-llama/Meta-Llama-3-8B --method qlora --r 64 --seq 2048 --fit 24GB

``--model``: a local model folder, a JSON config file, a peftlab short name or a built-in hub id (no download).
"""

from __future__ import annotations

import argparse
import json
import re

from .util.errors import ConfigError

#: a memory size: a number (one decimal point at most) and an optional unit, e.g. 24GB, 24GiB, 800MB, 1.5G
_SIZE = re.compile(r"\s*(\d+(\.\d*)?|\.\d+)\s*([kKmMgGtT]i?)?[bB]?\s*")

METHODS = ("full", "lora", "qlora", "adalora", "houlsby", "pfeiffer", "parallel", "prefix")


def add_parser(sub) -> argparse.ArgumentParser:
    from .util.helpformat import DefaultsFormatter as _Formatter

    p = sub.add_parser(
        "estimate",
        help="predict training memory (and FLOPs) from a config alone; --fit searches",
        formatter_class=_Formatter,
    )
    p.add_argument("--model", required=True, help="folder, JSON config, short name or built-in hub id")
    p.add_argument("--kind", choices=["causal-lm", "seq-cls", "token-cls"], help="default: by architecture")
    p.add_argument("--method", default="lora", choices=METHODS, help="adapter method, or full fine-tuning")
    p.add_argument("--r", type=int, default=8, help="LoRA rank (AdaLoRA: init_r)")
    p.add_argument(
        "--target", default=None, help="target modules: all-linear, a regex, or comma-separated names"
    )
    p.add_argument("--reduction-factor", type=int, default=16, help="bottleneck adapters: m = d / factor")
    p.add_argument("--prefix-tokens", type=int, default=20, help="prefix tuning: virtual tokens per layer")
    p.add_argument("--batch", type=int, default=8, help="micro-batch size (sequences per step)")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"], help="training precision")
    p.add_argument("--quant", choices=["nf4", "fp4", "int8"], help="quantized base (qlora defaults to nf4)")
    p.add_argument("--optimizer", default="adamw",
                   choices=["adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit", "paged_adamw32bit"],
                   help="optimizer (its state: 8 bytes per trainable parameter for adamw)")  # fmt: skip
    p.add_argument("--checkpointing", default="none", choices=["none", "full", "selective"],
                   help="gradient checkpointing")  # fmt: skip
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="device the run's memory is for")
    p.add_argument("--loss", default="fused", choices=["fused", "unfused"],
                   help="causal LMs: peftlab's fused loss (no full logits kept) or transformers' own")  # fmt: skip
    p.add_argument(
        "--fit", metavar="SIZE", help="memory budget (24GB, 24GiB, 800MB): print the largest that fits"
    )
    p.add_argument("--fit-what", default="batch", choices=["batch", "seq"], help="what --fit varies")
    p.add_argument("--json", action="store_true", help="print the breakdown as JSON")
    p.set_defaults(func=run)
    return p


def peft_config(args):
    """The peftlab config for ``--method`` (None for full fine-tuning) and the quantization."""
    import peftlab

    target = args.target
    if target and target != "all-linear" and "," in target:
        target = [t for t in target.split(",") if t]
    elif target and target != "all-linear" and not any(c in target for c in "*.[(|\\"):
        target = [target]
    quant = args.quant or ("nf4" if args.method == "qlora" else None)
    if args.method in ("lora", "qlora"):
        return peftlab.LoraConfig(r=args.r, alpha=2 * args.r, target_modules=target), quant
    if args.method == "adalora":
        return peftlab.AdaLoraConfig(init_r=args.r, target_r=max(1, args.r * 2 // 3), target_modules=target,
                                     total_steps=1000), quant  # fmt: skip
    if args.method in ("houlsby", "pfeiffer", "parallel"):
        return peftlab.AdapterConfig(style=args.method, reduction_factor=args.reduction_factor), quant
    if args.method == "prefix":
        return peftlab.PrefixConfig(num_virtual_tokens=args.prefix_tokens), quant
    return None, quant


def run(args) -> int:
    from .estimator.estimate import estimate, fit, parse_size

    config, quant = peft_config(args)
    kwargs = dict(
        model_or_path=args.model, config=config, batch_size=args.batch, seq_len=args.seq,
        precision=args.precision, quant=quant, optimizer=args.optimizer,
        gradient_checkpointing=args.checkpointing, grad_accum=args.grad_accum, kind=args.kind,
        device=args.device, loss=args.loss,
    )  # fmt: skip
    if args.fit:
        if not _SIZE.fullmatch(args.fit):
            raise ConfigError(
                f"--fit {args.fit!r} is not a memory size; write a number and a unit, e.g. 24GB, 24GiB, 800MB, 1.5G"
            )
        budget = parse_size(args.fit)
        what = "batch_size" if args.fit_what == "batch" else "seq_len"
        value, est = fit(budget, args.fit_what, **{k: v for k, v in kwargs.items() if k != what})
        gib = budget / 2**30
        if est is None:
            print(f"nothing fits in {args.fit} ({gib:.2f} GiB): even {args.fit_what} 1 needs more; "
                  f"try --quant nf4, --checkpointing full, or a smaller --{'seq' if what == 'seq_len' else 'batch'}")  # fmt: skip
            return 1
        print(f"largest {args.fit_what} that fits in {args.fit} ({gib:.2f} GiB): {value}\n")
        print(json.dumps(est.to_dict(), indent=1) if args.json else est.table())
        return 0
    est = estimate(**kwargs)
    print(json.dumps(est.to_dict(), indent=1) if args.json else est.table())
    return 0


_BENCH = {
    "lora": ("lora", {}, None),
    "dora": ("lora", {"use_dora": True}, None),
    "adalora": ("adalora", {}, None),
    "houlsby": ("adapter", {"style": "houlsby"}, None),
    "pfeiffer": ("adapter", {"style": "pfeiffer"}, None),
    "parallel": ("adapter", {"style": "parallel"}, None),
    "prefix": ("prefix", {}, None),
    "qlora": ("lora", {}, "nf4"),
    "lora-int8": ("lora", {}, "int8"),
}


def bench_estimate_mb(spec: dict, model, kind: str, device: str, steps: int) -> float | None:
    """The estimated total peak (MiB) of a benchmark run (``peftlab.bench.worker``); None for HF PEFT peers.

    :func:`bench_estimate` gives the whole breakdown."""
    est = bench_estimate(spec, model, kind, device, steps)
    return None if est is None else est.total_peak / 2**20


def pack_peak_mb(estimates: list) -> float:
    r"""The estimated peak (MiB) of runs packed over one frozen base (``peftlab bench --pack``)::

        peak ≈ W_base + Σ_j (peak_j − W_base,j)

    the base weights once, and per run what its step adds (its adapter, gradients, optimizer states and the
    activations of its rows: a pack's activations are those of the stacked batch, linear in its rows).
    ``estimates``: each run's :class:`peftlab.estimator.estimate.Estimate` alone."""
    base = max(e.frozen_weights for e in estimates)
    return (base + sum(e.total_peak - e.frozen_weights for e in estimates)) / 2**20


def bench_estimate(spec: dict, model, kind: str, device: str, steps: int):
    """The estimate (:class:`peftlab.estimator.estimate.Estimate`) of a benchmark run; None for HF PEFT peers.

    Uses the run's batch size and max_length (grouped batches are usually shorter: an upper bound) and counts
    tensors only: the measured CPU peak RSS also holds the Python/torch runtime and the data.
    """
    est = bench_estimate(spec, model, kind, device, steps)
    return None if est is None else est.total_peak / 2**20


def bench_estimate(spec: dict, model, kind: str, device: str, steps: int):
    """The :class:`peftlab.estimator.estimate.Estimate` of a benchmark run (None for HF PEFT peers)."""
    from .core.config import config_class
    from .estimator.estimate import estimate

    cfg = spec["train"]
    method = spec["method"]
    if method != "full" and method not in _BENCH:
        return None
    config = None
    quant = None
    if method in _BENCH:
        name, fixed, quant = _BENCH[method]
        params = {
            k: v for k, v in (spec.get("params") or {}).items() if k not in ("quant_type", "double_quant")
        }
        if quant == "nf4":
            quant = (spec.get("params") or {}).get("quant_type", "nf4")
        kwargs = {**fixed, **params}
        if name == "adalora":
            kwargs.setdefault("total_steps", steps)
        cls = config_class(name)
        heads = [h for h in ("classifier", "score") if hasattr(model, h)]
        if kind in ("seq-cls", "token-cls") and "modules_to_save" in cls.__dataclass_fields__:
            kwargs.setdefault("modules_to_save", heads or None)
        config = cls(**kwargs)
    est = estimate(
        model.config,
        config,
        cfg["batch_size"],
        cfg["max_length"],
        precision=cfg.get("precision", "fp32"),
        quant=quant,
        optimizer=cfg.get("optimizer", "adamw"),
        gradient_checkpointing=cfg.get("gradient_checkpointing", "none"),
        grad_accum=cfg.get("grad_accum", 1),
        kind=kind,
        device="cuda" if device.startswith("cuda") else "cpu",
    )
    return est
