#!/usr/bin/env bash
# Run the test suite on a fresh machine: sets up .venv, then pytest (kernels in Triton's CPU interpreter).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# one direction of dependency between the package's layers (pyproject.toml's import-linter contracts)
(cd "$ROOT" && "$VENV/bin/lint-imports" --no-cache)
# the pytest entry point (not `python -m pytest`) keeps the repo root off sys.path, so the
# top-level kernels/ folder never shadows the PyPI package `kernels` that bitsandbytes imports
# one worker per core (at most 4), a test file's tests on one worker (module fixtures load once); each worker runs
# torch on cores/workers threads (tests/conftest.py)
WORKERS="${PEFTLAB_TEST_WORKERS:-$(python3 -c 'import os; print(max(1, min(4, os.cpu_count() or 1)))')}"
"$VENV/bin/pytest" -q -p no:cacheprovider --durations=30 -n "$WORKERS" --dist loadfile "$@"
