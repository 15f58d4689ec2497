#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then the quick benchmark sweep
# (MiniLM-L6 on SST-2: full fine-tuning vs every PEFT method) and print where the report is.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$VENV/bin/peftlab" bench --sweep benchmarks/sweeps/quick.yaml --out "${1:-runs/quick}"
