"""benchmarks/gpu.sh --dry-run: the steps of the GPU script run at toy sizes on the CPU (kernels in Triton's
interpreter), so the script cannot break unnoticed before a GPU is lent. Three steps run elsewhere in the
suite and are not repeated here: ``kernel-tests`` and ``dora-norm`` are suite files (tests/kernels, the layer, mixed-batch,
variant and quant files), and ``scale``'s
dry run is tests/bench/test_scale_dry_run.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: every step but scale, dora-norm and kernel-tests (see the module docstring)
STEPS = ("kernel-bench", "efficiency", "efficiency-variants", "step-profile", "multi-adapter", "train-many")


def test_gpu_script_dry_run(tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "PEFTLAB_CACHE": str(tmp_path / "cache"), "PEFTLAB_PY": sys.executable}
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu.sh"), "--dry-run", "--out", str(out), "--only", ",".join(STEPS)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=3000,
    )  # fmt: skip
    summary = (out / "summary.md").read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "0 step(s) failed" in summary and "DRY RUN" in summary
    for step in ("environment", *STEPS):
        assert f"| {step} | ok |" in summary, summary
    # the kernel benchmark timed the fused kernel (interpreted) beside the torch providers
    csv_text = (out / "kernels" / "lora_linear_dry-run.csv").read_text()
    for provider in ("base", "hf-peft", "peftlab-torch", "peftlab-triton"):
        assert f"\n{provider}," in csv_text
    # the efficiency step trained every config; peftlab's loss equals HF PEFT's
    data = json.loads((out / "efficiency" / "efficiency.json").read_text())
    rows = {s["config"]: s for s in data["summary"]}
    assert set(rows) == {"floor-r0", "hf-peft-lora", "peftlab-lora"}
    assert all("error" not in s for s in rows.values())
    assert rows["peftlab-lora"]["loss_rel_diff_vs_hf"] < 1e-6
    # the packed-training step ran the SGMV kernels (interpreted) and their gradients matched the torch path's
    packed = json.loads((out / "train-many" / "train_many_gpu.json").read_text())
    assert packed["agreement"]["grads_compared"] > 0 and not packed["agreement"]["kernel_failures"]
    assert packed["agreement"]["grad_max_rel_diff"] < 1e-4
    assert set(packed["rounds"][0]) == {"packed", "packed-torch", "sequential"}
