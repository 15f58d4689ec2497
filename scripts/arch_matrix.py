"""Run the method x architecture matrix (tests/contract/test_arch_matrix.py) and write its table into docs/architectures.md.

Usage: ``.venv/bin/python scripts/arch_matrix.py`` (runs every cell: a few minutes on 2 cores).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "contract"))

import test_arch_matrix as matrix  # noqa: E402

if __name__ == "__main__":
    table = matrix.render()
    if matrix.readme_section() is None:
        sys.exit(f"docs/architectures.md has no {matrix.BEGIN} ... {matrix.END} markers; add them where the table goes")
    matrix.write_readme(table)
    print(table)
