"""Lines of code a newcomer writes for their own CSV classifier and instruction JSONL, peftlab vs the usual stacks.

The scripts are in ``benchmarks/own_task/loc/``; each does the same job end to end: read the file, hold out 10%
for evaluation, LoRA (MiniLM-L6 q/v with a trained head for the CSV; SmolLM2-135M all-linear, loss on the
response only, for the JSONL), train one epoch, print the eval metrics, save the adapter. Counted: lines of
code after ``ruff format`` (blank and comment-only lines excluded) and Python statements (``ast``; a shell
command counts as one). What each prints for evaluation is stated, since it differs (TRL and Trainer report the
eval loss; an exact-match score there needs a generation loop of your own).

    python benchmarks/own_task/loc.py [--run]   # --run: run every script on tiny files (local model copies)

``--run`` writes tiny ``reviews.csv`` (text,label) / ``qa.jsonl`` (prompt,response) files in a temporary folder,
replaces the hub ids by the packaged models' local folders (no download), caps training at 2 steps, and runs
each script there: the table records whether it ran. On a CPU, TRL's ``SFTConfig`` needs ``use_cpu=True,
bf16=False`` (it defaults to bf16): the run adds them; the counted script is the GPU user's.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import io
import json
import os
import subprocess
import sys
import tempfile
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "benchmarks" / "own_task" / "loc"
RESULTS = REPO / "benchmarks" / "results" / "own_task"
ROWS = [  # (stack, task, script, what its evaluation prints)
    ("peftlab train (CLI)", "csv", "peftlab_cli_classify.sh", "accuracy, macro-F1"),
    ("peftlab finetune (Python)", "csv", "peftlab_python_classify.py", "accuracy, macro-F1"),
    ("HF PEFT + Trainer", "csv", "hf_peft_trainer_classify.py", "accuracy (own compute_metrics)"),
    ("peftlab train (CLI)", "jsonl", "peftlab_cli_sft.sh", "exact match, response loss, perplexity"),
    ("peftlab finetune (Python)", "jsonl", "peftlab_python_sft.py", "exact match, response loss, perplexity"),
    ("TRL SFTTrainer", "jsonl", "trl_sft.py", "eval loss"),
    ("HF PEFT + Trainer", "jsonl", "hf_peft_trainer_sft.py", "eval loss"),
]
HUB = {
    "sentence-transformers/all-MiniLM-L6-v2": "minilm-l6",
    "HuggingFaceTB/SmolLM2-135M": "smollm2-135m",
}


def code_lines(path: Path) -> int:
    """Non-blank lines that hold code (comment-only lines excluded); a shell file: its non-blank lines."""
    text = path.read_text()
    if path.suffix != ".py":
        return sum(1 for line in text.splitlines() if line.strip() and not line.strip().startswith("#"))
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                            tokenize.ENDMARKER):  # fmt: skip
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return len(lines)


def statements(path: Path) -> int:
    """Python statements (imports, assignments, calls, defs... each counted once); a shell command is one."""
    if path.suffix != ".py":
        return code_lines(path)
    return sum(isinstance(node, ast.stmt) for node in ast.walk(ast.parse(path.read_text())))


def tiny_files(folder: Path) -> None:
    rows = [
        ("a gripping film", "pos"),
        ("dull and long", "neg"),
        ("loved it", "pos"),
        ("a waste of time", "neg"),
    ]
    with open(folder / "reviews.csv", "w") as f:
        f.write("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows * 5))
    with open(folder / "qa.jsonl", "w") as f:
        for text, label in rows * 5:
            answer = "positive" if label == "pos" else "negative"
            f.write(json.dumps({"prompt": f"Review: {text}\nSentiment?", "response": answer}) + "\n")


def run_script(path: Path, folder: Path) -> tuple[bool, str]:
    """Run ``path`` in ``folder`` on the tiny files (local models, 2 training steps)."""
    import peftlab

    text = path.read_text()
    for hub, short in HUB.items():
        text = text.replace(hub, peftlab.resolve_model_path(short))
    text = text.replace("num_train_epochs=1", "max_steps=2").replace(
        "eval_split=0.1", "eval_split=0.1, max_steps=2"
    )
    text = text.replace('SFTConfig("out/sft", ', 'SFTConfig("out/sft", use_cpu=True, bf16=False, ')  # TRL: bf16
    if path.suffix == ".sh":
        text = text.replace("--eval-split 0.1", "--eval-split 0.1 --max-steps 2 --no-progress")
    copy = folder / path.name
    copy.write_text(text)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    cmd = ["bash", str(copy)] if path.suffix == ".sh" else [sys.executable, str(copy)]
    proc = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, env=env)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    return proc.returncode == 0, tail[0][:300]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="store_true", help="also run every script on tiny files")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument(
        "--only", nargs="+", help="with --run: run these script names; keep the others' results"
    )
    args = parser.parse_args()
    records = []
    if args.only:
        saved = json.loads((Path(args.out) / "loc.json").read_text())["records"]
        previous = {Path(r["script"]).stem: r for r in saved}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.run:
            tiny_files(folder)
        for stack, task, name, evaluation in ROWS:
            path = SCRIPTS / name
            record = {"id": path.stem, "stack": stack, "task": task, "script": f"benchmarks/own_task/loc/{name}",
                      "lines": code_lines(path), "statements": statements(path), "evaluation": evaluation}  # fmt: skip
            if args.run and args.only and name not in args.only:
                record.update({k: previous[record["id"]][k] for k in ("ran", "output_tail")})
            elif args.run:
                record["ran"], record["output_tail"] = run_script(path, folder)
                print(f"{name}: {'ok' if record['ran'] else 'FAILED'}: {record['output_tail']}", flush=True)
            records.append(record)
    import peft
    import transformers

    versions = {"transformers": transformers.__version__, "peft": peft.__version__}
    try:
        import trl

        versions["trl"] = trl.__version__
    except ImportError:
        pass
    meta = {"date": datetime.date.today().isoformat(), "command": "python benchmarks/own_task/loc.py" +
            (" --run" if args.run else ""), "versions": versions}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loc.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    names = {"csv": "CSV classifier (text,label)", "jsonl": "instruction JSONL (prompt,response)"}
    lines = [
        "# Lines of code for your own data: peftlab vs HF PEFT + Trainer and TRL",
        "",
        f"`{meta['command']}` ({meta['date']}; " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "). "
        "Each script reads the file, holds out 10% for evaluation, trains LoRA for one epoch, prints its eval "
        "metrics and saves the adapter (scripts in `benchmarks/own_task/loc/`). Lines: code lines after `ruff "
        "format` (blank and comment lines excluded); statements: Python statements (a shell command is one)."
        + (
            " Every script ran on tiny files with local model copies (2 steps; TRL on a CPU with "
            "`SFTConfig(use_cpu=True, bf16=False)` added, as it defaults to bf16)."
            if args.run and all(r.get("ran") for r in records)
            else ""
        ),
        "",
        "| task | stack | lines | statements | eval printed | script |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        ran = "" if "ran" not in r else (" ✓ ran" if r["ran"] else " ✗ failed")
        lines.append(f"| {names[r['task']]} | {r['stack']} | {r['lines']} | {r['statements']} | {r['evaluation']} | "
                     f"`{Path(r['script']).name}`{ran} |")  # fmt: skip
    (out / "loc.md").write_text("\n".join(lines) + "\n")
    print((out / "loc.md").read_text())


if __name__ == "__main__":
    main()
