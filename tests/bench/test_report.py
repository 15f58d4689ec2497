"""report.md from synthetic run records: seed intervals, paired Δs, resolution marks, chance flags, targets, plots."""

import numpy as np

from peftlab.bench.report import aggregate, never_left_chance, row_names, write_report

N = 600


def record(label, seed, correct, params=None, lr=1e-3, evals=None, dev=0.9, **extra):
    correct = [int(c) for c in correct]
    return {
        "status": "ok",
        "sweep": "synthetic",
        "task": "sst2",
        "model": "minilm-l6",
        "label": label,
        "method": label,
        "params": params or {},
        "train": {"lr": lr, "max_steps": 100},
        "seed": seed,
        "run_id": f"{label}-{lr}-{seed}",
        "metric": "accuracy",
        "dev": {"accuracy": dev},
        "test": {"accuracy": sum(correct) / len(correct)},
        "test_examples": {"correct": correct, "prediction": correct},
        "evals": evals
        if evals is not None
        else [{"step": 50, "metric": dev - 0.05}, {"step": 100, "metric": dev}],
        "dev_size": 300,
        "dev_chance": 0.5,
        "steps": 100,
        "trainable_params": 1000 if label != "full" else 100000,
        "total_params": 100000,
        "trainable_pct": 1.0 if label != "full" else 100.0,
        "peak_memory_mb": 100.0,
        "tokens_per_s": 1000.0,
        "median_step_s": 0.1,
        "env": {"device": "cpu"},
        **extra,
    }


def synthetic_records():
    rng = np.random.default_rng(0)
    truth = rng.random(N)
    full = [record("full", s, truth < 0.90 + 0.005 * s) for s in range(2)]

    def flipped(seed):  # full's seed-0 answers with 30 examples flipped both ways: within noise of full
        c = (truth < 0.90).astype(int)
        pick = np.random.default_rng(10 + seed)
        idx = np.concatenate([pick.choice(np.flatnonzero(c == v), size=15, replace=False) for v in (0, 1)])
        c[idx] = 1 - c[idx]
        return c

    close = [record("lora", s, flipped(s)) for s in range(2)]
    worse = [record("prefix", s, truth < 0.80) for s in range(2)]  # 10 points worse: resolved
    broken = [
        record(
            "adalora",
            0,
            truth < 0.5,
            evals=[{"step": 50, "metric": 0.52}, {"step": 100, "metric": 0.55}],
            dev=0.55,
        )
    ]
    return full + close + worse + broken


def test_report_rows_intervals_deltas_flags_targets_and_plots(tmp_path):
    records = synthetic_records()
    (tmp_path / "targets.yaml").write_text(
        "targets:\n"
        "  - {a: lora, b: full, margin: 2.0, text: 'LoRA within 2 points'}\n"
        "  - {a: prefix, b: full, margin: 3.0, text: 'prefix within 3 points'}\n"
        "  - {a: lora, b: full, equivalent: true, text: 'LoRA = full'}\n"
    )
    text = write_report(records, tmp_path, title="synthetic").read_text()
    rows = {}  # first table row per name (the accuracy table comes before the efficiency table)
    for line in text.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split("|")[1].strip(), line)
    # two seeds: mean ± std and a t interval; one seed: no interval
    assert "| 2 |" in rows["lora"] and "± " in rows["lora"] and "[" in rows["lora"].split("|")[5]
    lora_cells = [c.strip() for c in rows["lora"].split("|")]
    assert lora_cells[8] == "–"  # lora vs full: not resolved
    prefix_cells = [c.strip() for c in rows["prefix"].split("|")]
    assert prefix_cells[8] == "✓" and float(prefix_cells[6]) < -8  # ~10 points worse, resolved
    assert any(k.startswith("adalora") and "⚠ chance" in k for k in rows)
    assert "Runs that never left chance level" in text
    assert "| LoRA within 2 points | sst2 |" in text and "| met |" in rows["LoRA within 2 points"] + "|"
    assert "missed by" in rows["prefix within 3 points"] and "| ✗ by " in rows["prefix within 3 points"]
    assert "| ✓ |" in rows["LoRA within 2 points"]  # read on the mean Δ too
    assert "met (not resolved)" in rows["LoRA = full"]
    for png in ("metric_vs_params.png", "delta_vs_full.png", "learning_curves_sst2.png", "peak_memory.png"):
        assert (tmp_path / png).stat().st_size > 5000, png
        assert f"({png})" in text


def test_rows_split_by_varying_learning_rate_and_chance_detection():
    rng = np.random.default_rng(1)
    truth = rng.random(N)
    records = [
        record("houlsby", 0, truth < 0.8, lr=lr, params={"reduction_factor": 16}) for lr in (1e-3, 3e-3)
    ]
    names = row_names(records)
    assert names == ["houlsby reduction_factor=16 lr=0.001", "houlsby reduction_factor=16 lr=0.003"]
    assert len(aggregate(records)) == 2  # two learning rates are two rows, not two seeds of one
    stuck = record("x", 0, truth < 0.5, evals=[{"step": 10, "metric": 0.55}], dev=0.55)
    assert never_left_chance(stuck)  # 0.5 + 3·√(0.25/300) = 0.587
    assert not never_left_chance(record("y", 0, truth < 0.8, dev=0.7, evals=[{"step": 10, "metric": 0.7}]))


def test_old_records_without_per_example_columns_still_report(tmp_path):
    records = synthetic_records()
    for r in records:
        r.pop("test_examples")
        r.pop("dev_chance")
        r.pop("dev_size")
    text = write_report(records, tmp_path).read_text()
    assert "| full |" in text and "–" in text
