"""The notebooks run top to bottom (nbclient), as a user would run them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def run(name: str, env: dict | None = None) -> list:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    old = dict(os.environ)
    os.environ.update(env or {})
    try:
        nbclient.NotebookClient(
            nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
        ).execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]


def text(outputs) -> str:
    return "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")


def test_quickstart_notebook(sst2_dir):
    out = text(run("quickstart.ipynb"))
    assert "merged == unmerged: True" in out and "reloaded == trained: True" in out
    diff = float(out.split("HF PEFT max abs diff:")[1].split()[0])
    assert diff <= 1e-5


def test_results_notebook(tmp_path, sst2_dir):
    from peftlab.bench.runner import run_sweep
    from peftlab.bench.sweep import expand, load_sweep

    sweep = load_sweep(Path(__file__).resolve().parents[2] / "benchmarks" / "sweeps" / "ci.yaml")
    sweep["methods"] = sweep["methods"][:2]
    run_sweep(expand(sweep), tmp_path, progress=False)
    outputs = run("results.ipynb", {"PEFTLAB_RESULTS": str(tmp_path)})
    assert "sst2" in text(outputs) and any("image/png" in o.get("data", {}) for o in outputs)
