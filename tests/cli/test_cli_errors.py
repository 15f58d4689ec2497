"""The CLI reports a user error as one line on stderr with exit status 2, never a traceback.

Covers the CLI cases: an unknown ``--model`` fails at once (no minute of hub retries),
``--set`` with an unknown key, malformed sweep YAML, ``--out`` naming an existing file, an adapter
folder given as ``--model``; and ``load_quantized`` on an adapter folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import peftlab
from peftlab.cli import main

PACKAGED = "minilm-l6, smollm2-135m"


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; assert exit status 2 and exactly one stderr line, and return it."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"peftlab {argv[0]}: error: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, minilm_dir):
    """A real saved LoRA adapter (MiniLM-L6, r=2)."""
    model, _ = peftlab.load_model("minilm-l6", kind="seq-cls")
    peftlab.wrap(model, peftlab.LoraConfig(r=2))
    return peftlab.save_adapter(model, tmp_path_factory.mktemp("adapter") / "lora")


def test_unknown_model_offline_is_one_line_naming_packaged_models(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = one_line_error(capsys, ["info", "--model", "does-not-exist"])
    assert "'does-not-exist' not found" in line and PACKAGED in line and "HF_HUB_OFFLINE" in line
    line = one_line_error(capsys, ["info", "--model", "./no/such/folder"])
    assert "no such folder" in line and PACKAGED in line


def test_unknown_model_with_unreachable_hub_fails_fast(tmp_path):
    """Online mode with no hub to reach (the reported case: ~47 s of retries, then a traceback)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))  # port 9: refused at once
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "peftlab", "info", "--model", "does-not-exist"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=40,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and proc.stdout == "", proc.stderr
    assert "'does-not-exist' not found" in lines[0] and "unreachable" in lines[0] and PACKAGED in lines[0]
    assert elapsed < 30, elapsed  # the interpreter start and imports only; no retry loop


def test_set_unknown_key_names_the_valid_keys(capsys):
    line = one_line_error(capsys, ["info", "--set", "rank=4"])
    assert "--set rank: unknown key for method 'lora'" in line
    assert "valid keys: " in line and ", r, " in line and "alpha" in line and "target_modules" in line
    line = one_line_error(capsys, ["info", "--set", "rank"])
    assert "--set expects key=value, got 'rank'" in line


def test_malformed_sweep_yaml_names_file_and_line(capsys, tmp_path):
    sweep = tmp_path / "bad.yaml"
    sweep.write_text("name: bad\nmodels: [minilm-l6\ntasks: [sst2]\n")
    line = one_line_error(capsys, ["bench", "--sweep", str(sweep)])
    assert f"{sweep}:3:" in line and "invalid YAML" in line


@pytest.mark.parametrize("command", ["export", "merge"])
def test_out_pointing_at_an_existing_file(capsys, tmp_path, adapter_dir, command):
    target = tmp_path / "taken.txt"
    target.write_text("keep me")
    line = one_line_error(
        capsys, [command, "--model", "minilm-l6", "--adapter", str(adapter_dir), "--out", str(target)]
    )
    assert f"--out {target} is an existing file; give a folder" in line
    assert target.read_text() == "keep me"


def test_adapter_folder_given_as_model(capsys, adapter_dir):
    line = one_line_error(capsys, ["info", "--model", str(adapter_dir)])
    assert "is an adapter folder" in line and "--adapter" in line


def test_cli_subprocess_exit_status_and_no_traceback(tmp_path):
    """Through the real entry point: exit status 2 and one stderr line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "peftlab", "info", "--set", "rank=4"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "valid keys" in proc.stderr


def test_load_quantized_on_an_adapter_folder(adapter_dir):
    pytest.importorskip("bitsandbytes")
    with pytest.raises(peftlab.ConfigError, match="is an adapter folder .* not a base model"):
        peftlab.load_quantized(str(adapter_dir), bits=8, device="cpu")
