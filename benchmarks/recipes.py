"""Recipe study, phase 1 -> phase 2: pick each method's recipe on the dev split, write recipes.yaml.

    python benchmarks/recipes.py choose [SEARCH_DIR] [OUT_YAML]
    python benchmarks/recipes.py table [RESULTS_DIR]     # phase 2's results as the README's table

reads the search sweep's records (default benchmarks/results/recipes/search/results.jsonl), takes for every
method label the run with the highest dev metric (the best dev checkpoint's, on 2,000 dev sentences; the
test split is never looked at), and writes the phase-2 sweep (default benchmarks/sweeps/recipes.yaml):
the chosen recipes at 2 epochs with 3 seeds, plus HF PEFT's LoRA under LoRA's chosen recipe, and LoRA q,v
r=8 (AdaLoRA's final budget) when LoRA's choice is another placement or rank. The whole study:

    peftlab bench --sweep benchmarks/sweeps/recipes-search.yaml --out benchmarks/results/recipes/search
    python benchmarks/recipes.py choose
    peftlab bench --sweep benchmarks/sweeps/recipes.yaml --out benchmarks/results/recipes
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SEARCH = REPO / "benchmarks" / "results" / "recipes" / "search"
OUT = REPO / "benchmarks" / "sweeps" / "recipes.yaml"
# phase 1 label -> phase 2 label (LoRA's two placements compete for one "lora" row)
FAMILY = {"lora-qv": "lora", "lora-all": "lora"}
EXPECTED_PER_FAMILY = {"full": 4, "lora": 16, "adalora": 4, "houlsby": 4, "pfeiffer": 4, "prefix": 3}
FINAL_TRAIN = {
    "epochs": 2,
    "max_steps": None,
    "train_limit": 20000,
    "batch_size": 32,
    "max_length": 64,
    "eval_every": 250,
    "dev_limit": 2000,
    "eval_batch_size": 256,
    "warmup_ratio": 0.06,
}
HEADER = """\
# Recipe study, phase 2: the recipe each method won on the dev split in phase 1
# (recipes-search.yaml, benchmarks/results/recipes/search/report.md), at 2 epochs with 3 seeds, on the test set.
# Written by `python benchmarks/recipes.py choose` ({note}); do not edit by hand.
# MiniLM-L6, SST-2: 2 epochs of a seeded 20,000-sentence subset of the train split (1,250 steps of 32; each seed
# draws its own subset), dev = 2,000 sentences every 250 steps (best checkpoint kept), test = all 872.
# Run (resumes; start it once per core, the processes share the runs out):
#   for k in 1 2; do OMP_NUM_THREADS=1 nohup nice -n 10 peftlab bench --sweep benchmarks/sweeps/recipes.yaml \\
#       --out benchmarks/results/recipes > runs/recipes-$k.log 2>&1 & done
"""


def choose(records: list[dict], partial: bool = False) -> dict[str, dict]:
    """{family: best record by dev metric} over the successful search runs."""
    by_family: dict[str, list[dict]] = {}
    for r in records:
        if r.get("status") == "ok":
            by_family.setdefault(FAMILY.get(r["label"], r["label"]), []).append(r)
    missing = {f: n - len(by_family.get(f, [])) for f, n in EXPECTED_PER_FAMILY.items()}
    missing = {f: n for f, n in missing.items() if n > 0}
    if missing and not partial:
        raise SystemExit(
            f"the search is not finished (runs missing per method: {missing}); rerun it or pass --partial"
        )
    return {f: max(runs, key=lambda r: r["dev"][r["metric"]]) for f, runs in by_family.items()}


def grid_edges(best: dict[str, dict], records: list[dict]) -> list[str]:
    """Warnings for chosen learning rates at the edge of their grid (the optimum may lie beyond it).

    Compares each choice with the successful runs of the same label and params (the lr grid of that config).
    """
    warnings = []
    for family, r in best.items():
        lrs = sorted(
            x["train"]["lr"] for x in records
            if x.get("status") == "ok" and x["label"] == r["label"] and x["params"] == r["params"]
        )
        if len(lrs) < 2:
            continue
        lr = r["train"]["lr"]
        if lr in (lrs[0], lrs[-1]):
            side = "largest" if lr == lrs[-1] else "smallest"
            warnings.append(
                f"{family}: the chosen lr {lr:g} is the {side} of {[f'{v:g}' for v in lrs]}; "
                "the optimum may lie beyond the grid (extend it in recipes-search.yaml)"
            )
    return warnings


def _entry(method: str, label: str, params: dict, lr: float) -> dict:
    entry = {"method": method, "label": label}
    if params:
        entry["params"] = params
    entry["train"] = {"lr": lr}
    return entry


def final_sweep(best: dict[str, dict]) -> dict:
    methods = []
    for family in ("full", "lora", "adalora", "houlsby", "pfeiffer", "prefix"):
        if family not in best:
            continue
        r = best[family]
        method = "lora" if family == "lora" else r["method"]
        methods.append(_entry(method, family, dict(r["params"]), r["train"]["lr"]))
        if family == "lora":
            params = dict(r["params"])
            params["target_modules"] = params.get("target_modules") or ["query", "value"]
            methods.append(_entry("hf-lora", "hf-lora", params, r["train"]["lr"]))
            if params["target_modules"] != ["query", "value"] or params.get("r") != 8:
                qv8 = [
                    x for x in _search_records() if x.get("label") == "lora-qv" and x["params"].get("r") == 8
                ]
                qv8 = [x for x in qv8 if x.get("status") == "ok"]
                if qv8:
                    top = max(qv8, key=lambda x: x["dev"][x["metric"]])
                    methods.append(_entry("lora", "lora-qv-r8", dict(top["params"]), top["train"]["lr"]))
    return {
        "name": "recipes",
        "models": ["minilm-l6"],
        "tasks": ["sst2"],
        "seeds": [0, 1, 2],
        "order": "seed-major",  # all methods' seed 0 first: a study cut short still compares every method
        "train": FINAL_TRAIN,
        "methods": methods,
    }


_RECORDS: list[dict] = []


def _search_records() -> list[dict]:
    return _RECORDS


def describe(label: str, record: dict) -> str:
    """A reader's name for a phase-2 row: method, placement / size, learning rate."""
    p = record.get("params") or {}
    where = "all linear" if p.get("target_modules") == "all-linear" else "query, value"
    names = {
        "full": "full fine-tuning",
        "lora": f"LoRA r={p.get('r')}, {where}",
        "hf-lora": f"HF PEFT LoRA r={p.get('r')}, {where} (peer)",
        "lora-qv-r8": f"LoRA r={p.get('r')}, {where}",
        "adalora": f"AdaLoRA {p.get('init_r')}→{p.get('target_r')}, query, value",
        "houlsby": f"Houlsby, reduction {p.get('reduction_factor')}",
        "pfeiffer": f"Pfeiffer, reduction {p.get('reduction_factor')}",
        "prefix": f"prefix, {p.get('num_virtual_tokens')} tokens, MLP {p.get('projection_dim')}",
    }
    return f"{names.get(label, label)}, lr {record['train']['lr']:g}"


def table(results_dir: Path) -> str:
    """The README's table of the phase-2 results: test mean ± std and 95% interval over seeds, and the
    paired-bootstrap Δ vs full fine-tuning (✓ where the interval excludes 0)."""
    sys.path.insert(0, str(REPO))
    from peftlab.bench.report import aggregate, compare
    from peftlab.bench.runner import read_results

    rows = aggregate(read_results(results_dir))
    full = next((k for k in rows if rows[k]["label"] == "full"), None)
    lines = [
        "| method, recipe | trainable % | seeds | test accuracy, mean ± std | 95% interval | Δ vs full (pt) [95%] |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, row in sorted(rows.items(), key=lambda kv: -kv[1]["test"]):
        interval = row["interval"]
        ci = f"[{interval.lo:.2f}, {interval.hi:.2f}]" if row["seeds"] > 1 else "–"
        delta = "–"
        if full is not None and key != full:
            d = compare(row, rows[full])
            if d is not None:
                mark = " ✓" if d.resolved else ""
                delta = f"{d.mean:+.2f} [{d.lo:+.2f}, {d.hi:+.2f}]{mark}"
        lines.append(
            f"| {describe(row['label'], row['runs'][0])} | {row['trainable_pct']:.2f} | {row['seeds']} | "
            f"{row['test']:.2f} ± {row['test_std']:.2f} | {ci} | {delta} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if argv and argv[0] == "table":
        print(table(Path(argv[1]) if len(argv) > 1 else REPO / "benchmarks" / "results" / "recipes"), end="")
        return 0
    if not argv or argv[0] != "choose":
        print(__doc__)
        return 2
    partial = "--partial" in argv
    args = [a for a in argv[1:] if not a.startswith("--")]
    search = Path(args[0]) if args else SEARCH
    out = Path(args[1]) if len(args) > 1 else OUT
    path = search / "results.jsonl"
    _RECORDS[:] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    best = choose(_RECORDS, partial)
    sweep = final_sweep(best)
    note = "from " + ", ".join(f"{f}: dev {100 * r['dev'][r['metric']]:.2f}" for f, r in best.items())
    edges = grid_edges(best, _RECORDS)
    for warning in edges:
        print(f"warning: {warning}", file=sys.stderr)
    if edges:
        note += "; at a grid edge: " + "; ".join(edges)
    body = yaml.safe_dump(sweep, sort_keys=False, default_flow_style=None, width=200)
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text(HEADER.format(note=note) + body)
    tmp.replace(out)
    print(f"wrote {out}:\n{body}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
