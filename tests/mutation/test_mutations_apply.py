"""Every named mutation still applies to the code (its snippet occurs once in its function), and there are ≥ 20.

This is cheap and runs with the suite, so a refactor that moves a mutated line shows up at once. Whether each
mutation is *caught* is the mutation job itself, which ``.ci/run`` runs after the suite:
``.venv/bin/python tests/mutation/run.py`` (forks one child per mutation, runs only its target tests; see
``mutations.py``).
"""

from __future__ import annotations

import inspect
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plugin  # noqa: E402
from mutations import MUTATIONS  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def test_enough_distinct_mutations():
    assert len(MUTATIONS) >= 20
    assert len({m.name for m in MUTATIONS}) == len(MUTATIONS)


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name)
def test_mutation_applies(mutation):
    src = textwrap.dedent(inspect.getsource(plugin._function(mutation.where)))
    assert src.count(mutation.old) == 1, f"{mutation.name}: update the snippet, {mutation.where} changed"
    for target in mutation.targets:
        path, _, name = target.partition("::")
        assert (ROOT / path).is_file(), target
        name = name.split("[")[0]  # a parametrized case: its test function
        assert not name or f"def {name}(" in (ROOT / path).read_text(), f"{target}: no such test"
