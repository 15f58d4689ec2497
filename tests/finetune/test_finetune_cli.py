"""``peftlab train``: --help lists choices and defaults; bad input exits 2 with one line; a run writes its outputs;
the datasets and collator also drive transformers.Trainer."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

pytest.importorskip("datasets")

from peftlab.finetune_cli import add_train_parser, main  # noqa: E402


def test_help_lists_choices_and_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "{classify,tokens,sft,lm}" in text
    assert "{lora,dora,adalora,houlsby,pfeiffer,parallel,prefix,qlora,full}" in text
    assert "(default: lora)" in text and "(default: 16)" in text and "full 5e-05" in text and "(default: None)" not in text


def test_the_parser_plugs_into_a_parent_cli():
    parser = argparse.ArgumentParser(prog="peftlab")
    add_train_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--model", "m", "--data", "d.csv", "--task", "lm", "--out", "o", "--target", "q,v"])
    assert args.method == "lora" and args.func.__name__ == "run_train" and args.eval_split is None


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--task", "classify", "--label-column", "stars"], "no column 'stars' (--label-column); columns found: text, label"),
        (["--task", "classify", "--method", "full", "--r", "4"], "method 'full' trains every parameter"),
        (["--task", "classify", "--method", "houlsby", "--set", "nope=1"], "--set nope: not a field of houlsby"),
        (["--task", "tokens"], "no words column"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, tiny_bert_dir, argv, expected):
    data = tmp_path / "d.csv"
    data.write_text("text,label\nfine,1\nbad,0\n")
    code = main(["--model", tiny_bert_dir, "--data", str(data), "--out", str(tmp_path / "o"), "--no-progress", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("peftlab train: error: ") and err.count("\n") == 1 and expected in err, err


@pytest.mark.parametrize("argv", [["--eval-split", "1.5"], ["--max-steps", "0"], ["--eval-split", "0.1", "--eval-data", "x"]])
def test_bad_options_are_usage_errors(tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        main(["--model", "m", "--data", "d.csv", "--task", "lm", "--out", "o", *argv])
    assert exit_.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_cli_run_writes_outputs(tmp_path, capsys, tiny_bert_dir):
    data = tmp_path / "d.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"row {i} {'good' if i % 2 else 'bad'}\t{i % 2}\n" for i in range(40)))
    code = main(["--model", tiny_bert_dir, "--data", str(data), "--eval-split", "0.2", "--task", "classify",
                 "--max-steps", "3", "--batch-size", "8", "--out", str(tmp_path / "o"), "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and '"eval_rows": 8' in out and "written to" in out
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["method"] == "lora" and metrics["eval_rows"] == 8


def test_trainer_uses_the_dataset_and_collator(tmp_path, tiny_bert_dir):
    """transformers.Trainer trains on peftlab.data's dataset and collator as they are, and the loss falls."""
    from transformers import Trainer, TrainingArguments

    import peftlab
    import peftlab.data as D

    rows = [{"text": ("great fine good" if i % 2 else "awful poor bad"), "label": i % 2} for i in range(64)]
    model, tok = peftlab.load_model(tiny_bert_dir, kind="seq-cls", num_labels=2)
    data = D.prepare("classify", tok, rows)
    batch = data.collator([data.train[i] for i in range(64)])

    def loss() -> float:
        with torch.no_grad():
            return float(model(**batch).loss)

    before = loss()
    args = TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=30, per_device_train_batch_size=16, learning_rate=5e-3,
                             report_to=[], save_strategy="no", use_cpu=True, logging_strategy="no")  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data.train, data_collator=data.collator).train()
    model.eval()
    assert loss() < 0.5 * before
