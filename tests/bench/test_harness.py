"""The benchmark harness: metrics, sweep validation, a tiny real sweep, failures recorded, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftlab.bench.metrics import entities, entity_f1
from peftlab.bench.report import write_report
from peftlab.bench.runner import read_results, run_sweep
from peftlab.bench.sweep import expand, load_sweep
from peftlab.util.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_entity_spans_follow_conlleval_rules():
    assert entities(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 2), ("LOC", 3, 4)}
    assert entities(["I-ORG", "I-ORG", "B-ORG"]) == {("ORG", 0, 2), ("ORG", 2, 3)}  # stray I- starts a chunk
    assert entities(["B-PER", "I-LOC"]) == {("PER", 0, 1), ("LOC", 1, 2)}  # a type change ends the chunk


def test_entity_f1_micro():
    refs = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    preds = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "B-MISC"]]
    scores = entity_f1(preds, refs)  # tp=2, predicted=3, reference=3
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)
    assert entity_f1(refs, refs)["f1"] == 1.0


def test_sweep_grid_and_errors():
    sweep = {
        "models": ["m"],
        "tasks": ["sst2"],
        "methods": [{"method": "lora", "params": {"r": [4, 8], "target_modules": ["q", "v"]}}],
        "seeds": [0, 1],
        "train": {"lr": [1e-3, 2e-3]},
    }
    specs = expand(sweep)
    assert len(specs) == 8 and len({s["run_id"] for s in specs}) == 8
    assert all(s["params"]["target_modules"] == ["q", "v"] for s in specs)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['lrate'\] in train"):
        expand({**sweep, "train": {"lrate": 1}})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['extra'\] in the sweep"):
        expand({**sweep, "extra": 1})
    with pytest.raises(ConfigError, match="unknown method 'vera'; valid methods: full, lora, dora"):
        expand({**sweep, "methods": ["vera"]})
    with pytest.raises(ConfigError, match="unknown task 'mnli'; valid tasks: sst2, conll2003, sst2-gen"):
        expand({**sweep, "tasks": ["mnli"]})


def test_shipped_sweeps_are_valid():
    for path in (REPO / "benchmarks" / "sweeps").glob("*.yaml"):
        assert expand(load_sweep(path)), path


def test_tiny_sweep_runs_records_failures_and_resumes(tmp_path, sst2_dir):
    sweep = load_sweep(REPO / "benchmarks" / "sweeps" / "ci.yaml")
    sweep["methods"] = sweep["methods"][:2] + [{"method": "lora", "label": "broken", "params": {"r": 0}}]
    specs = expand(sweep)
    records = run_sweep(specs, tmp_path, progress=False)
    by_label = {r["label"]: r for r in records}
    assert by_label["full"]["status"] == "ok" and by_label["lora"]["status"] == "ok"
    assert (
        by_label["broken"]["status"] == "failed"
        and "rank r must be an integer ≥ 1" in by_label["broken"]["error"]
    )
    lora = by_label["lora"]
    assert 0 < lora["trainable_pct"] < 1 and lora["peak_memory_mb"] > 100 and lora["tokens_per_s"] > 0
    assert 0 <= lora["test"]["accuracy"] <= 1 and lora["env"]["torch"]
    report = write_report(records, tmp_path)
    text = report.read_text()
    assert (
        "| full |" in text
        and "Failed runs" in text
        and (tmp_path / "metric_vs_params.png").stat().st_size > 1000
    )
    # resume: finished runs are skipped (their records untouched), the failed one is retried
    before = {r["run_id"]: r["wall_s"] for r in read_results(tmp_path) if r["status"] == "ok"}
    run_sweep(specs, tmp_path, progress=False)
    after = {r["run_id"]: r.get("wall_s") for r in read_results(tmp_path) if r["status"] == "ok"}
    assert after == before
    assert len(read_results(tmp_path)) == 3
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)


def test_cli_info_prints_targets_and_counts(capsys):
    from peftlab.cli import main

    assert main(["info", "--model", "minilm-l6", "--set", "r=4"]) == 0
    out = capsys.readouterr().out
    assert "bert.encoder.layer.5.attention.self.value  [384, 384]" in out
    assert "trainable params: 36,864 || all params: 22,750,850 || trainable%: 0.1620" in out
    assert main(["info", "--model", "minilm-l6", "--set", 'target_modules=["nope"]']) == 2
    assert "candidate linear layers: query, key, value" in capsys.readouterr().err


def test_length_grouped_batches_cover_every_row_once_with_less_padding(sst2_dir):
    """Grouping by length keeps an epoch a permutation of the rows and cuts the padded tokens."""
    from transformers import AutoTokenizer

    from peftlab.bench.tasks import get_task
    from peftlab.util.models import resolve_model_path

    task = get_task("sst2")
    rows = task.load(sst2_dir.parent, "train", limit=2000, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm-l6"))

    def epoch(grouped):
        batches = list(task.batches(tokenizer, rows, 32, 64, seed=3, group_by_length=grouped))
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        padded = sum(b["input_ids"].numel() for b in batches)
        return real, padded, batches

    real_random, padded_random, _ = epoch(False)
    real_grouped, padded_grouped, grouped_batches = epoch(True)
    assert (
        real_grouped
        == real_random
        == sum(len(x) for x in tokenizer([s for s, _ in rows], truncation=True, max_length=64)["input_ids"])
    )
    assert sum(len(b["labels"]) for b in grouped_batches) == len(rows)
    assert padded_grouped < 0.6 * padded_random, (padded_grouped, padded_random)
    # the batch order is shuffled, not longest-first
    widths = [b["input_ids"].shape[1] for b in grouped_batches]
    assert widths != sorted(widths, reverse=True) and widths != sorted(widths)


class _FakeHubTable(list):
    """What datasets.load_dataset returns, as far as the readers use it: rows and ``features``."""

    def __init__(self, rows, tag_names=None):
        super().__init__(rows)
        if tag_names is not None:
            from types import SimpleNamespace

            self.features = {"ner_tags": SimpleNamespace(feature=SimpleNamespace(names=tag_names))}


def test_hub_data_source_maps_splits_and_columns(monkeypatch):
    """--data hf: SST-2 dev = a seeded tenth of GLUE train, test = GLUE validation; CoNLL tag ids -> names."""
    from peftlab.bench import tasks

    calls = []
    glue_train = [{"sentence": f"s{i}", "label": i % 2, "idx": i} for i in range(50)]
    glue_val = [{"sentence": "v", "label": 1, "idx": 0}]
    conll = [{"tokens": ["EU", "rejects"], "ner_tags": [3, 0]}]

    def fake_load(dataset_id, config, split):
        calls.append((dataset_id, config, split))
        if dataset_id.endswith("glue") or dataset_id == "me/sst":
            return _FakeHubTable(glue_train if split == "train" else glue_val)
        return _FakeHubTable(conll, tasks.CONLL_TAGS)

    monkeypatch.setattr(tasks, "_load_hub_split", fake_load)
    assert tasks.data_dir("hf") == "hf" and isinstance(tasks.data_dir("/x"), Path)
    monkeypatch.setenv("PEFTLAB_DATA", "hf:me/sst")
    assert tasks.data_dir() == "hf:me/sst"
    sst2 = tasks.get_task("sst2")
    train, dev = sst2.load("hf", "train"), sst2.load("hf", "dev")
    assert len(dev) == 5 and len(train) == 45 and not set(train) & set(dev)
    assert sorted(train + dev) == sorted((r["sentence"], r["label"]) for r in glue_train)
    assert sst2.load("hf", "test") == [("v", 1)]
    assert calls[0] == ("nyu-mll/glue", "sst2", "train") and calls[-1][2] == "validation"
    assert tasks.get_task("sst2-gen").load("hf:me/sst", "test") == [("v", 1)]
    assert calls[-1] == ("me/sst", None, "validation")
    rows = tasks.get_task("conll2003").load("hf", "dev")
    assert rows == [(["EU", "rejects"], ["B-ORG", "O"])] and calls[-1] == (
        "eriktks/conll2003",
        None,
        "validation",
    )


def test_hub_data_without_datasets_says_what_to_install(monkeypatch):
    import sys

    from peftlab.bench import tasks

    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(ConfigError, match="pip install datasets"):
        tasks.get_task("sst2").load("hf", "test")
