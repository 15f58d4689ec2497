"""The ``peftlab`` command: ``info``, ``bench``, ``merge`` and ``export``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _method_config(method: str, options: list[str]):
    """Build a config from ``--method`` and ``--set key=value`` options (values parsed as JSON when possible)."""
    from .config import config_class

    kwargs = {}
    for item in options or []:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return config_class(method)(**kwargs)


def cmd_info(args) -> int:
    import peftlab
    from peftlab.inject import get_state

    model, _ = peftlab.load_model(args.model, kind=args.kind)
    total_before = peftlab.count_parameters(model)[1]
    peftlab.wrap(model, _method_config(args.method, args.set))
    state = get_state(model)
    trainable, total = peftlab.count_parameters(model)
    print(f"model: {args.model} ({type(model).__name__}, {total_before:,d} parameters)")
    print(f"method: {state.config.method}  config: {json.dumps(state.config.to_dict(), default=str)}")
    print(f"targeted modules ({len(state.targets)}):")
    for path in state.targets:
        print(f"  {path}  {state.shapes.get(path, '')}")
    if state.modules_to_save:
        print(f"modules to save: {', '.join(state.modules_to_save)}")
    print(
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    )
    return 0


def cmd_bench(args) -> int:
    from .bench.report import write_report
    from .bench.runner import run_sweep
    from .bench.sweep import expand, load_sweep

    if args.sweep:
        sweep = load_sweep(args.sweep)
    else:
        sweep = {"name": "cli", "models": ["minilm-l6"], "tasks": ["sst2"], "methods": ["full", "lora"]}
    if args.model:
        sweep["models"] = args.model
    if args.task:
        sweep["tasks"] = args.task
    if args.methods:
        sweep["methods"] = [{"method": m} for m in args.methods]
    if args.ranks:
        for m in sweep["methods"]:
            if isinstance(m, dict) and m.get("method") in ("lora", "qlora", "lora-int8", "hf-lora"):
                m.setdefault("params", {})["r"] = args.ranks
    if args.seeds:
        sweep["seeds"] = args.seeds
    if args.max_steps:
        sweep.setdefault("train", {})["max_steps"] = args.max_steps
    if args.data:
        sweep["data"] = args.data
    specs = expand(sweep)
    out = Path(args.out or f"runs/{sweep['name']}")
    print(f"sweep {sweep['name']!r}: {len(specs)} runs -> {out}")
    records = run_sweep(specs, out, timeout=args.timeout)
    report = write_report(records, out, title=f"peftlab bench: {sweep['name']}")
    ok = sum(r.get("status") == "ok" for r in records)
    print(f"{ok} of {len(records)} runs succeeded. Report: {report.resolve()}")
    return 0 if ok else 1


def cmd_merge(args) -> int:
    import peftlab

    model, tokenizer = peftlab.load_model(args.model, kind=args.kind)
    peftlab.load_adapter(model, args.adapter)
    peftlab.save_merged(model, args.out)
    tokenizer.save_pretrained(args.out)
    print(f"merged model written to {Path(args.out).resolve()}")
    return 0


def cmd_export(args) -> int:
    import peftlab

    model, _ = peftlab.load_model(args.model, kind=args.kind)
    peftlab.load_adapter(model, args.adapter)
    peftlab.export_peft(model, args.out)
    print(f"HF PEFT adapter written to {Path(args.out).resolve()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftlab", description="Parameter-efficient fine-tuning for transformers."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    kinds = ["seq-cls", "token-cls", "causal-lm", "base"]

    info = sub.add_parser("info", help="show what a method would target and the parameter counts")
    info.add_argument(
        "--model", default="minilm-l6", help="path, hub id or packaged name (minilm-l6, smollm2-135m)"
    )
    info.add_argument("--kind", default="seq-cls", choices=kinds)
    info.add_argument("--method", default="lora")
    info.add_argument("--set", action="append", metavar="KEY=VALUE", help="config field, e.g. --set r=16")
    info.set_defaults(func=cmd_info)

    bench = sub.add_parser("bench", help="run a benchmark sweep and write report.md + plots")
    bench.add_argument("--sweep", help="YAML sweep file (benchmarks/sweeps/*.yaml)")
    bench.add_argument("--model", nargs="+")
    bench.add_argument("--task", nargs="+")
    bench.add_argument("--methods", nargs="+")
    bench.add_argument("--ranks", nargs="+", type=int)
    bench.add_argument("--seeds", nargs="+", type=int)
    bench.add_argument("--max-steps", type=int)
    bench.add_argument(
        "--data",
        help="data folder holding sst2/ and conll2003/ (default: $PEFTLAB_DATA or ../shared/data), "
        "or hf / hf:<dataset id> for the Hugging Face hub (needs the datasets package)",
    )
    bench.add_argument("--out", help="output folder (default: runs/<sweep name>)")
    bench.add_argument("--timeout", type=float, help="seconds per run before it is recorded as failed")
    bench.set_defaults(func=cmd_bench)

    for name, func, text in (
        ("merge", cmd_merge, "merge a saved adapter into its base and save_pretrained it"),
        ("export", cmd_export, "convert a saved peftlab adapter to HF PEFT's format"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--model", required=True)
        p.add_argument("--kind", default="seq-cls", choices=kinds)
        p.add_argument("--adapter", required=True)
        p.add_argument("--out", required=True)
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import PeftlabError

    args = build_parser().parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        return args.func(args)
    except PeftlabError as exc:
        print(f"peftlab {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
