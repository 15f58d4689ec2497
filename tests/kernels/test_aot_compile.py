"""Every Triton kernel compiles for sm_80 and sm_90 without a GPU (Triton's AOT path + the wheel's ptxas).

CI compiles a representative subset (bf16, the largest tile of each launch, both targets; every dtype
for the GEMM-shaped forward on sm_90) and checks: it compiles, no spills, shared memory fits the
target, wgmma on sm_90 / mma on sm_80. The full matrix (every autotune config × fp32/bf16/fp16) is in
the committed ``benchmarks/results/kernels/aot_resources.md``, and this test fails when a kernel's
source no longer matches the table (re-run ``python benchmarks/kernels/aot_resources.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("triton")

from peftlab.kernels import aot

TABLE = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "kernels" / "aot_resources.json"


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    return aot.run_subprocess("ci", tmp_path_factory.mktemp("aot") / "ci.json")


def _spills_only(row) -> bool:
    return bool(row["problems"]) and all(p.startswith("spills") for p in row["problems"]) and not row["error"]


def test_ci_subset_compiles_without_spills_with_tensor_cores(ci_run):
    import triton

    rows = ci_run["results"]
    # spills depend on the Triton version's register allocation: the table (and this check) holds for
    # the version that wrote it; another version (a GPU box's preinstalled Triton) must still compile
    # every launch with tensor cores and fitting shared memory
    same_triton = json.loads(TABLE.read_text())["triton"] == triton.__version__
    bad = [
        f"{r['launch']} {r['dtype']} sm_{r['cc']} {r['config']}: {r['problems']} {r['error']}"
        for r in rows
        if not r["ok"] and (same_triton or not _spills_only(r))
    ]
    assert not bad, "\n".join(bad)
    launches = {r["launch"] for r in rows}
    assert {"lora.fused/forward", "lora.fused/backward", "lora.thin/forward", "lora.da", "dora.norm"} <= launches
    fused = [r for r in rows if r["launch"].startswith("lora.fused")]
    assert {r["tensor_core"] for r in fused if r["cc"] == 90} == {"wgmma"}
    assert {r["tensor_core"] for r in fused if r["cc"] == 80} == {"mma"}
    assert {(r["cc"], r["dtype"]) for r in rows} >= {(80, "bf16"), (90, "bf16"), (90, "fp32"), (90, "fp16")}


def test_committed_full_table_is_current_and_clean(ci_run):
    table = json.loads(TABLE.read_text())
    assert table["subset"] == "full"
    assert table["hashes"] == ci_run["hashes"], (
        "a kernel changed since benchmarks/results/kernels/aot_resources.md was written; "
        "re-run: python benchmarks/kernels/aot_resources.py"
    )
    rows = table["results"]
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    # every launch the CI run compiled appears in the full table, on both targets
    for launch in {r["launch"] for r in ci_run["results"]}:
        assert {r["cc"] for r in rows if r["launch"] == launch} == {80, 90}, launch
    # and the GEMM-shaped launches in all three dtypes
    for launch in {r["launch"] for r in rows if r["launch"].startswith(("lora.fused", "dora.norm"))}:
        assert {r["dtype"] for r in rows if r["launch"] == launch} == {"fp32", "bf16", "fp16"}, launch
    # the fused DoRA norm: every (rows, rank) tile the host can pick, in every dtype, on both targets
    dora = [r for r in rows if r["launch"] == "dora.norm"]
    assert len({(r["dtype"], r["cc"], r["config"]) for r in dora}) == 3 * 2 * 12, len(dora)
