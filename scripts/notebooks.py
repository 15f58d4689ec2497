"""Run the notebooks top to bottom and save them with their outputs (the committed ones have none).

    python scripts/notebooks.py                       # every notebooks/*.ipynb -> runs/notebooks/<name>.ipynb
    python scripts/notebooks.py quickstart.ipynb --out /tmp/nb
    python scripts/notebooks.py results.ipynb --results runs/quick   # plots of another sweep's results.jsonl

Each notebook runs in a fresh ``python3`` kernel with ``notebooks/`` as its working directory (nbclient, the
engine of ``jupyter nbconvert --execute``; needs ``pip install nbclient nbformat ipykernel``). The executed copy
is written to a temporary file and renamed; the files in ``notebooks/`` are never changed. CI runs the same
function (``tests/bench/test_notebooks.py``). Exit status 1 names the notebook and cell that failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute(path: Path, env: dict | None = None, timeout: int = 600):
    """Run the notebook at ``path`` (cwd: its folder) with ``env`` added to the environment; the executed
    notebook (nbformat node, outputs filled in)."""
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    old = dict(os.environ)
    os.environ.update(env or {})
    try:
        nbclient.NotebookClient(
            nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
        ).execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    return nb


def save(nb, target: Path) -> Path:
    """Write ``nb`` to ``target`` through a temporary file and a rename."""
    import nbformat

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        nbformat.write(nb, f)
    os.replace(tmp, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebook file names in notebooks/ (default: all)")
    parser.add_argument("--out", default="runs/notebooks", help="folder for the executed copies (default: %(default)s)")
    parser.add_argument("--results", help="results.ipynb: the sweep folder to read (default: benchmarks/results/quick)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell (default: %(default)s)")
    args = parser.parse_args(argv)
    available = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    unknown = [n for n in args.names if n not in available]
    if unknown:
        print(f"notebooks: error: no notebook {', '.join(unknown)}; available: {', '.join(available)}", file=sys.stderr)
        return 2
    env = {"PEFTLAB_RESULTS": str(Path(args.results).resolve())} if args.results else {}
    for name in args.names or available:
        print(f"running {name} ...", flush=True)
        try:
            nb = execute(NOTEBOOKS / name, env, args.timeout)
        except Exception as exc:  # noqa: BLE001 - nbclient's CellExecutionError names the cell and error
            print(f"notebooks: {name} failed: {' '.join(str(exc).split())[:2000]}", file=sys.stderr)
            return 1
        print(f"  -> {save(nb, Path(args.out) / name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
