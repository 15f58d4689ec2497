"""Mutation check: every named mutation must make one of its target tests fail.

    .venv/bin/python tests/mutation/run.py [NAME ...] [--list] [--jobs=N]   (N children at once, default 2)

torch, transformers and peftlab are imported once; each mutation then runs in a forked child
(``pytest -x`` on its target tests only, with the plugin's ``--mutate NAME``), so a mutation costs its tests,
not an interpreter start. Exit 1 when a mutation survives (or a known-gap mutation is caught: update its entry),
or when a mutation no longer applies to the code.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import plugin  # noqa: E402
from mutations import MUTATIONS  # noqa: E402


def start(mutation) -> int:
    """Fork a child that runs pytest on the mutation's targets; its exit code is pytest's (1: caught, 0: survived)."""
    pid = os.fork()
    if pid == 0:  # child
        import pytest

        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            code = pytest.main([*mutation.targets, "-x", "-q", "-p", "no:cacheprovider", "--mutate", mutation.name],
                               plugins=[plugin])  # fmt: skip
        except BaseException as exc:  # noqa: BLE001 - report, never fall back into the parent's loop
            print(f"{mutation.name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            code = 3
        os._exit(int(code))
    return pid


def main(argv: list[str]) -> int:
    if "--list" in argv:
        for m in MUTATIONS:
            print(f"{m.name:32s} {m.where}  ->  {', '.join(m.targets)}")
        return 0
    names = [a for a in argv if not a.startswith("--")]
    chosen = [m for m in MUTATIONS if not names or m.name in names]
    os.chdir(ROOT)
    os.environ.setdefault("PEFTLAB_AUTOTUNE", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import peftlab  # noqa: F401  - imported once, shared by every forked child
    import torch  # noqa: F401
    import transformers  # noqa: F401

    jobs = 2
    for a in argv:
        if a.startswith("--jobs="):
            jobs = int(a.split("=", 1)[1])
    bad, t_start, queue, running = [], time.time(), list(chosen), {}
    while queue or running:
        while queue and len(running) < jobs:
            m = queue.pop(0)
            running[start(m)] = (m, time.time())
        pid, status = os.wait()
        m, t0 = running.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        caught = code == 1
        if code not in (0, 1):
            verdict, ok = f"ERROR (pytest exit {code}: the mutation does not apply or the tests error)", False
        elif m.survives:
            verdict, ok = ("survives, as known: " + m.survives, True) if not caught else (
                "CAUGHT: the known gap is closed, remove `survives`", False)
        else:
            verdict, ok = ("caught", True) if caught else ("SURVIVED", False)
        print(f"{'ok ' if ok else 'BAD'} {m.name:32s} {verdict}  ({time.time() - t0:.0f} s)", flush=True)
        if not ok:
            bad.append(m.name)
    print(f"{len(chosen) - len(bad)} of {len(chosen)} mutations as expected in {time.time() - t_start:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
