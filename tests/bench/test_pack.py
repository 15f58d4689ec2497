"""Packed sweeps (``peftlab bench --pack N``): runs packed over one frozen base equal their separate runs."""

from __future__ import annotations

import pytest
import torch

from peftlab.bench import pack, worker
from peftlab.bench.sweep import expand


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory, minilm_dir):
    """A tiny random BERT encoder (hidden and attention dropout 0.1) with MiniLM's tokenizer; the
    classification head is missing, so each run's seed initialises its own (as with MiniLM)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def small_sst2(tmp_path_factory, sst2_dir):
    """The first rows of each SST-2 split (reading the whole training file per run costs seconds)."""
    root = tmp_path_factory.mktemp("data")
    (root / "sst2").mkdir()
    for f in sst2_dir.iterdir():
        if f.suffix == ".tsv":
            (root / "sst2" / f.name).write_text("".join(f.read_text().splitlines(True)[:60]))
    return str(root)


def _sweep(model: str, data: str, **extra) -> list[dict]:
    sweep = {
        "models": [model], "tasks": ["sst2"], "seeds": [0, 1], "data": data,
        "train": {"max_steps": 4, "batch_size": 4, "lr": [1.0e-3, 3.0e-3], "max_length": 24, "eval_every": 2,
                  "train_limit": 24, "dev_limit": 16, "test_limit": 16, "progress": False},
        "methods": [{"method": "lora", "params": {"r": [2, 4], "alpha": 8, "dropout": 0.1}}],
        **extra,
    }
    return expand(sweep)


SAME = ("status", "dev", "test", "test_examples", "evals", "best_step", "steps", "trainable_params", "total_params")


def test_packed_runs_of_several_methods_equal_separate_runs_with_base_dropout(tmp_path, tiny_bert_dir, small_sst2):
    specs = _sweep(tiny_bert_dir, small_sst2)
    other = _sweep(tiny_bert_dir, small_sst2, methods=[{"method": "houlsby", "params": {"bottleneck_size": 8, "dropout": 0.1, "layers": [1]}}])[1]
    chosen = [specs[0], specs[-1], other]  # seeds 0/1, lr 1e-3/3e-3, LoRA r 2/4 (q, v) and Houlsby adapters
    assert len({(s["seed"], s["train"]["lr"], s["params"].get("r")) for s in chosen}) == 3
    packed = pack.run_pack(chosen, tmp_path)
    for spec, got in zip(chosen, packed):
        alone = worker.run(spec)
        assert {k: got[k] for k in SAME} == {k: alone[k] for k in SAME}
        assert got["final_train_loss"] == pytest.approx(alone["final_train_loss"], abs=1e-5)
        assert got["packed"]["estimate_mb"] > got["estimate_mb"] == alone["estimate_mb"]
        assert got["tokens_per_s"] > 0 and got["median_step_s"] > 0
        assert got["packed"]["runs"] == 3 and (tmp_path / f"{spec['run_id']}.result.json").is_file()


def test_sweep_packs_resumes_per_run_and_notes_unpacked(tmp_path, tiny_bert_dir, small_sst2, capsys, monkeypatch):
    from peftlab.bench import runner
    from peftlab.bench.runner import read_results, run_sweep

    # in this process (a worker process costs seconds of imports): the runner's planning, claims and records
    monkeypatch.setattr(runner, "run_in_subprocess", lambda spec, work, timeout: {**spec, **worker.run(spec)})
    monkeypatch.setattr(runner, "run_pack_in_subprocess", lambda specs, work, timeout: pack.run_pack(specs, work))
    specs = _sweep(tiny_bert_dir, small_sst2, seeds=[0])  # 4 runs: lr × r
    first = run_sweep(specs[:1], tmp_path, progress=False)  # one run finished before the packed sweep
    records = run_sweep(specs, tmp_path, progress=True, pack=2)
    out = capsys.readouterr().out
    assert "resuming: 1 of 4" in out and out.count("pack of ") == 2 and "pack of 1" in out
    assert {r["run_id"]: r["status"] for r in records} == {s["run_id"]: "ok" for s in specs}
    assert read_results(tmp_path)[0]["test_examples"] == first[0]["test_examples"]
    assert "packed" not in first[0] and sum("packed" in r for r in records) == 3
    from peftlab.bench.report import write_report

    text = write_report(records, tmp_path).read_text()  # packed records report as any others
    assert "lora" in text and "Failed runs" not in text
    packs, alone = pack.plan([*specs, {**specs[0], "method": "adalora"}], 3)
    assert [len(p) for p in packs] == [3, 1] and "method adalora" in alone[0][1]


def test_pack_key_in_sweep_files_is_checked():
    base = {"models": ["m"], "tasks": ["sst2"], "methods": ["lora"]}
    assert len(expand({**base, "pack": "4"})) == 1  # read as a number, not part of the run ids
    assert expand({**base, "pack": 4})[0]["run_id"] == expand(base)[0]["run_id"]
    for bad in (0, 1.5, True, "many"):
        with pytest.raises(Exception, match=r"pack: must be a whole number ≥ 1 .*e\.g\. pack: 4"):
            expand({**base, "pack": bad})


def test_pack_peak_estimate_is_one_base_and_the_stacked_batch():
    import peftlab
    from peftlab.estimate_cli import pack_peak_mb
    from peftlab.estimator.estimate import estimate

    cfg = peftlab.LoraConfig(r=8, modules_to_save=["classifier"])
    one, double = (estimate("minilm-l6", cfg, b, 64, precision="fp32", kind="seq-cls", device="cpu") for b in (32, 64))
    assert pack_peak_mb([one]) == one.total_peak / 2**20
    # two runs of 32 rows: one run of 64 rows plus a second adapter's weights, gradients and optimizer states
    extra = (one.adapter_weights + one.gradients + one.optimizer_states) / 2**20
    assert 0 < pack_peak_mb([one, one]) - double.total_peak / 2**20 <= extra
