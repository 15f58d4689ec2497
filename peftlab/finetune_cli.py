"""``peftlab train``: one command from a data file to an adapter (see :func:`peftlab.finetune.finetune`).

    peftlab train --model minilm-l6 --data reviews.csv --eval-split 0.1 --task classify --method lora --out runs/reviews

Wiring (in :func:`peftlab.cli.build_parser`): ``add_train_parser(sub)``; the parser's ``func`` is
:func:`run_train`, which returns the exit status. A user error (a bad option, a malformed data file) is
raised as a :class:`peftlab.ConfigError` with one line, which ``peftlab.cli.main`` prints and exits 2 on;
run directly (:func:`main`), it does the same itself.
"""

from __future__ import annotations

import argparse
import json
import sys

from .util.helpformat import DefaultsFormatter as _Formatter

TASK_HELP = {
    "classify": "text (or a pair: --text-column a,b) + label; accuracy and macro-F1",
    "tokens": "a words list + a tags list per row (JSONL/Parquet); entity F1",
    "sft": "prompt/response columns or a chat 'messages' list; loss on the response only",
    "lm": "raw text; loss and perplexity",
}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = _positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1 (e.g. 0.1), got {text}")
    return value


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``train`` sub-command to ``subparsers`` (from ``parser.add_subparsers``)."""
    from .data.task import DEFAULT_MAX_LENGTH, TASKS
    from .finetune import DEFAULT_LR, METHODS

    lrs = ", ".join(f"{m} {DEFAULT_LR[m]:g}" for m in METHODS)
    p = subparsers.add_parser(
        "train",
        help="train an adapter on your own data file (CSV, TSV, JSONL, Parquet)",
        description="Train an adapter on your own data: reads the file, builds the model with the task's head, "
        "wraps it with the method, trains with a progress bar (resuming from OUT/checkpoint), evaluates, and "
        "writes OUT/adapter (peftlab), OUT/peft (HF PEFT) and OUT/metrics.json.",
        formatter_class=_Formatter,
    )
    p.add_argument("--model", required=True, help="packaged short name (minilm-l6, smollm2-135m), local folder or hub id")
    p.add_argument("--data", required=True, metavar="FILE", help="training data: .csv, .tsv, .jsonl or .parquet")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--eval-data", metavar="FILE", help="a separate eval file (same columns)")
    group.add_argument("--eval-split", type=_fraction, metavar="FRACTION", help="hold out this fraction of --data for eval, e.g. 0.1")
    p.add_argument(
        "--task", required=True, choices=TASKS,
        help="; ".join(f"{t}: {h}" for t, h in TASK_HELP.items()),
    )  # fmt: skip
    p.add_argument("--method", default="lora", choices=METHODS, help="adapter method, or full fine-tuning")
    p.add_argument("--r", type=_positive_int, help="rank of lora, dora, qlora (default 8) and adalora's target rank")
    p.add_argument("--alpha", type=_positive_float, help="LoRA scale numerator (default 2 × r)")
    p.add_argument(
        "--target", nargs="+", metavar="NAME",
        help="target modules: names (suffix match) or all-linear (default: the query and value projections)",
    )  # fmt: skip
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", default=[],
        help="any other config field of the method, e.g. --set reduction_factor=8 or --set dropout=0.1",
    )  # fmt: skip
    p.add_argument("--text-column", metavar="C", help="text column (classify: 'a,b' for a pair; tokens: the words list); default: per task")
    p.add_argument("--label-column", metavar="C", help="label column (classify) or tags column (tokens); default: label / ner_tags")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--max-steps", type=_positive_int, metavar="N", help="optimizer steps (default: one epoch)")
    length.add_argument("--epochs", type=_positive_float, metavar="E", help="epochs over --data (default 1)")
    p.add_argument("--lr", type=_positive_float, help=f"peak learning rate (default per method: {lrs})")
    p.add_argument("--batch-size", type=_positive_int, default=16, metavar="B", help="training batch size")
    p.add_argument(
        "--max-length", type=_positive_int, metavar="T",
        help="tokens per example (default: " + ", ".join(f"{t} {n}" for t, n in DEFAULT_MAX_LENGTH.items()) + ")",
    )  # fmt: skip
    p.add_argument("--warmup-ratio", type=float, default=0.06, help="share of steps with linear warm-up")
    p.add_argument("--eval-every", type=_positive_int, metavar="N", help="also evaluate every N steps")
    p.add_argument("--save-every", type=int, metavar="N", help="checkpoint every N steps (default: 10%% of the run, ≥ 50; 0 = never)")
    p.add_argument("--packing", action="store_true", help="sft / lm: pack examples into blocks of --max-length")
    p.add_argument("--chat-template", action="store_true", help="sft: render prompt/response with the tokenizer's chat template")
    p.add_argument(
        "--exact-match", choices=["auto", "yes", "no"], default="auto",
        help="sft: greedy-generation exact match on the eval set (auto: when references are ≤ 8 tokens)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, data order and eval split")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="fp16 needs CUDA")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (resumes when it holds a checkpoint of this run)")
    p.set_defaults(func=run_train)
    return p


def _set_options(items: list[str]) -> dict:
    from .util.errors import ConfigError

    params = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def run_train(args) -> int:
    """Run ``peftlab train`` from parsed ``args``; prints the metrics' summary. Returns 0."""
    import transformers

    from .finetune import finetune

    transformers.utils.logging.disable_progress_bar()  # weight-loading bars; training has its own
    target = args.target
    if target is not None and len(target) == 1:
        target = target[0] if target[0] == "all-linear" else [t for t in target[0].split(",") if t]
    metrics = finetune(
        args.model,
        args.data,
        args.task,
        args.method,
        args.out,
        eval_data=args.eval_data,
        eval_split=args.eval_split,
        r=args.r,
        alpha=args.alpha,
        target_modules=target,
        params=_set_options(args.set),
        text_column=args.text_column,
        label_column=args.label_column,
        max_steps=args.max_steps,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        warmup_ratio=args.warmup_ratio,
        eval_every=args.eval_every,
        save_every=args.save_every,
        packing=args.packing,
        chat_template=args.chat_template,
        exact_match={"auto": None, "yes": True, "no": False}[args.exact_match],
        precision=args.precision,
        device=args.device,
        progress=not args.no_progress,
    )
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics["eval"].items() if k != "examples"}
    print(f"eval: {json.dumps(shown)}" if shown else "eval: none (no --eval-data or --eval-split)")
    print(
        f"trainable params: {metrics['trainable_params']:,d} of {metrics['total_params']:,d} "
        f"({metrics['trainable_pct']:.3f}%); steps: {metrics['steps']}; peak memory: {metrics['peak_memory_mb']:.0f} MB"
    )
    for note in metrics["notes"]:
        print(note)
    print(f"written to {args.out}: " + ", ".join(n for n in ("adapter", "model", "peft", "metrics.json") if n in _written(args.out)))
    return 0


def _written(out: str) -> list[str]:
    from pathlib import Path

    from .finetune import MANIFEST

    path = Path(out) / MANIFEST
    return json.loads(path.read_text())["written"] if path.is_file() else []


def main(argv: list[str] | None = None) -> int:
    """``python -m peftlab.finetune_cli ...``: the ``train`` command alone (same errors and exit codes)."""
    import os

    from .util.errors import PeftlabError

    parser = argparse.ArgumentParser(prog="peftlab")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        return args.func(args)
    except (PeftlabError, OSError, ValueError) as exc:
        if os.environ.get("PEFTLAB_DEBUG", "") not in ("", "0"):
            raise
        print(f"peftlab train: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
