"""Issue 29, CLI and sweep inputs: one line and exit status 2 for every input error; sweep schema errors name
the key and its valid form; sweep names never leave runs/; `peftlab merge` never picks one of several
adapters silently."""

from __future__ import annotations

import pytest

import peftlab
from peftlab.bench.sweep import expand, load_sweep
from peftlab.cli import main
from peftlab.util.errors import ConfigError

BASE = {"name": "q", "models": ["minilm-l6"], "tasks": ["sst2"], "methods": ["lora"]}


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"peftlab {argv[0]}: error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"seeds": 1}, r"seeds: must be a non-empty list of whole numbers.*e\.g\. seeds: \[0, 1, 2\]"),
        ({"seeds": ["x"]}, r"seeds: must be"),
        ({"models": "minilm-l6"}, r"models: must be a non-empty list of names.*e\.g\. models: \[minilm-l6\]"),
        ({"train": [1, 2]}, r"train: must be a mapping.*e\.g\. train: \{max_steps: 300"),
        ({"train": {"lr": "fast"}}, r"train\.lr: must be a finite number"),
        ({"train": {"max_steps": 0}}, r"train\.max_steps: must be a whole number ≥ 1"),
        ({"train": {"precision": "fp8"}}, r"train\.precision: must be one of fp32, bf16, fp16"),
        ({"methods": [{"method": "lora", "train": {"lr": [1e-3, "x"]}}]}, r"methods\[0\]\.train\.lr\[1\]"),
        ({"methods": [{"method": "lora", "params": [1]}]}, r"methods\[0\]\.params: must be a mapping"),
        ({"tasks": [{"name": 3}]}, r"tasks\[0\]\.name: must be a task name"),
        ({"name": "../../x"}, r"name: '\.\./\.\./x' is not a valid sweep name"),
        ({"name": "/tmp/x"}, r"not a valid sweep name"),
        ({"name": "a/b"}, r"not a valid sweep name"),
    ],
)
def test_sweep_schema_errors_name_the_key_and_its_valid_form(change, message):
    with pytest.raises(ConfigError, match=message):
        expand(BASE | change)


def test_numbers_yaml_reads_as_strings_are_numbers(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "models: [minilm-l6]\ntasks: [sst2]\nseeds: [0]\ntrain: {lr: 1e-3, max_steps: null}\n"
        "methods:\n  - {method: lora, params: {r: 4, alpha: 1e1}, train: {lr: [1e-3, 2e-3]}}\n"
    )
    specs = expand(load_sweep(path))
    assert [s["train"]["lr"] for s in specs] == [1e-3, 2e-3]
    assert specs[0]["params"]["alpha"] == 10.0 and specs[0]["sweep"] == "s"


def test_a_sweep_file_name_becomes_a_plain_name(tmp_path):
    path = tmp_path / "my sweep;1.yaml"
    path.write_text("models: [minilm-l6]\ntasks: [sst2]\nmethods: [lora]\n")
    assert expand(load_sweep(path))[0]["sweep"] == "my-sweep-1"


def test_bench_with_a_hostile_sweep_name_exits_2_and_writes_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text("name: ../../escape\nmodels: [minilm-l6]\ntasks: [sst2]\nmethods: [lora]\n")
    line = one_line_error(capsys, ["bench", "--sweep", "s.yaml"])
    assert "not a valid sweep name" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


@pytest.mark.parametrize("body, key", [("seeds: 1", "seeds"), ("models: minilm-l6", "models"), ("train: [1, 2]", "train")])
def test_bench_schema_errors_are_one_line(capsys, tmp_path, body, key):
    path = tmp_path / "s.yaml"
    text = {"models": "models: [minilm-l6]", "tasks": "tasks: [sst2]", "methods": "methods: [lora]"}
    text[key] = body
    path.write_text("\n".join(text.values()) + "\n")
    assert f"{key}: must be" in one_line_error(capsys, ["bench", "--sweep", str(path)])


def test_bad_regex_in_set_is_one_line(capsys):
    line = one_line_error(capsys, ["info", "--model", "minilm-l6", "--set", 'rank_pattern={"(": 2}'])
    assert "rank_pattern key '(' is not a valid regular expression" in line


def test_bad_regex_target_modules_in_python_is_a_config_error():
    with pytest.raises(ConfigError, match="target_modules 'q_proj\\(' is not a valid regular expression"):
        peftlab.LoraConfig(target_modules="q_proj(")


@pytest.mark.parametrize("size", ["1.2.3GB", "GB", "1,5GB", "24XB"])
def test_fit_with_a_bad_size_is_one_line(capsys, size):
    line = one_line_error(capsys, ["estimate", "--model", "minilm-l6", "--fit", size])
    assert "is not a memory size" in line and "24GB" in line


def test_hand_edited_config_with_a_wrong_type_is_a_config_error():
    with pytest.raises(ConfigError, match="rank_pattern keys must be module names or regexes"):
        peftlab.PeftConfig.from_dict({"method": "lora", "rank_pattern": {1: 2}})
    with pytest.raises(ConfigError, match="JSON object"):
        peftlab.PeftConfig.from_dict(["lora"])


def test_merge_on_a_two_adapter_folder_asks_which(capsys, tmp_path):
    model, _ = peftlab.load_model("minilm-l6", kind="seq-cls")
    peftlab.wrap(model, peftlab.LoraConfig(r=2, adapter_name="one"))
    peftlab.wrap(model, peftlab.LoraConfig(r=2, adapter_name="two"))
    folder = peftlab.save_adapter(model, tmp_path / "both")
    argv = ["merge", "--model", "minilm-l6", "--adapter", str(folder), "--out", str(tmp_path / "m")]
    capsys.readouterr()
    line = one_line_error(capsys, argv)
    assert "holds 2 adapters (one, two)" in line and "--adapter-name" in line
    assert not (tmp_path / "m").exists()
    line = one_line_error(capsys, argv + ["--adapter-name", "three"])  # refused before the model loads
    assert "no such adapter; it has: one, two" in line
    assert main(argv + ["--adapter-name", "two"]) == 0
    assert (tmp_path / "m" / "config.json").is_file()
