"""The ``peftlab`` command: ``info``, ``bench``, ``merge`` and ``export``.

A user error (bad option, missing model or file, invalid config or YAML) prints one line,
``peftlab <command>: error: <what was wrong and what is valid>``, and exits with status 2;
``peftlab --debug <command> ...`` (or ``PEFTLAB_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from pathlib import Path

from .util.errors import ConfigError, PeftlabError


class UsageError(PeftlabError, ValueError):
    """A command-line argument is invalid (printed as one line, exit status 2)."""


#: Exceptions reported as one line (exit status 2) rather than a traceback: peftlab's own errors, and
#: the OSError / ValueError that transformers and the file system raise for a bad path, file or model.
USER_ERRORS = (PeftlabError, OSError, ValueError, re.error)


def _method_config(method: str, options: list[str]):
    """Build a config from ``--method`` and ``--set key=value`` options (values parsed as JSON when possible)."""
    from .finetune import METHODS, config_class, fixed_fields

    if method not in METHODS or method == "full":
        raise UsageError(f"--method {method!r}: valid methods: {', '.join(m for m in METHODS if m != 'full')}")
    kwargs = {}
    for item in options or []:
        if "=" not in item:
            raise UsageError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    cls = config_class(method)
    valid = sorted(f.name for f in dataclasses.fields(cls) if f.init)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise UsageError(
            f"--set {', '.join(unknown)}: unknown key for method {method!r}; valid keys: {', '.join(valid)}"
        )
    try:
        return cls(**{**fixed_fields(method), **kwargs})
    except TypeError as exc:  # a value of the wrong type compared or combined in validation
        raise UsageError(f"--set: invalid value for method {method!r}: {exc}") from None


def _check_model(name: str) -> None:
    """Fail fast, in one line, when ``--model`` is no packaged short name, model folder or hub model.

    Never waits on the network: a hub id is accepted when it is in the local cache; otherwise it is
    looked up once (10 s timeout), or refused at once under ``HF_HUB_OFFLINE=1``.
    """
    from .util.models import PACKAGED

    if name in PACKAGED:
        return
    valid = f"packaged short names: {', '.join(PACKAGED)}; or a local model folder or a Hugging Face hub id"
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return
        if (path / "adapter_config.json").is_file():
            raise UsageError(
                f"--model {name} is an adapter folder (adapter_config.json, no config.json); "
                "give the base model as --model and this folder as --adapter"
            )
        raise UsageError(f"--model {name} is a folder without config.json, so not a transformers model")
    if path.exists():
        return  # a file: let from_pretrained say what it makes of it
    from huggingface_hub import is_offline_mode, model_info, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return  # in the local hub cache
    except HFValidationError:  # not a hub id either: a path that does not exist
        raise UsageError(f"model {name!r} not found: no such folder; {valid}") from None
    if is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise UsageError(
            f"model {name!r} not found: no such folder, and not in the hub cache (HF_HUB_OFFLINE is set); {valid}"
        )
    try:
        model_info(name, timeout=10)
    except RepositoryNotFoundError:
        raise UsageError(
            f"model {name!r} not found: no such folder, and no such model on the hub; {valid}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - no connection: say so now instead of retrying for a minute
        if getattr(exc, "response", None) is not None:
            return  # the hub answered (gated, rate-limited...): from_pretrained gives the details
        raise UsageError(
            f"model {name!r} not found: no such folder, not in the hub cache, and the hub is unreachable "
            f"({type(exc).__name__}: {exc}); {valid}"
        ) from None


def _check_out(out: str) -> None:
    if Path(out).exists() and not Path(out).is_dir():
        raise UsageError(f"--out {out} is an existing file; give a folder to write into (new or existing)")


def cmd_info(args) -> int:
    import peftlab

    from .core.state import get_state

    config = _method_config(args.method, args.set)
    _check_model(args.model)
    model, _ = peftlab.load_model(args.model, kind=args.kind)
    total_before = peftlab.count_parameters(model)[1]
    peftlab.wrap(model, config)
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


def _sweep_part(part: str | None, specs: list[dict]) -> list[dict]:
    """specs[K-1::N] for ``--part K/N`` (all specs without it); a clear error for anything else."""
    if not part:
        return specs
    k, _, n = part.partition("/")
    if not (k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
        raise ConfigError(f"--part {part!r}: expected K/N with 1 <= K <= N, e.g. 1/2 and 2/2 for two processes")
    return specs[int(k) - 1 :: int(n)]


DATA_OPTIONS = ("eval_data", "eval_split", "text_column", "label_column")


def _bench_data(args, sweep: dict):
    """``--data``: a folder / ``hf`` source as it is, or a data file with the task and column options
    (:mod:`peftlab.bench.user_data`); the sweep is named after the file when no sweep file names it."""
    from .bench.user_data import looks_like_file

    if not looks_like_file(args.data):
        if any(getattr(args, k, None) is not None for k in DATA_OPTIONS):
            raise UsageError(
                f"--data {args.data} is a data folder or hub source; --eval-data, --eval-split, --text-column and "
                "--label-column apply to a data file (.csv, .tsv, .jsonl, .parquet)"
            )
        return args.data
    if not args.task and not args.sweep:
        raise UsageError(
            f"--data {args.data} is a data file: give its task, --task classify, tokens or sft (as for peftlab train)"
        )
    if not args.sweep:
        from .bench.sweep_schema import safe_stem

        sweep["name"] = safe_stem(Path(args.data).stem)
    data = {"file": args.data}
    for key, option in (("eval_file", "eval_data"), ("eval_split", "eval_split"), ("text_column", "text_column"),
                        ("label_column", "label_column")):  # fmt: skip
        if getattr(args, option, None) is not None:
            data[key] = getattr(args, option)
    return data


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
            if isinstance(m, dict) and m.get("method") in ("lora", "dora", "qlora", "lora-int8", "hf-lora"):
                m.setdefault("params", {})["r"] = args.ranks
    if args.seeds:
        sweep["seeds"] = args.seeds
    if args.max_steps:
        sweep.setdefault("train", {})["max_steps"] = args.max_steps
    if args.data:
        sweep["data"] = _bench_data(args, sweep)
    elif any(getattr(args, k, None) is not None for k in DATA_OPTIONS):
        raise UsageError(f"{', '.join('--' + k.replace('_', '-') for k in DATA_OPTIONS)} apply with --data FILE")
    for key in ("precision", "grad_accum", "processes", "distributed"):
        if getattr(args, key, None) is not None:
            sweep.setdefault("train", {})[key] = getattr(args, key)
    specs = expand(sweep)
    from .bench.multiprocess import check_train_config

    for spec in specs:
        check_train_config(spec["train"])
    for model in sorted({s["model"] for s in specs}):
        _check_model(model)
    from .bench.user_data import check_specs

    check_specs(specs)  # a data file: read, columns and values checked before any run starts
    out = Path(args.out or f"runs/{sweep['name']}")  # the name is checked by expand(): a plain folder name
    mine = _sweep_part(args.part, specs)
    print(f"sweep {sweep['name']!r}: {len(mine)} runs{f' (part {args.part} of {len(specs)})' if args.part else ''} -> {out}")
    from .bench.sweep_schema import number

    pack = args.pack if args.pack is not None else number(sweep.get("pack") or 1)
    records = run_sweep(mine, out, timeout=args.timeout, pack=pack)
    if args.part:  # the report covers every part's finished runs
        from .bench.runner import read_results

        ids = {s["run_id"] for s in specs}
        records = [r for r in read_results(out) if r.get("run_id") in ids]
    report = write_report(records, out, title=f"peftlab bench: {sweep['name']}")
    ok = sum(r.get("status") == "ok" for r in records)
    for r in records:
        if r.get("status") != "ok":
            error = " ".join(str(r.get("error", "no error recorded")).split())
            print(f"failed: {r.get('label')} on {r.get('task')} ({r.get('model')}, seed {r.get('seed')}): {error}")
    print(f"{ok} of {len(records)} runs succeeded. Report: {report.resolve()}")
    return 0 if ok else 1


def _saved_adapter_names(path: str) -> list[str]:
    """The adapter names a saved folder of several adapters lists ([] for a one-adapter folder)."""
    from .persist.format import CONFIG_NAME, INDEX_NAME
    from .util.files import read_json

    folder = Path(path)
    if (folder / INDEX_NAME).is_file() and not (folder / CONFIG_NAME).is_file():
        index = read_json(folder / INDEX_NAME)
        names = index.get("adapters") if isinstance(index, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise UsageError(f"{folder / INDEX_NAME} does not list adapter names; it was not written by peftlab")
        return names
    return []


def cmd_merge(args) -> int:
    import peftlab

    _check_out(args.out)
    _check_model(args.model)
    names = _saved_adapter_names(args.adapter)
    chosen = getattr(args, "adapter_name", None)
    if chosen is None and len(names) > 1:
        raise UsageError(
            f"--adapter {args.adapter} holds {len(names)} adapters ({', '.join(names)}); choose the one to merge "
            f"with --adapter-name NAME"
        )
    if chosen is not None and names and chosen not in names:
        raise UsageError(f"--adapter-name {chosen!r}: {args.adapter} has no such adapter; it has: {', '.join(names)}")
    model, tokenizer = peftlab.load_model(args.model, kind=args.kind)
    peftlab.load_adapter(model, args.adapter, adapter_name=chosen)
    peftlab.save_merged(model, args.out)
    tokenizer.save_pretrained(args.out)
    print(f"merged model written to {Path(args.out).resolve()}")
    return 0


def cmd_export(args) -> int:
    import peftlab

    _check_out(args.out)
    _check_model(args.model)
    model, _ = peftlab.load_model(args.model, kind=args.kind)
    peftlab.load_adapter(model, args.adapter)
    peftlab.export_peft(model, args.out)
    print(f"HF PEFT adapter written to {Path(args.out).resolve()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__
    from .bench.providers import PROVIDERS
    from .bench.tasks import TASKS as BENCH_TASKS
    from .bench.user_data import USER_TASKS
    from .finetune import METHODS
    from .util.helpformat import DefaultsFormatter as _Formatter

    parser = argparse.ArgumentParser(
        prog="peftlab", description="Parameter-efficient fine-tuning for transformers."
    )
    parser.add_argument("--version", action="version", version=f"peftlab {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    kinds = ["seq-cls", "token-cls", "causal-lm", "base"]
    kind_help = "model head: seq-cls (sequence classification), token-cls, causal-lm, base (no head)"
    model_help = "packaged short name (minilm-l6, smollm2-135m), local model folder or hub id"

    info = sub.add_parser(
        "info", help="show what a method would target and the parameter counts", formatter_class=_Formatter
    )
    info.add_argument("--model", default="minilm-l6", help=model_help)
    info.add_argument("--kind", default="seq-cls", choices=kinds, help=kind_help)
    info.add_argument("--method", default="lora", choices=[m for m in METHODS if m != "full"], help="adapter method")
    info.add_argument("--set", action="append", metavar="KEY=VALUE", help="config field, e.g. --set r=16")
    info.set_defaults(func=cmd_info)

    bench = sub.add_parser(
        "bench", help="run a benchmark sweep and write report.md + plots", formatter_class=_Formatter
    )
    bench.add_argument("--sweep", help="YAML sweep file (benchmarks/sweeps/*.yaml)")
    bench.add_argument("--model", nargs="+", help=f"models to compare (default: minilm-l6); {model_help}")
    bench.add_argument(
        "--task", nargs="+", choices=[*BENCH_TASKS, *USER_TASKS], metavar="TASK",
        help=f"built-in: {', '.join(BENCH_TASKS)} (default: sst2); with --data FILE: {', '.join(USER_TASKS)}",
    )  # fmt: skip
    bench.add_argument(
        "--methods", nargs="+", choices=list(PROVIDERS), metavar="METHOD",
        help=f"default: full lora; valid: {', '.join(PROVIDERS)} (hf-*: Hugging Face PEFT's, side by side)",
    )  # fmt: skip
    bench.add_argument("--ranks", nargs="+", type=int, help="LoRA ranks to sweep (lora, dora, qlora, lora-int8, hf-lora)")
    bench.add_argument("--seeds", nargs="+", type=int, help="seeds (default: 0)")
    bench.add_argument("--max-steps", type=int, help="optimizer steps per run (default: the sweep's, else 300)")
    bench.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="fp16 needs CUDA (default fp32)")
    bench.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    bench.add_argument(
        "--processes",
        type=int,
        help="processes per run: torchrun on a CPU, accelerate launch on GPUs (default 1)",
    )
    bench.add_argument(
        "--distributed", choices=["ddp", "fsdp"], help="strategy with --processes > 1 (default ddp)"
    )
    bench.add_argument(
        "--data",
        help="your data file (.csv, .tsv, .jsonl, .parquet) with --task classify, tokens or sft; or the data folder "
        "holding sst2/ and conll2003/ (default: $PEFTLAB_DATA or ../shared/data), or hf / hf:<dataset id> for "
        "the Hugging Face hub (needs the datasets package)",
    )
    split = bench.add_mutually_exclusive_group()
    split.add_argument("--eval-data", metavar="FILE", help="with --data FILE: the test file (same columns)")
    split.add_argument(
        "--eval-split", type=float, metavar="FRACTION",
        help="with --data FILE: hold out this fraction of it as the test set (default 0.1 without --eval-data)",
    )  # fmt: skip
    bench.add_argument("--text-column", metavar="C", help="with --data FILE: as in peftlab train")
    bench.add_argument("--label-column", metavar="C", help="with --data FILE: as in peftlab train")
    bench.add_argument("--out", help="output folder (default: runs/<sweep name>)")
    bench.add_argument("--timeout", type=float, help="seconds per run before it is recorded as failed")
    bench.add_argument(
        "--pack",
        type=int,
        help="train up to N compatible runs (same model and task; peftlab LoRA / bottleneck methods on a CPU) "
        "together in one process over one frozen base, results equal to separate runs (default: pack: in the "
        "sweep file, else 1)",
    )
    bench.add_argument(
        "--part",
        help="K/N: run only every N-th run of the sweep starting at the K-th, so N processes (one per core, "
        "same --out) share a sweep; the last one to finish writes the report of all",
    )
    bench.set_defaults(func=cmd_bench)

    for name, func, text in (
        ("merge", cmd_merge, "merge a saved adapter into its base and save_pretrained it"),
        ("export", cmd_export, "convert a saved peftlab adapter to HF PEFT's format"),
    ):
        p = sub.add_parser(name, help=text, description=text, formatter_class=_Formatter)
        p.add_argument("--model", required=True, help=f"the base model the adapter was trained on: {model_help}")
        p.add_argument("--kind", default="seq-cls", choices=kinds, help=kind_help)
        p.add_argument("--adapter", required=True, help="adapter folder (save_adapter, or peftlab train's OUT/adapter)")
        p.add_argument(
            "--out", required=True,
            help="folder to write: the merged model and tokenizer" if name == "merge" else "folder to write the HF PEFT adapter to",
        )  # fmt: skip
        if name == "merge":
            p.add_argument("--adapter-name", help="with a folder of several adapters: the one to merge")
        p.set_defaults(func=func)
    from .estimate_cli import add_parser as add_estimate_parser

    add_estimate_parser(sub)
    from .finetune_cli import add_train_parser

    add_train_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("PEFTLAB_DEBUG", "") not in ("", "0")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"peftlab {args.command}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if debug:
            raise
        hint = (
            "" if isinstance(exc, PeftlabError) else f" ({type(exc).__name__}; --debug shows the traceback)"
        )
        print(f"peftlab {args.command}: error: {' '.join(str(exc).split())}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
