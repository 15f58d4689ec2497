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
"$VENV/bin/pytest" -q -p no:cacheprovider --durations=30 "$@"
