#!/usr/bin/env bash
# Every GPU test and benchmark, on a GPU box (no internet needed); ~11 min on an H200, so two calls (--only):
#   0. scale (issue 32), FIRST, before anything else touches the device: benchmarks/scale.py builds Llama-3.1-8B
#      and Llama-3.2-1B with random weights on the device and writes scale.json / scale.md into DIR: train steps
#      (floor, LoRA, DoRA, QLoRA; peftlab vs HF PEFT, 2048 tokens), one LoRA linear, 16-adapter decode. Two
#      parts, one device call each (≤ 8 min: ~6.5 min of scale + ~40 s of this script), --scale-part 1|2:
#        PYTHONPATH=$PWD/.gpu_carry bash benchmarks/gpu.sh --only scale --scale-part 1 --out "$OUT/gpu1"
#        PYTHONPATH=$PWD/.gpu_carry bash benchmarks/gpu.sh --only scale,dora-norm --scale-part 2 --out "$OUT/gpu2"
#      then here `python benchmarks/scale.py --merge DIR1 DIR2 --out benchmarks/results/gpu/<date>_<device>`
#      (benchmarks/README.md; the same --out on a still-warm box: part 2 keeps part 1's rows by itself)
#   0b. dora-norm: the fused DoRA norm kernel's tests on CUDA and its microbenchmark (benchmarks/kernels/dora_norm.py)
#   1. pytest tests/kernels on CUDA (bf16 included; no TRITON_INTERPRET), then the layer (fused path with dropout),
#      mixed-batch, variant and quant test files
#   2. benchmarks/kernels/lora_linear.py --dtype bf16 (8192 tokens 4096x4096 r=16 and the 135M-8B shapes)
#   3. benchmarks/efficiency.py on CUDA, SmolLM2-135M, bf16 base, torch.cuda.max_memory_allocated; then
#      QLoRA (when bitsandbytes imports) and DoRA, each against the same method in HF PEFT; a profiled
#      DoRA / LoRA step (benchmarks/profile_step.py: device time per bucket, host time, wall time)
#   4. benchmarks/kernels/profile_lora_linear.py (torch.profiler tables: where each provider's time goes)
#   5. benchmarks/multi_adapter.py, when that file exists
#   6. train-many (issue 34): benchmarks/train_many_gpu.py, 8 LoRA jobs at Llama-3.2-1B shapes trained packed in one
#      pass (per-row adapters: Triton SGMV forward + backward) vs the torch bmm path vs one after another (~3 min;
#      its own call: --only train-many)
# Everything goes to benchmarks/results/gpu/<date>_<device>/ (or --out DIR), with the device name and
# date in every file and a summary.md written at the end. A failing step is logged and the script
# goes on; the exit status is the number of failed steps.
#
#   bash benchmarks/gpu.sh [--out DIR] [--tar FILE] [--only STEP,STEP] [--scale-part 1|2|all]  # on the GPU box
#   bash benchmarks/gpu.sh --dry-run [--out DIR]   # CPU, toy sizes, kernels in Triton's interpreter (CI)
#
# --tar FILE: also pack DIR into one .tgz (a lent device returns only a few files per call: write DIR
# outside $OUT, e.g. --out /tmp/gpu --tar "$OUT/gpu.tgz", and copy summary.md beside it).
#
# Python: $PEFTLAB_PY, else $PEFTLAB_VENV/bin/python, else ./.venv/bin/python, else python3; it needs
# torch, triton, transformers, peft (bitsandbytes optional) and peftlab importable (pip install -e .).
# Models: SmolLM2-135M through peftlab.resolve_model_path("smollm2-135m"), i.e. the safetensors copy in
# $PEFTLAB_CACHE/smollm2-135m (default ~/.cache/peftlab): carry that folder to the box and set PEFTLAB_CACHE.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DRY=0
OUT=""
TAR=""
ONLY=""
SCALE_PART=all
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --scale-part) SCALE_PART="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --tar) TAR="$2"; shift ;;
    --only) ONLY=",$2,"; shift ;;
    -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown argument $1 (valid: --dry-run, --out DIR, --tar FILE, --only STEP,STEP, --scale-part 1|2|all)" >&2; exit 2 ;;
  esac
  shift
done
case "$SCALE_PART" in 1|2|all) ;; *) echo "gpu.sh: --scale-part must be 1, 2 or all, got '$SCALE_PART'" >&2; exit 2 ;; esac

STEPS="scale dora-norm kernel-tests kernel-bench kernel-profile efficiency efficiency-variants step-profile multi-adapter train-many"
for name in $(echo "$ONLY" | tr ',' ' '); do
  [[ " $STEPS " == *" $name "* ]] || { echo "gpu.sh: unknown step '$name' in --only (valid: ${STEPS// /, })" >&2; exit 2; }
done

if [ -n "${PEFTLAB_PY:-}" ]; then PY="$PEFTLAB_PY"
elif [ -n "${PEFTLAB_VENV:-}" ] && [ -x "$PEFTLAB_VENV/bin/python" ]; then PY="$PEFTLAB_VENV/bin/python"
elif [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"
else PY="$(command -v python3)"; fi
BIN="$(dirname "$PY")"
PYTEST="$BIN/pytest"
[ -x "$PYTEST" ] || PYTEST="$PY -m pytest"  # last resort; the entry point keeps the repo root off sys.path

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false HF_DATASETS_OFFLINE=1
export TRITON_DEFAULT_FP_FUSION=1
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
else
  unset TRITON_INTERPRET
fi

DATE="$(date -u +%Y-%m-%d)"
STAMP="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
DEVICE="$("$PY" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")' 2>/dev/null || echo unknown)"
SLUG="$(echo "$DEVICE" | tr -c 'A-Za-z0-9.-' '-' | tr -s '-' | sed 's/-$//')"
if [ -z "$OUT" ]; then
  OUT="$ROOT/benchmarks/results/gpu/${DATE}_${SLUG}$([ "$DRY" = 1 ] && echo _dry-run)"
fi
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
STEPS_FILE="$OUT/.steps"
: > "$STEPS_FILE"
FAILED=0
T0=$(date +%s)

if [ "$DRY" = 0 ] && [ "$DEVICE" = "cpu" ]; then
  echo "gpu.sh: no CUDA device visible to $PY; use --dry-run on a CPU" >&2
fi

# cap SECONDS: the step's time limit on the GPU; a dry run (slow shared CPUs) gets 600 s per step
cap() { if [ "$DRY" = 1 ]; then echo 600; else echo "$1"; fi; }

# step NAME TIMEOUT_S CMD...: run, log to $OUT/NAME.log, record status and seconds, never abort
step() {
  local name="$1" limit="$2"; shift 2
  if [ -n "$ONLY" ] && [ "$name" != environment ] && [[ "$ONLY" != *",$name,"* ]]; then
    echo "| $name | skipped (--only) | 0 | – |" >> "$STEPS_FILE"; return 0
  fi
  local log="$OUT/$name.log" start rc cmd="$*"
  start=$(date +%s)
  echo "== $name: ${cmd:0:200}" | tee "$log"
  timeout --kill-after=20 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  local secs=$(( $(date +%s) - start ))
  local status="ok"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="TIMEOUT after ${limit}s"; elif [ $rc -ne 0 ]; then status="FAILED (exit $rc)"; fi
  [ "$status" = ok ] || FAILED=$((FAILED + 1))
  echo "| $name | $status | $secs | \`$name.log\` |" >> "$STEPS_FILE"
  echo "== $name: $status in ${secs}s (log: $log)"
  [ "$status" = ok ] || tail -n 25 "$log"
}

# peftlab must be importable with its kernels (an editable install maps kernels/ to peftlab.kernels)
if ! "$PY" -c "import peftlab.kernels" >/dev/null 2>&1; then
  echo "peftlab not importable from $PY: pip install --no-deps --no-build-isolation -e $ROOT (offline)"
  "$PY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" > "$OUT/pip-install.log" 2>&1 \
    || echo "  failed (see $OUT/pip-install.log); the steps below will say why"
fi

# 0. environment. Caps from the H200 runs of 2026-11-26: every benchmark process costs 22-26 s there
#    (imports, CUDA start, model load), so the steps after scale/dora-norm need ~11 min, more than one call
#    (10 min): run two more after the two scale calls (header),
#      --only kernel-tests,kernel-bench,kernel-profile,efficiency     (30 + 240 + 60 + 40 + 160 s = 8.8 min)
#      --only efficiency-variants,step-profile,multi-adapter           (30 + 120 + 120 + 150 s = 7 min)
step environment "$(cap 30)" "$PY" -c '
import platform, torch, sys
print("python", sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
for mod in ("triton", "transformers", "peft", "bitsandbytes", "peftlab"):
    try:
        m = __import__(mod); print(mod, getattr(m, "__version__", "?"))
    except Exception as exc: print(mod, "NOT importable:", exc)
import peftlab
try:
    print("smollm2-135m ->", peftlab.resolve_model_path("smollm2-135m") if len(sys.argv) < 2 else "skipped (dry run)")
except Exception as exc:
    print("smollm2-135m not here (the efficiency steps use its shapes with random weights):", exc)
' $([ "$DRY" = 1 ] && echo dry)
command -v nvidia-smi >/dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

# 0. scale (issue 32): first, on a device nothing else has touched yet. One part fits one call: the scale.py
#    budget (380 s for part 1, 350 for part 2) bounds it, rows that do not fit are skipped and listed; the
#    step's cap (50 s more) is a last resort.
if [ "$DRY" = 1 ]; then
  step scale "$(cap 300)" "$PY" benchmarks/scale.py --dry-run --out "$OUT"
else
  # part 2 leaves ~75 s of its call to dora-norm: ~40 s start-up + 350 + 75 < 8 min even when every cap is hit
  case "$SCALE_PART" in all) SCALE_BUDGET=800; SCALE_CAP=850 ;; 1) SCALE_BUDGET=380; SCALE_CAP=430 ;; 2) SCALE_BUDGET=350; SCALE_CAP=400 ;; esac
  step scale "$SCALE_CAP" "$PY" benchmarks/scale.py --part "$SCALE_PART" --budget "$SCALE_BUDGET" --out "$OUT"
fi

# 0b. the fused DoRA norm kernel: its tests on the device (bf16 tensor cores), then fused vs unfused timings
#     (the benchmark runs even when a test fails; the step fails if either does)
if [ "$DRY" = 1 ]; then DORA_ENV=""; DORA_BENCH="--dry-run"; else DORA_ENV="PEFTLAB_AUTOTUNE=0"; DORA_BENCH=""; fi
step dora-norm "$(cap 75)" bash -c "$DORA_ENV $PYTEST -q -p no:cacheprovider -rs tests/kernels/test_dora_norm.py; t=\$?; \
  '$PY' benchmarks/kernels/dora_norm.py $DORA_BENCH --out '$OUT/dora-norm'; b=\$?; exit \$(( t != 0 || b != 0 ))"

# 1. kernel tests (bf16 runs on CUDA; the dry run takes a fast subset in the interpreter)
if [ "$DRY" = 1 ]; then
  step kernel-tests "$(cap 300)" $PYTEST -q -p no:cacheprovider -x \
    "tests/kernels/test_lora_kernels.py::test_launcher_checks" \
    "tests/kernels/test_fallback.py::test_autotune_key_buckets_tokens" \
    --junitxml="$OUT/kernel-tests.xml"
else
  # the kernels, then the files that reach them through the layer (the fused path with dropout), the mixed batch,
  # the variants and the quantized bases, on CUDA (issue 35)
  step kernel-tests "$(cap 240)" $PYTEST -q -p no:cacheprovider -rs tests/kernels \
    tests/methods/lora/test_fused_layer_dropout.py tests/methods/lora/test_lora.py \
    tests/serving/test_mixed_batch.py tests/methods/lora/test_lora_variants.py \
    tests/backends/test_quant.py tests/backends/test_quant_backends.py --junitxml="$OUT/kernel-tests.xml"
fi

# 2. kernel benchmark: base / HF PEFT / peftlab triton / peftlab torch, fwd+bwd
if [ "$DRY" = 1 ]; then
  step kernel-bench "$(cap 300)" "$PY" benchmarks/kernels/lora_linear.py --dry-run --out "$OUT/kernels"
else
  step kernel-bench "$(cap 60)" "$PY" benchmarks/kernels/lora_linear.py --dtype bf16 --out "$OUT/kernels"
  step kernel-profile "$(cap 40)" "$PY" benchmarks/kernels/profile_lora_linear.py --out "$OUT/profile"
fi

# 3. training-step efficiency on CUDA (max_memory_allocated), interleaved rounds
if [ "$DRY" = 1 ]; then
  step efficiency "$(cap 300)" "$PY" benchmarks/efficiency.py --model llama-tiny --device cpu --rounds 1 --steps 1 \
    --configs floor-r0 hf-peft-lora peftlab-lora --no-exact-memory --out "$OUT/efficiency"
else
  # the packaged SmolLM2 if it resolves here, else its shapes with random weights (same time and memory)
  EFF_MODEL=smollm2-135m
  "$PY" -c 'import peftlab; peftlab.resolve_model_path("smollm2-135m")' >/dev/null 2>&1 || EFF_MODEL=smollm2-135m-random
  echo "efficiency model: $EFF_MODEL" > "$OUT/efficiency-model.txt"
  step efficiency "$(cap 160)" "$PY" benchmarks/efficiency.py --model "$EFF_MODEL" --device cuda --dtype bf16 \
    --rounds 2 --steps 10 --configs floor-r0 hf-peft-lora peftlab-lora \
    --timeout 40 --out "$OUT/efficiency"
fi

# 3b. QLoRA and DoRA against the same method in HF PEFT (one round; QLoRA rows need bitsandbytes with a CUDA
#     library: a lent box has none, so carry one and put it on PYTHONPATH)
if [ "$DRY" = 1 ]; then
  step efficiency-variants "$(cap 300)" "$PY" benchmarks/efficiency.py --model llama-tiny --device cpu --rounds 1 \
    --steps 1 --configs peftlab-qlora hf-peft-qlora peftlab-dora hf-peft-dora --no-exact-memory --out "$OUT/efficiency-variants"
else
  VARIANTS="peftlab-dora hf-peft-dora"
  "$PY" -c 'import bitsandbytes' >/dev/null 2>&1 && VARIANTS="peftlab-qlora hf-peft-qlora $VARIANTS"
  step efficiency-variants "$(cap 120)" "$PY" benchmarks/efficiency.py --model "$EFF_MODEL" --device cuda --dtype bf16 \
    --rounds 1 --steps 10 --configs $VARIANTS --timeout 40 --out "$OUT/efficiency-variants"
fi

# 3c. where a DoRA and a LoRA step's time goes on the GPU (device time per bucket, host time, wall time):
#     DoRA measured 1.35x HF PEFT's step time on the H200 (2026-11-26) while LoRA was 0.79x
if [ "$DRY" = 1 ]; then
  step step-profile "$(cap 300)" "$PY" benchmarks/profile_step.py --model llama-tiny --steps 1 \
    --configs floor-r0 peftlab-dora hf-peft-dora --out "$OUT/step-profile"
else
  step step-profile "$(cap 120)" "$PY" benchmarks/profile_step.py --model "$EFF_MODEL" --device cuda --dtype bf16 \
    --steps 3 --configs floor-r0 peftlab-lora peftlab-dora hf-peft-dora --out "$OUT/step-profile"
fi

# 4. multi-adapter benchmark (added by another issue): run when present
if [ -f benchmarks/multi_adapter.py ]; then
  if [ "$DRY" = 1 ]; then
    step multi-adapter "$(cap 120)" "$PY" benchmarks/multi_adapter.py --out "$OUT/multi_adapter" --dry-run
  else  # the headline case only (batch 32, 16 adapters): the full grid needs > 2 min
    step multi-adapter "$(cap 150)" "$PY" benchmarks/multi_adapter.py --out "$OUT/multi_adapter" --batches 32 --adapters 16 \
      --providers base peftlab hf-peft loop --repeats 1
  fi
else
  echo "| multi-adapter | skipped: benchmarks/multi_adapter.py not present | 0 | – |" >> "$STEPS_FILE"
fi

# 6. packed per-row training (issue 34): tokens/s and peak memory of 8 jobs packed (kernels, then torch) vs one
#    after another; the script also checks the kernels' gradients against the torch path's (exit 1 if they differ)
if [ "$DRY" = 1 ]; then
  step train-many "$(cap 300)" "$PY" benchmarks/train_many_gpu.py --dry-run --out "$OUT/train-many"
else
  step train-many "$(cap 180)" "$PY" benchmarks/train_many_gpu.py --out "$OUT/train-many"
fi

TOTAL=$(( $(date +%s) - T0 ))
{
  echo "# GPU run: $DEVICE, $STAMP$([ "$DRY" = 1 ] && echo ' (DRY RUN: CPU, toy sizes, Triton interpreter; no GPU numbers)')"
  echo
  echo "\`bash benchmarks/gpu.sh$([ "$DRY" = 1 ] && echo ' --dry-run')\` at commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), python \`$PY\`, ${TOTAL}s in all, $FAILED step(s) failed."
  echo
  echo "| step | status | seconds | log |"
  echo "|---|---|---|---|"
  cat "$STEPS_FILE"
  for md in "$OUT"/scale.md "$OUT"/dora-norm/dora_norm_*.md "$OUT"/kernels/lora_linear_*.md "$OUT"/efficiency/efficiency.md "$OUT"/efficiency-variants/efficiency.md "$OUT"/step-profile/profile.md "$OUT"/multi_adapter/*.md "$OUT"/train-many/train_many_gpu.md; do
    [ -f "$md" ] || continue
    echo
    echo "## ${md#$OUT/}"
    echo
    sed 's/^# /### /' "$md"
  done
} > "$SUMMARY"
rm -f "$STEPS_FILE"
echo "wrote $SUMMARY ($FAILED failed step(s), ${TOTAL}s)"
if [ -n "$TAR" ]; then
  tar czf "$TAR" -C "$(dirname "$OUT")" "$(basename "$OUT")" && echo "packed $OUT into $TAR"
fi
exit "$FAILED"
