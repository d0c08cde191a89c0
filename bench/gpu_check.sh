#!/usr/bin/env bash
# Every GPU check of issue 33 in one run on a lent H100 (5-8 minutes; each step has its own
# timeout so one hang cannot eat the lease). Full logs go to $OUT (or bench/out/gpu_check); the
# summary and the tables are printed last.
#   bash bench/gpu_check.sh          # on the GPU machine
#   bash bench/gpu_check.sh --cpu    # dry run of the same steps on a CPU machine (small sizes)
# The lent machines' image has torch + triton under `python3` but not llguidance (the engine
# imports it): wheels under bench/out/wheels/ (git-ignored; carry that folder) are installed first:
#   pip download "llguidance>=1.9,<2" --no-deps --only-binary=:all: --python-version 3.12 -d bench/out/wheels
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${OUT:-bench/out/gpu_check}
mkdir -p "$LOG"
: > "$LOG/summary.txt"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
CPU=0; [ "${1:-}" = "--cpu" ] && CPU=1
if [ $CPU = 0 ] && ls bench/out/wheels/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-deps --no-index bench/out/wheels/*.whl > "$LOG/wheels.log" 2>&1 || echo "wheels: install failed (see wheels.log)"
fi

step() {   # name timeout_s command...: run, log, record rc and seconds
  local name=$1 t=$2; shift 2
  local s; s=$(date +%s)
  timeout --kill-after=10 "$t" "$@" > "$LOG/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $(( $(date +%s) - s )) s$([ $rc = 124 ] && echo ' (TIMEOUT)')" | tee -a "$LOG/summary.txt"
}

# tests that exercise CPU-only behaviour (engine on CPU, bench --small, sm_90 compile) stay out
DESELECT="not small_run and not sm90 and not never_imports and not without_triton"
if [ $CPU = 0 ]; then
  step env 30 bash -c 'nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv;
    '"$PY"' -c "import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__)"'
  step tests 120 $PY -m pytest -q -p no:cacheprovider -rs tests/kernels tests/model/test_moe_dispatch.py -k "$DESELECT"
  step layers 210 $PY bench/gpu_layers.py --out "$LOG/gpu_layers.json" --budget-s 110
  step decode 90 $PY bench/gpu_decode.py --contexts 1024,8192,32768 --steps 32
  step fp8_gemm 50 $PY bench/gpu_fp8_gemm.py
else
  step tests 600 $PY -m pytest -q -p no:cacheprovider -rs tests/kernels/test_paged.py tests/kernels/test_graphs.py -k "$DESELECT"
  step layers 120 $PY bench/gpu_layers.py --small --out "$LOG/gpu_layers.json"
  step decode 300 $PY bench/gpu_decode.py --device cpu --contexts 256 --steps 2
fi

echo; echo "=== summary ($LOG)"; cat "$LOG/summary.txt"
echo; echo "=== tests"; tail -n 25 "$LOG/tests.log"
if [ -f "$LOG/fp8_gemm.log" ]; then
  echo; echo "=== FP8 GEMM (M = 1 and 4096; full table in fp8_gemm.log)"
  grep -E "^\| (weight|---)|^\| [^|]+ \| (1|4096) \|" "$LOG/fp8_gemm.log" | grep -v "bf16 weight" | tail -n 45
fi
echo; echo "=== decode (common benchmark model)"; tail -n 8 "$LOG/decode.log"
echo; echo "=== layers"; sed -n '/^Per layer:/,$p' "$LOG/layers.log" | head -n 40
grep -m1 "^built" "$LOG/layers.log"
