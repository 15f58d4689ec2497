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
