"""benchmarks/scale.py --dry-run (issue 32's ``scale`` step at toy sizes on the CPU): the JSON has exactly the
issue's schema, every number is finite and ≥ 0, every row is in scale.md, and the aggregation, the loss
comparison, the validator and --merge behave on hand-made rounds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import scale_report as R  # noqa: E402

SCHEMA = {
    "train": {"model": str, "method": str, "library": str, "batch": int, "seq": int, "settings": str,
              "tokens_per_s": float, "peak_mib": float, "loss_rel_diff": float},
    "kernel": {"shape": str, "base_ms": float, "peftlab_ms": float, "hf_peft_ms": float},
    "decode": {"model": str, "adapters": int, "batch": int, "library": str, "tokens_per_s": float},
}  # fmt: skip


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=240, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "scale.json").read_text()), (out / "scale.md").read_text()


def test_json_has_exactly_the_issue_schema(dry):
    _, data, _ = dry
    assert list(data) == ["device", "date", "commit", "train", "kernel", "decode"]
    assert data["device"] == "cpu" and len(data["date"]) == 10 and data["commit"]
    for kind, fields in SCHEMA.items():
        assert data[kind], f"no {kind} rows"
        for row in data[kind]:
            assert set(row) == set(fields), (kind, sorted(row))
            for name, typ in fields.items():
                value = row[name]
                if typ is float:
                    assert isinstance(value, (int, float)) and not isinstance(value, bool), (kind, name, value)
                    assert value >= 0 and value == value and value != float("inf"), (kind, name, value)
                elif typ is int:
                    assert isinstance(value, int) and value > 0, (kind, name, value)
                else:
                    assert isinstance(value, str) and value, (kind, name, value)
    assert R.validate(data) == []


def test_every_row_ran_and_the_libraries_agree(dry):
    out, data, _ = dry
    raw = json.loads((out / "scale-raw.json").read_text())
    assert not raw["skipped"] and not [r for p in raw["processes"] for r in p["rows"] if "error" in r]
    got = {(r["model"], r["method"], r["library"]) for r in data["train"]}
    for model in ("llama-3.1-8b", "llama-3.2-1b"):
        assert (model, "floor", "peftlab") in got
        assert {(model, "lora", lib) for lib in ("peftlab", "hf-peft")} <= got
    methods_8b = {"dora"} | ({"qlora"} if any(r["method"] == "qlora" for r in data["train"]) else set())
    assert {("llama-3.1-8b", m, lib) for m in methods_8b for lib in ("peftlab", "hf-peft")} <= got
    # same random weights in every process and the same A: the two libraries' losses agree (fp32 toy models)
    for row in data["train"]:
        assert row["loss_rel_diff"] is not None and row["loss_rel_diff"] < 1e-3, row
        assert (row["seq"], row["batch"]) == (32, 1)
    assert {r["library"] for r in data["decode"]} == {"base", "peftlab", "hf-peft"}
    assert [r["shape"] for r in data["kernel"]] == ["64x32x48"]


def test_markdown_lists_every_row(dry):
    _, data, md = dry
    assert "DRY RUN" in md
    lines = md.splitlines()
    for r in data["train"]:
        assert any(line.startswith(f"| {r['model']} | {r['method']} | {r['library']} | {r['batch']} × {r['seq']} |")
                   for line in lines), r  # fmt: skip
    for r in data["kernel"]:
        assert any(line.startswith(f"| {r['shape']} |") for line in lines), r
    for r in data["decode"]:
        assert any(line.startswith(f"| {r['model']} | {r['adapters']} | {r['batch']} | {r['library']} |") for line in lines), r
    train_lines = [line for line in lines if line.startswith("| llama-")]
    assert len(train_lines) == len(data["train"]) + len(data["decode"])
    assert md.count("(dry run: meaningless)") == len(R.goals(data))


# ---- aggregation, loss comparison, validation, merge: hand-made rounds (no subprocess) ---------------------


def _train(lib, method, rnd, tps, peak, losses, model="m8"):
    return {"kind": "train", "model": model, "method": method, "library": lib, "batch": 1, "seq": 2048,
            "settings": "s", "tokens_per_s": tps, "peak_mib": peak, "losses": losses, "round": rnd}  # fmt: skip


def _raw(rows, **extra):
    return {"device": "GPU X", "date": "2026-12-02", "commit": "abc", "command": "c", "dry_run": False, "parts": ["1"],
            "rounds": 2, "budget_s": 420, "processes": [{"part": "1", "library": "x", "round": 1, "rows": rows,
                                                          "returncode": 0, "seconds": 1.0}], "skipped": [], **extra}  # fmt: skip


def test_aggregate_medians_max_peak_and_loss_diffs():
    rows = [
        _train("peftlab", "lora", 1, 300.0, 100.0, [2.0, 1.0]), _train("peftlab", "lora", 2, 100.0, 120.0, [2.0, 1.02]),
        _train("hf-peft", "lora", 1, 100.0, 200.0, [2.0, 1.0]), _train("hf-peft", "lora", 2, 120.0, 190.0, [2.0, 1.0]),
        _train("peftlab", "floor", 1, 500.0, 80.0, [2.002]),
        _train("peftlab", "dora", 1, 50.0, 110.0, [2.0, 1.5, 1.2]), _train("hf-peft", "dora", 1, 40.0, 250.0, [2.0, 1.4]),
        _train("peftlab", "qlora", 1, 50.0, 110.0, [2.0, 1.5]),  # no HF PEFT row: null
        {"kind": "train", "error": "boom", "task": {}},  # failed tasks are not rows
    ]  # fmt: skip
    result = R.aggregate(_raw(rows))
    assert R.validate(result) == []
    by = {(r["method"], r["library"]): r for r in result["train"]}
    assert [(r["method"], r["library"]) for r in result["train"]] == [
        ("floor", "peftlab"), ("lora", "peftlab"), ("lora", "hf-peft"), ("dora", "peftlab"), ("dora", "hf-peft"), ("qlora", "peftlab")]
    assert by["lora", "peftlab"]["tokens_per_s"] == 200.0 and by["lora", "peftlab"]["peak_mib"] == 120.0
    assert by["lora", "peftlab"]["loss_rel_diff"] == pytest.approx(0.02)  # round 2: |1.02 − 1.0| / 1.0
    assert by["lora", "hf-peft"]["loss_rel_diff"] == 0.0
    assert by["floor", "peftlab"]["loss_rel_diff"] == pytest.approx(0.001)  # first step vs HF PEFT LoRA's
    assert by["dora", "peftlab"]["loss_rel_diff"] == pytest.approx(0.1 / 1.4)  # the last step both took (index 1)
    assert by["qlora", "peftlab"]["loss_rel_diff"] is None
    verdicts = {name: (fig, v) for name, _, fig, v in R.goals(result)}
    assert verdicts["lora llama-3.1-8b: tokens/s vs HF PEFT"] == (None, "not measured")  # goals name the real models
    md = R.markdown(result, _raw(rows))
    assert "| m8 | lora | peftlab | 1 × 2048 | 200 | 120 | 1.82 | 0.6 | 0.02 | s |" in md  # 200/110, 120/200 (max peaks)


def test_diverged_loss_gives_null_diff_and_write_never_raises(tmp_path):
    import scale

    rows = [_train("peftlab", "lora", 1, 2.0, 1.0, [2.0, float("nan")]), _train("hf-peft", "lora", 1, 1.0, 2.0, [2.0, 1.0])]
    result = scale.write(tmp_path, _raw(rows))
    assert result["train"][0]["loss_rel_diff"] is None and (tmp_path / "scale.json").is_file()
    bad = _raw([{**_train("peftlab", "lora", 1, 2.0, 1.0, [1.0]), "batch": 0}])
    raw = dict(bad)
    scale.write(tmp_path / "bad", raw)  # a schema break mid-run is recorded, not raised
    assert raw["schema_problems"] and (tmp_path / "bad" / "scale.invalid.json").is_file()
    assert not (tmp_path / "bad" / "scale.json").exists()
    assert "Schema problems" in (tmp_path / "bad" / "scale.md").read_text()


def test_goals_verdicts():
    rows = [_train("peftlab", "lora", 1, 300.0, 50.0, [1.0], model="llama-3.1-8b"),
            _train("hf-peft", "lora", 1, 100.0, 100.0, [1.0], model="llama-3.1-8b"),
            {"kind": "kernel", "shape": "8192x4096x4096", "base_ms": 1.0, "peftlab_ms": 1.2, "hf_peft_ms": 2.0, "round": 1},
            {"kind": "decode", "model": "llama-3.2-1b", "adapters": 16, "batch": 32, "library": "base", "tokens_per_s": 100.0, "round": 1},
            {"kind": "decode", "model": "llama-3.2-1b", "adapters": 16, "batch": 32, "library": "peftlab", "tokens_per_s": 75.0, "round": 1},
            {"kind": "decode", "model": "llama-3.2-1b", "adapters": 16, "batch": 32, "library": "hf-peft", "tokens_per_s": 30.0, "round": 1}]  # fmt: skip
    goals = {name: (fig, v) for name, _, fig, v in R.goals(R.aggregate(_raw(rows)))}
    assert goals["lora llama-3.1-8b: tokens/s vs HF PEFT"] == (3.0, "met")
    assert goals["lora llama-3.1-8b: peak memory vs HF PEFT"] == (0.5, "met")
    assert goals["one LoRA linear 8192 × 4096 → 4096 fwd+bwd vs the frozen base"] == (pytest.approx(1.2), "MISSED")
    assert goals["decode 16 adapters / batch 32, 1B: vs the no-adapter model"] == (0.75, "met")
    assert goals["decode 16 adapters / batch 32, 1B: vs HF PEFT adapter_names"] == (2.5, "MISSED")
    assert goals["dora llama-3.1-8b: tokens/s vs HF PEFT"] == (None, "not measured")


def test_validate_rejects_schema_breaks():
    good = R.aggregate(_raw([_train("peftlab", "lora", 1, 1.0, 1.0, [1.0]), _train("hf-peft", "lora", 1, 1.0, 1.0, [1.0])]))
    assert R.validate(good) == []
    bad = json.loads(json.dumps(good))
    bad["train"][0]["tokens_per_s"] = -1.0
    bad["train"][1]["method"] = "lokr"
    bad["train"][1]["extra"] = 1
    assert len(R.validate(bad)) == 3  # the negative number, the unknown key, the unknown method
    bad = json.loads(json.dumps(good))
    bad["train"][0]["batch"] = 1.5
    bad["kernel"] = [{"shape": "8192-4096", "base_ms": 1.0, "peftlab_ms": float("nan"), "hf_peft_ms": 1.0}]
    bad["date"] = "02/12/2026"
    problems = R.validate(bad)
    assert any("batch" in p for p in problems) and any("shape" in p for p in problems)
    assert any("peftlab_ms" in p for p in problems) and any("date" in p for p in problems)
    assert R.validate({**good, "rows": []}) != []


def test_merge_joins_two_calls(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, rows, part in ((a, [_train("peftlab", "lora", 1, 2.0, 1.0, [1.0]), _train("hf-peft", "lora", 1, 1.0, 2.0, [1.0])], "1"),
                          (b, [{"kind": "kernel", "shape": "8x4x4", "base_ms": 1.0, "peftlab_ms": 1.0, "hf_peft_ms": 2.0, "round": 1}], "2")):  # fmt: skip
        d.mkdir()
        (d / "scale-raw.json").write_text(json.dumps(_raw(rows, parts=[part])))
    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--merge", str(a), str(b), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "scale.json").read_text())
    assert len(data["train"]) == 2 and data["kernel"][0]["shape"] == "8x4x4" and data["device"] == "GPU X"
    assert json.loads((out / "scale-raw.json").read_text())["parts"] == ["1", "2"]


def test_real_configs_have_the_published_parameter_counts():
    """The inline configs are the real ones: built on the meta device (no memory), the parameter counts equal
    the published models' (Llama-3.2-1B 1,235,814,400 with tied embeddings; Llama-3.1-8B 8,030,261,248; the
    Qwen3-8B-shaped Llama is Qwen3-8B's 8,190,735,360 minus its 36 × 2 × 128 q/k-norm weights)."""
    import scale
    import scale_worker
    import torch

    want = {"llama-3.2-1b": 1_235_814_400, "llama-3.1-8b": 8_030_261_248, "qwen3-8b-shapes": 8_190_735_360 - 36 * 2 * 128}
    for name, count in want.items():
        model = scale_worker.build_base(scale.MODELS[name], "meta", torch.bfloat16)
        assert sum(p.numel() for p in model.parameters()) == count, name
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # not rounded to bf16
    assert set(scale.TOY) == set(scale.MODELS)

