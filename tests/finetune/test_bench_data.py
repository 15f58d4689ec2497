"""The harness on a user's data file: ``peftlab bench --data FILE --task ...`` and ``data:`` in sweep files."""

from __future__ import annotations

import csv
import json
import random

import pytest

pytest.importorskip("datasets")

from peftlab.bench import worker  # noqa: E402
from peftlab.bench.report import write_report  # noqa: E402
from peftlab.bench.stats import corpus_metric  # noqa: E402
from peftlab.bench.sweep import expand  # noqa: E402
from peftlab.bench.user_data import UserTask  # noqa: E402
from peftlab.cli import main  # noqa: E402
from peftlab.util.errors import ConfigError  # noqa: E402

WORDS = ["movie", "plot", "actor", "scene", "story", "music", "film", "cast"]


def reviews_csv(path, n=50, seed=0):
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "stars"])
        for i in range(n):
            good = i % 2 == 0
            w.writerow(
                [" ".join(rng.sample(WORDS, 3) + ["good" if good else "bad"]), "pos" if good else "neg"]
            )
    return path


def sweep(data, task, model, methods=("lora",), **train):
    return {
        "name": "mine", "models": [model], "tasks": [task], "data": data, "seeds": [0],
        "methods": list(methods), "train": {"max_steps": 4, "batch_size": 8, "max_length": 32, "progress": False, **train},
    }  # fmt: skip


def test_classify_file_splits_scores_and_reports(tmp_path, monkeypatch, tiny_bert_dir):
    """A CSV with its own column names: test = the held-out 20%, dev = 10% of the rest, train = the others,
    disjoint; each run's test metric equals the one recomputed from its per-example columns; the report has
    the Δ-vs-full table of the built-in tasks."""
    data = {"file": str(reviews_csv(tmp_path / "reviews.csv")), "eval_split": 0.2, "text_column": "review",
            "label_column": "stars"}  # fmt: skip
    specs = expand(sweep(data, "classify", tiny_bert_dir, methods=("full", "lora")))
    assert [s["data"]["file"] for s in specs] == [str((tmp_path / "reviews.csv").resolve())] * 2
    task = UserTask("classify", specs[0]["data"], tiny_bert_dir, 32)
    sizes = {split: len(task.load(None, split)) for split in ("train", "dev", "test")}
    assert sizes == {"train": 36, "dev": 4, "test": 10}
    ids = {split: {tuple(e["input_ids"]) for e, _, _ in task.load(None, split)} for split in sizes}
    assert (
        not (ids["test"] & ids["train"])
        and not (ids["dev"] & ids["train"])
        and not (ids["dev"] & ids["test"])
    )
    assert task.model_kwargs()["id2label"] == {0: "neg", 1: "pos"}
    records = []
    for spec in specs:
        record = {**spec, **worker.run(spec)}
        assert record["status"] == "ok" and record["metric"] == "accuracy" and record["dev_size"] == 4
        assert len(record["test_examples"]["correct"]) == 10
        assert record["test"]["accuracy"] == corpus_metric(record["test_examples"], "accuracy")
        records.append(record)
    assert records[0]["trainable_params"] > 10 * records[1]["trainable_params"]  # full vs lora
    from peftlab.bench import report

    monkeypatch.setattr(report, "write_plots", lambda *args, **kwargs: [])  # the tables only (plots: slow)
    text = write_report(records, tmp_path).read_text()
    assert "## classify" in text and "| lora |" in text and "Δ vs full" in text


def test_tokens_and_sft_files_run_in_the_worker(tmp_path, tiny_bert_dir, tiny_llama_dir):
    """tokens (JSONL words/tags) is scored by entity F1 with tp/n_pred/n_ref per sentence; sft (prompt/response)
    by exact match with one 0/1 per test row; both recompute to the recorded metric."""
    rng = random.Random(0)
    with open(tmp_path / "ner.jsonl", "w") as f:
        for _ in range(30):
            words = rng.sample(WORDS, 3) + ["alice"]
            f.write(json.dumps({"tokens": words, "ner_tags": ["O", "O", "O", "B-PER"]}) + "\n")
    with open(tmp_path / "qa.jsonl", "w") as f:
        for i in range(30):
            f.write(
                json.dumps({"prompt": f"Review: {WORDS[i % 8]} good\nSentiment?", "response": "positive"})
                + "\n"
            )
    ner = expand(
        sweep({"file": str(tmp_path / "ner.jsonl"), "eval_split": 0.2}, "tokens", tiny_bert_dir, ("full",))
    )[0]
    qa = expand(sweep(str(tmp_path / "qa.jsonl"), "sft", tiny_llama_dir, ("lora",)))[0]
    assert qa["data"]["eval_split"] == 0.1  # a bare file path: the default test share
    r_ner, r_qa = worker.run(ner), worker.run(qa)
    assert r_ner["metric"] == "f1" and len(r_ner["test_examples"]["tp"]) == 6
    assert r_ner["test"]["f1"] == pytest.approx(corpus_metric(r_ner["test_examples"], "f1"))
    assert sum(r_ner["test_examples"]["n_ref"]) == 6  # one person per sentence
    assert r_qa["metric"] == "exact_match" and len(r_qa["test_examples"]["correct"]) == 3
    assert r_qa["test"]["exact_match"] == corpus_metric(r_qa["test_examples"], "exact_match")
    assert r_qa["dev_chance"] == 1.0  # one reference answer: a constant guess is always right


@pytest.mark.parametrize(
    ("data", "task", "expected"),
    [
        ({"file": "missing.csv"}, "classify", "data.file: data file missing.csv not found; valid: a .csv"),
        ({"file": "x.xlsx"}, "classify", "unknown data format '.xlsx'"),
        (
            {"file": "REVIEWS", "eval_split": 1.5},
            "classify",
            "data.eval_split: must be a fraction between 0 and 1",
        ),
        (
            {"file": "REVIEWS", "evals": 0.1},
            "classify",
            "unknown key(s) ['evals'] in data; valid keys: file, eval_file",
        ),
        ({"file": "REVIEWS"}, "sst2", "valid tasks for a data file: classify, tokens, sft"),
        ({"file": "REVIEWS"}, "lm", "task 'lm' on a data file has only a loss"),
    ],
)
def test_sweep_data_errors_name_the_key_and_what_is_valid(tmp_path, data, task, expected):
    reviews = str(reviews_csv(tmp_path / "reviews.csv", 10))
    data = {k: reviews if v == "REVIEWS" else v for k, v in data.items()}
    with pytest.raises(ConfigError) as err:
        expand(sweep(data, task, "minilm-l6"))
    assert expected in str(err.value)


def test_cli_bench_on_a_file_runs_and_stops_early_on_a_wrong_column(
    tmp_path, capsys, monkeypatch, tiny_bert_dir
):
    """Through the CLI (the worker in this process, its spec through JSON as in the subprocess); a wrong column
    stops it before any run, naming the file and the columns found."""
    from peftlab.bench import runner

    def in_process(spec, work, timeout):
        spec = json.loads(json.dumps(spec))
        return {**spec, **worker.run(spec)}

    monkeypatch.setattr(runner, "run_in_subprocess", in_process)
    from peftlab.bench import report

    monkeypatch.setattr(report, "write_plots", lambda *args, **kwargs: [])
    data = str(reviews_csv(tmp_path / "reviews.csv", 40))
    base = ["bench", "--data", data, "--model", tiny_bert_dir, "--methods", "lora", "--max-steps", "3",
            "--out", str(tmp_path / "o")]  # fmt: skip
    assert main([*base, "--task", "classify", "--label-column", "rating"]) == 2
    err = capsys.readouterr().err
    assert "reviews.csv: no column 'rating' (--label-column); columns found: review, stars" in err
    assert not (tmp_path / "o").exists()
    assert main(base) == 2 and "give its task, --task classify, tokens or sft" in capsys.readouterr().err
    assert main([*base, "--task", "classify", "--label-column", "stars", "--eval-split", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "sweep 'reviews': 1 runs" in out and "1 of 1 runs succeeded" in out
    (record,) = [json.loads(line) for line in (tmp_path / "o" / "results.jsonl").read_text().splitlines()]
    assert record["status"] == "ok" and len(record["test_examples"]["correct"]) == 10
