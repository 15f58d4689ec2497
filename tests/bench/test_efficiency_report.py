"""benchmarks/efficiency_report.py: ratios are taken within a round, exact-allocator rows stay out of the rounds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
efficiency_report = pytest.importorskip("efficiency_report")


def row(config, rnd, step, rss, loss=1.0):
    return {"model": "m", "config": config, "round": rnd, "median_step_s": step, "tokens_per_s": 1.0 / step,
            "peak_rss_mb": rss, "train_peak_rss_mb": None, "last_loss": loss}  # fmt: skip


def test_ratios_per_round_and_exact_memory():
    rows = [
        # round 1 on a fast machine, round 2 on a slow one: per-round ratios are both 0.5
        row("hf-peft-lora", 1, 2.0, 1000), row("peftlab-lora", 1, 1.0, 700), row("floor-r0", 1, 0.8, 650),
        row("hf-peft-lora", 2, 4.0, 1000), row("peftlab-lora", 2, 2.0, 700), row("floor-r0", 2, 1.6, 650),
        {"model": "m", "config": "hf-peft-lora", "pass": "exact", "peak_rss_mb": 800},
        {"model": "m", "config": "peftlab-lora", "pass": "exact", "peak_rss_mb": 720},
    ]  # fmt: skip
    summary = {s["config"]: s for s in efficiency_report.summarize(rows, ["m"], ["floor-r0", "peftlab-lora", "hf-peft-lora"], "peak_rss_mb")}
    lora = summary["peftlab-lora"]
    assert lora["rounds"] == 2  # the exact row is not a third round
    assert lora["time_vs_hf-peft-lora"] == (0.5, 0.5, 0.5)
    assert lora["time_vs_floor-r0"] == (1.25, 1.25, 1.25)
    assert lora["step_s"] == (1.5, 1.0, 2.0)
    assert lora["memory_vs_hf-peft-lora"] == (0.7, 0.7, 0.7)
    assert lora["exact_memory_mb"] == 720 and lora["exact_memory_vs_hf"] == pytest.approx(0.9)
    assert summary["floor-r0"]["exact_memory_mb"] is None  # no exact row: no exact ratio
    text = efficiency_report.markdown(
        {"device": "cpu", "date": "d", "command": "c", "rounds": 2, "steps": 1}, list(summary.values()),
        [{"round": 1, "started": "t", "load_avg_start": (0.1,), "load_avg_end": (0.2,)}], "peak RSS MB",
    )  # fmt: skip
    line = next(ln for ln in text.splitlines() if "| peftlab-lora |" in ln)
    assert "| 720 | 0.90 | 1.00 |" in line


def test_each_peftlab_row_meets_its_own_peer():
    """peftlab-qlora is compared with hf-peft-qlora (not with HF PEFT's plain LoRA), per round."""
    rows = [
        row("hf-peft-lora", 1, 1.0, 1000), row("peftlab-qlora", 1, 3.0, 400, loss=2.0), row("hf-peft-qlora", 1, 4.0, 500, loss=2.2),
        row("hf-peft-lora", 2, 2.0, 1000), row("peftlab-qlora", 2, 6.0, 400, loss=2.0), row("hf-peft-qlora", 2, 12.0, 500, loss=2.2),
        row("peftlab-lora-sac", 1, 1.0, 600),
    ]  # fmt: skip
    configs = ["hf-peft-lora", "peftlab-qlora", "hf-peft-qlora", "peftlab-lora-sac"]
    summary = {s["config"]: s for s in efficiency_report.summarize(rows, ["m"], configs, "peak_rss_mb")}
    qlora = summary["peftlab-qlora"]
    assert qlora["peer"] == "hf-peft-qlora"
    assert qlora["time_vs_peer"] == (0.625, 0.5, 0.75)  # 3/4 and 6/12, within each round
    assert qlora["memory_vs_peer"] == (0.8, 0.8, 0.8)
    assert qlora["loss_rel_diff_vs_peer"] == pytest.approx(0.2 / 2.2)
    assert qlora["time_vs_hf-peft-lora"] == (3.0, 3.0, 3.0)  # the plain-LoRA column is unchanged
    assert summary["peftlab-lora-sac"]["peer"] is None  # HF PEFT has no such row
    assert summary["hf-peft-qlora"]["peer"] is None
    text = efficiency_report.markdown(
        {"device": "cpu", "date": "d", "command": "c", "rounds": 2, "steps": 1}, list(summary.values()),
        [{"round": 1, "started": "t", "load_avg_start": (0.1,), "load_avg_end": (0.2,)}], "peak RSS MB",
    )  # fmt: skip
    assert "| m | peftlab-qlora | hf-peft-qlora | 0.62 [0.50–0.75] | 0.80 [0.80–0.80] | 9.1e-02 |" in text
