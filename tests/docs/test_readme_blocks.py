"""Every fenced ```python and ```bash / ```sh block of README.md runs, as a reader would run it.

Each block runs in a fresh subprocess in its own empty temporary folder (python blocks with this interpreter,
shell blocks with ``bash -eo pipefail`` and this environment's ``bin/`` first on PATH, so ``python`` and
``peftlab`` are the installed ones), offline. A block may be skipped only when an HTML comment right before its
fence says why, and only for a GPU, the network, or a block that is itself a CI command:

    <!-- skip-ci: needs a GPU -->

Blocks that call ``peftlab train`` are expected to fail (xfail, not strict) only while that command is absent
from the installed peftlab; once it is there they must pass.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
RUN = {"python", "bash", "sh"}
SKIP = re.compile(r"<!--\s*skip-ci:\s*(?P<reason>.+?)\s*-->")
#: the only reasons a block may be skipped for (issue 31: a GPU or network; the two CI commands themselves)
ALLOWED_SKIP = re.compile(r"GPU|network|runs in CI as the test/benchmark command itself", re.IGNORECASE)
TIMEOUT_S = 240


def blocks(text: str) -> list[dict]:
    """Fenced blocks: language, code, first line number, skip reason (from the comment right before the fence)."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        skip = SKIP.search(prev)
        out.append({
            "lang": lang, "code": "\n".join(lines[start + 1 : j]) + "\n", "line": start + 1,
            "skip": skip["reason"] if skip else None,
        })  # fmt: skip
        i = j + 1
    return out


ALL = blocks(README.read_text())
RUNNABLE = [b for b in ALL if b["lang"] in RUN]


@cache
def has_train_command() -> bool:
    """Whether the installed peftlab has the ``train`` sub-command (merged by the lead)."""
    try:
        r = subprocess.run([sys.executable, "-m", "peftlab", "train", "--help"], capture_output=True, timeout=120,
                           cwd=os.path.expanduser("~") if os.path.isdir(os.path.expanduser("~")) else "/")  # fmt: skip
    except subprocess.TimeoutExpired:
        return False
    return r.returncode == 0


def _env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PEFTLAB_AUTOTUNE="0")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.pop("PYTHONPATH", None)  # as a reader's shell: the repository root is not on the path
    return env


def _id(block: dict) -> str:
    return f"{block['lang']}-line{block['line']}"


def test_readme_has_runnable_blocks():
    assert len(RUNNABLE) >= 5, [_id(b) for b in RUNNABLE]
    assert [b for b in RUNNABLE if not b["skip"]], "every block is skipped"


@pytest.mark.parametrize("block", [b for b in ALL if b["skip"]], ids=_id)
def test_skip_reasons_are_allowed(block):
    assert block["lang"] in RUN, f"line {block['line']}: a skip marker on a block that would not run anyway"
    assert ALLOWED_SKIP.search(block["skip"]), (
        f"README.md line {block['line']}: a block may skip CI only for a GPU, the network, or being a CI command "
        f"itself, not {block['skip']!r}"
    )


def _command(block: dict, folder: Path) -> list[str]:
    if block["lang"] == "python":
        script, cmd = folder / "block.py", [sys.executable]
    else:
        script, cmd = folder / "block.sh", ["bash", "-eo", "pipefail"]
    script.write_text(block["code"])
    (folder / "cwd").mkdir()
    return [*cmd, str(script)]


def _expected_to_run(block: dict) -> bool:
    return not block["skip"] and not (re.search(r"\bpeftlab train\b", block["code"]) and not has_train_command())


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """Start every block that is expected to run at once (one torch thread each), so the file's wall time is
    that of the slowest block rather than of their sum; each test then waits for its own block."""
    procs = {}
    for block in RUNNABLE:
        if _expected_to_run(block):
            folder = tmp_path_factory.mktemp(_id(block))
            env = {**_env(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            procs[_id(block)] = subprocess.Popen(
                _command(block, folder), cwd=folder / "cwd", env=env, text=True,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("block", RUNNABLE, ids=_id)
def test_readme_block_runs(block, started):
    if block["skip"]:
        pytest.skip(f"README.md line {block['line']}: {block['skip']}")
    if not _expected_to_run(block):
        pytest.xfail("needs peftlab train, merged by the lead")
    proc = started[_id(block)]
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"README.md line {block['line']}: still running after {TIMEOUT_S} s\n{out[-2000:]}\n{err[-2000:]}")
    assert proc.returncode == 0, (
        f"README.md line {block['line']} ({block['lang']}) failed with {proc.returncode}:\n"
        f"--- stdout ---\n{out[-4000:]}\n--- stderr ---\n{err[-4000:]}"
    )
