#!/usr/bin/env bash
# On a GPU machine with the dependencies present (the lent device machines): install the package offline, run the
# GPU tests and the decode and prefill benchmarks, as the arguments ask, in order.
# Logs and result JSONs go to $OUT (default ./gpu-out). BENCH_COMMIT names the commit when .git did not travel.
#
#     bash scripts/gpu_check.sh [tests] [decode MODELS CASES] [prefill SECTIONS] [speculative MODELS] ...
#     e.g. bash scripts/gpu_check.sh tests decode qwen3_5-9b,qwen3_vl-8b 1x1024,8x1024,32x1024,64x1024 prefill text
# BENCH_ARGS adds options to every benchmark (e.g. "--hf 1x1024,8x1024", or "--tiny" to check this script on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
# Compiled programs persist across calls on a machine that stays warm.
export JAX_COMPILATION_CACHE_DIR=/tmp/jax-cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
python -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,power.limit,memory.used --format=csv | tee "$OUT/gpu.csv"

status=0
while [ $# -gt 0 ]; do
  case "$1" in
    tests)
      python -m pytest -q tests/gpu 2>&1 | tee "$OUT/tests_gpu.log"
      status=$((status | PIPESTATUS[0])); shift ;;
    decode)
      [ $# -ge 3 ] || { echo "decode needs MODELS and CASES" >&2; exit 2; }
      # shellcheck disable=SC2086
      python bench/decode.py --models "$2" --cases "$3" --e2e --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee -a "$OUT/decode.log"
      status=$((status | PIPESTATUS[0])); shift 3 ;;
    prefill)
      [ $# -ge 2 ] || { echo "prefill needs SECTIONS (text,image,vision,batch)" >&2; exit 2; }
      # shellcheck disable=SC2086
      python bench/prefill.py --sections "$2" --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee -a "$OUT/prefill.log"
      status=$((status | PIPESTATUS[0])); shift 2 ;;
    speculative)
      [ $# -ge 2 ] || { echo "speculative needs MODELS (qwen3_5-9b,qwen3_5-35b-a3b)" >&2; exit 2; }
      # shellcheck disable=SC2086
      python bench/speculative.py --models "$2" --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee -a "$OUT/speculative.log"
      status=$((status | PIPESTATUS[0])); shift 2 ;;
    *) echo "unknown step $1 (tests | decode MODELS CASES | prefill SECTIONS | speculative MODELS)" >&2; exit 2 ;;
  esac
done
exit $status
