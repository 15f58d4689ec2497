"""pytest plugin: ``--mutate NAME`` applies one named mutation (``mutations.py``) before the tests are collected.

    python tests/mutation/run.py              # every mutation, each against its target tests only
    python tests/mutation/run.py NAME ...     # some

The mutation recompiles one function's source with one snippet replaced and swaps the function's code object,
so every holder of that function (a ``from ... import``, a class, an autograd Function) runs the mutant.
"""

from __future__ import annotations

import importlib
import inspect
import textwrap

from mutations import MUTATIONS, Mutation

BY_NAME = {m.name: m for m in MUTATIONS}


def _function(where: str):
    module_name, qualname = where.split(":")
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = obj.__dict__[part] if part in getattr(obj, "__dict__", {}) else getattr(obj, part)
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    while hasattr(obj, "__wrapped__"):  # functools.wraps decorators, contextmanager
        obj = obj.__wrapped__
    return obj


def apply(mutation: Mutation) -> None:
    func = _function(mutation.where)
    src = textwrap.dedent(inspect.getsource(func))
    count = src.count(mutation.old)
    if count != 1:
        raise RuntimeError(f"mutation {mutation.name}: the snippet occurs {count} times in {mutation.where} "
                           "(the code changed: update the mutation)")  # fmt: skip
    lines = src.replace(mutation.old, mutation.new).splitlines()
    while lines[0].lstrip().startswith("@"):  # compile the bare function; its decorators stay as they are
        lines.pop(0)
    namespace: dict = {}
    code = compile("\n".join(lines) + "\n", inspect.getsourcefile(func), "exec")
    exec(code, func.__globals__, namespace)  # noqa: S102 - our own source, one snippet replaced
    func.__code__ = namespace[func.__name__].__code__


def pytest_addoption(parser):
    parser.addoption("--mutate", action="append", default=[], metavar="NAME", help="apply a named mutation")


def pytest_configure(config):
    for name in config.getoption("--mutate"):
        apply(BY_NAME[name])
