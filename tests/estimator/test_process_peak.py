"""The expected process peak: runtime + weights + allocator slack × training tensors, from a committed measurement."""

from __future__ import annotations

import json
from pathlib import Path

import peftlab
from peftlab.bench.report import write_report
from peftlab.estimator.process import PROCESS, expected_process_peak

RESULT = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "process_peak" / "process_peak.json"


def test_the_cpu_constants_are_the_committed_measurement():
    """PROCESS['cpu'] is the fit of benchmarks/results/process_peak (rounded as stated there)."""
    summary = json.loads(RESULT.read_text())["summary"]
    cpu = PROCESS["cpu"]
    assert cpu.runtime == round(summary["runtime_mib"]) * 2**20
    assert cpu.slack == round(summary["slack"], 2)
    assert cpu.slack_range == (round(summary["slack_min"], 2), round(summary["slack_max"], 2))


def test_expected_process_peak_of_an_estimate():
    """CPU: runtime + weights + slack × (total − weights), above the tensor peak; CUDA: None (unmeasured)."""
    lora = peftlab.LoraConfig(r=8, target_modules=["query", "value"], modules_to_save=["classifier"])
    cpu = peftlab.estimate("minilm-l6", lora, 16, 128, precision="fp32", device="cpu", kind="seq-cls")
    overhead = PROCESS["cpu"]
    expected = int(overhead.runtime + cpu.weights + overhead.slack * (cpu.total_peak - cpu.weights))
    assert (
        cpu.expected_process_peak == expected == expected_process_peak("cpu", cpu.weights, cpu.training_peak)
    )
    assert cpu.expected_process_peak > cpu.total_peak
    assert cpu.to_dict()["expected_process_peak"] == expected
    assert "EXPECTED PROCESS PEAK" in cpu.table() and "glibc" in cpu.table()
    gpu = peftlab.estimate("minilm-l6", lora, 16, 128, precision="fp32", device="cuda", kind="seq-cls")
    assert gpu.expected_process_peak is None and "not measured for cuda" in gpu.table()


def test_the_bench_report_shows_and_explains_both(tmp_path, monkeypatch):
    from peftlab.bench import report

    monkeypatch.setattr(report, "write_plots", lambda *args, **kwargs: [])  # the tables only (plots: slow)
    correct = [1, 0] * 50

    def run(label: str) -> dict:
        return {
            "status": "ok", "task": "sst2", "model": "minilm-l6", "label": label, "method": label, "params": {},
            "train": {"max_steps": 10}, "seed": 0, "run_id": label, "metric": "accuracy", "dev": {"accuracy": 0.5},
            "test": {"accuracy": 0.5}, "test_examples": {"correct": correct}, "evals": [], "steps": 10,
            "trainable_params": 10, "total_params": 100, "trainable_pct": 10.0, "peak_memory_mb": 950.0,
            "estimate_mb": 400.0, "expected_process_mb": 900.0, "tokens_per_s": 1.0, "median_step_s": 0.1,
            "env": {"device": "cpu"},
        }  # fmt: skip

    text = write_report([run("full"), run("lora")], tmp_path).read_text()
    assert "| estimate MB (tensors) | expected process MB |" in text and "| 400 | 900 |" in text
    assert "Budget memory by the expected process peak" in text
