"""The CLI explains itself: one set of method names, help on every option, --version, failed runs print why."""

from __future__ import annotations

import argparse

import pytest

import peftlab
from peftlab.bench.providers import PROVIDERS
from peftlab.cli import build_parser, main
from peftlab.finetune import METHODS


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"peftlab {peftlab.__version__}"


def test_every_option_of_every_command_has_help():
    missing = [
        f"{name} {'/'.join(a.option_strings)}"
        for name, p in subparsers(build_parser()).items()
        for a in p._actions
        if a.option_strings and a.help in (None, "") and not isinstance(a, argparse._HelpAction)
    ]
    assert missing == []


def test_one_set_of_method_names():
    """train's names are bench's and info's (info: every one but full), and bench's help lists them all."""
    commands = subparsers(build_parser())
    assert set(METHODS) <= set(PROVIDERS)
    info_method = next(a for a in commands["info"]._actions if "--method" in a.option_strings)
    assert list(info_method.choices) == [m for m in METHODS if m != "full"]
    help_text = commands["bench"].format_help()
    assert all(m in help_text for m in PROVIDERS)


def test_info_houlsby_is_the_adapter_with_houlsby_style(capsys):
    assert main(["info", "--method", "houlsby"]) == 0
    out = capsys.readouterr().out
    assert '"style": "houlsby"' in out and "method: adapter" in out


def test_a_failed_bench_run_prints_its_error(tmp_path, capsys, monkeypatch):
    from peftlab.bench import runner

    monkeypatch.setattr(
        runner,
        "run_in_subprocess",
        lambda spec, work, timeout: {**spec, "status": "failed", "error": "ValueError: boom"},
    )
    assert main(["bench", "--methods", "lora", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    out = capsys.readouterr().out
    assert (
        "failed: lora on sst2 (minilm-l6, seed 0): ValueError: boom" in out and "0 of 1 runs succeeded" in out
    )
