"""benchmarks/recipes.py: the dev-only choice per method and the grid-edge warning."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SPEC = importlib.util.spec_from_file_location(
    "recipes", Path(__file__).resolve().parents[2] / "benchmarks" / "recipes.py"
)
recipes = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(recipes)


def _run(label, lr, dev, test, params=None, method=None):
    return {"status": "ok", "label": label, "method": method or label, "params": params or {}, "metric": "accuracy",
            "train": {"lr": lr}, "dev": {"accuracy": dev}, "test": {"accuracy": test}}


def test_choice_uses_dev_only_and_flags_grid_edges():
    records = [
        _run("full", 2e-5, 0.88, 0.95), _run("full", 5e-5, 0.91, 0.80), _run("full", 1e-4, 0.90, 0.80),
        _run("houlsby", 3e-4, 0.85, 0.8), _run("houlsby", 1e-3, 0.86, 0.8), _run("houlsby", 3e-3, 0.87, 0.8),
        _run("lora-qv", 1e-3, 0.89, 0.8, {"r": 8}, "lora"), _run("lora-qv", 2e-3, 0.88, 0.8, {"r": 8}, "lora"),
        _run("lora-qv", 1e-3, 0.87, 0.8, {"r": 4}, "lora"),
    ]
    best = recipes.choose(records, partial=True)
    assert best["full"]["train"]["lr"] == 5e-5  # the best dev, not the best test (2e-5)
    assert best["lora"]["params"] == {"r": 8} and best["lora"]["train"]["lr"] == 1e-3
    warnings = recipes.grid_edges(best, records)
    assert len(warnings) == 2  # houlsby at the top of its grid; lora r=8 at the bottom of its own (1e-3, 2e-3)
    assert any(w.startswith("houlsby: the chosen lr 0.003 is the largest") for w in warnings)
    assert any(w.startswith("lora: the chosen lr 0.001 is the smallest") for w in warnings)


def test_readme_table_orders_rows_and_marks_resolved_deltas(tmp_path):
    """`recipes.py table`: one row per phase-2 label, best mean first, Δ vs full with a paired interval."""
    import sys

    import numpy as np

    from peftlab.bench.runner import append_result

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_report import record

    truth = np.random.default_rng(0).random(600)
    runs = [record("full", s, truth < 0.90) for s in range(3)]
    close = (truth < 0.90).astype(int)  # full's answers with 10 flipped each way: Δ 0, not resolved
    close[np.flatnonzero(close == 1)[:10]] = 0
    close[np.flatnonzero(truth >= 0.90)[:10]] = 1
    runs += [record("lora", s, close, params={"r": 4, "target_modules": "all-linear"}, lr=2e-3) for s in range(3)]
    runs += [record("prefix", s, truth < 0.75, params={"num_virtual_tokens": 20, "projection_dim": 32}) for s in range(3)]
    for r in runs:
        append_result(tmp_path, r)
    lines = recipes.table(tmp_path).splitlines()
    assert lines[2].startswith("| full fine-tuning, lr 0.001 | 100.00 | 3 |")
    assert lines[3].startswith("| LoRA r=4, all linear, lr 0.002 |") and not lines[3].endswith("✓ |")
    assert lines[4].startswith("| prefix, 20 tokens, MLP 32, lr 0.001 |")
    assert "| -16.50 [-" in lines[4] and lines[4].endswith("✓ |")  # 16.5 points worse on every seed: resolved
