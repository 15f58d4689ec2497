"""The notebooks run top to bottom (nbclient), as a user would run them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"


def _script():
    """scripts/notebooks.py, the documented command: CI runs the notebooks through it."""
    spec = importlib.util.spec_from_file_location("peftlab_notebooks_script", REPO / "scripts" / "notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(name: str, env: dict | None = None, out: Path | None = None) -> list:
    script = _script()
    nb = script.execute(NOTEBOOKS / name, env)
    if out is not None:
        script.save(nb, out / name)
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]


def text(outputs) -> str:
    return "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")


def test_quickstart_notebook(sst2_dir, tmp_path):
    out = text(run("quickstart.ipynb", out=tmp_path))
    saved = nbformat.read(tmp_path / "quickstart.ipynb", as_version=4)  # the executed copy keeps its outputs
    assert "merged == unmerged: True" in "".join(o.get("text", "") for c in saved.cells for o in c.get("outputs", []))
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
