#!/usr/bin/env bash
# Builds the CUDA backend, runs the GPU tests, compute-sanitizer (memcheck and
# racecheck on the small tests), the benchmark and the BF16 peers, in one call.
# Writes logs and tables under $OUT (default ./out):
#   build.log  test_gpu.log  sanitizer.log  python.log  bench.jsonl  peers.jsonl  tables.md
# STEPS selects steps (default "build test sanitize python bench peers"; also
# "runner": the GPU model runner against the CPU runner, needs RUNNER_MODEL and
# RUNNER_TEXT, e.g. from scripts/make-small-gguf.py, and RUNNER_QWEN3, a
# Qwen3-architecture GGUF from scripts/make-qwen3-gguf.py; "e2e": oscar bench-e2e).
# The test step runs test_gpu, test_kernels, test_engine_gpu, test_kv_bf16 and
# test_tp_nccl (two GPUs: run on the nvidia-h200-x2 kind; it skips, exit 77, with one).
# OSCAR_BENCH_ONLY (e.g. "decode" or "append") narrows the benchmark.
# "hfbench" (not in the default): python/bench/bench_hf.py, transformers decode
# steps, BF16 StaticCache against OscarHFCache, both compiled (bench_hf.json).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
BUILD=${BUILD:-build-gpu}
STEPS=${STEPS:-"build test sanitize python bench peers"}
mkdir -p "$OUT"
rc=0
has() { case " $STEPS " in *" $1 "*) return 0 ;; esac; return 1; }
t0=$(date +%s)
stamp() { echo "[gpu-check $(( $(date +%s) - t0 ))s] $*"; }

if has build; then
  stamp build
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
    nvcc --version | tail -2
    cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DOSCAR_NATIVE=OFF &&
      cmake --build "$BUILD" -j "$(nproc)"
  } > "$OUT/build.log" 2>&1 || { echo "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }
  grep -E "warning|error" "$OUT/build.log" | grep -v "^--" | head -20
fi

# A test passes with 0 and skips with 77 (said so in its output).
run_test() {
  local name=$1; shift
  [ -x "$BUILD/tests/gpu/$name" ] || { echo "$name: not built"; return 0; }
  timeout "${TEST_TIMEOUT:-300}" "$BUILD/tests/gpu/$name" "$@" 2>&1 | tee -a "$OUT/test_gpu.log" | grep -Ev "^  .* ok$"
  local r=${PIPESTATUS[0]}
  if [ $r -eq 77 ]; then echo "$name: SKIPPED"; elif [ $r -ne 0 ]; then echo "$name: FAILED (rc=$r)"; rc=1; fi
}

if has test; then
  stamp test
  : > "$OUT/test_gpu.log"
  run_test test_gpu
  run_test test_kernels
  run_test test_engine_gpu
  run_test test_kv_bf16
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 run_test test_tp_nccl
fi

if has sanitize; then
  stamp sanitize
  {
    # racecheck is slow on the 40 graph replays: the engine test's other
    # parts run the same kernels (build_tasks, row_sumsq, window, merge)
    for run in "test_gpu --small" "test_kernels --small" "test_engine_gpu --small" "test_kv_bf16 --small"; do
      [ -x "$BUILD/tests/gpu/${run%% *}" ] || continue
      echo "== memcheck $run"; timeout "${SAN_TIMEOUT:-150}" compute-sanitizer --tool memcheck --leak-check no $BUILD/tests/gpu/$run
      echo "memcheck ${run%% *} rc=$?"
    done
    # test_gpu in three parts (racecheck runs test_widths --small alone for ~2 minutes)
    for run in "test_gpu --small --basic" "test_gpu --small --sinks" "test_gpu --small --widths" "test_kernels --small" \
               "test_engine_gpu --small --only nosync,noalloc,prefill,nonfinite,badmeta" \
               "test_kv_bf16 --small"; do
      [ -x "$BUILD/tests/gpu/${run%% *}" ] || continue
      echo "== racecheck $run"; timeout "${SAN_TIMEOUT:-240}" compute-sanitizer --tool racecheck $BUILD/tests/gpu/$run
      echo "racecheck ${run%% *} rc=$?"
    done
  } > "$OUT/sanitizer.log" 2>&1
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|rc=|passed|failed" "$OUT/sanitizer.log"
fi

if has python; then
  # The Python binding's GPU tests: torch CUDA tensors, the HF cache on the CUDA backend,
  # compiled and CUDA-graph decode steps, and (two GPUs) tensor parallelism via torchrun.
  stamp python
  set -o pipefail
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
  OSCAR_LIBRARY="$PWD/$BUILD/liboscar.so" PYTHONDONTWRITEBYTECODE=1 timeout "${PY_TIMEOUT:-900}" \
    python3 -m pytest -q -rs -p no:cacheprovider python/tests -k gpu 2>&1 | tee "$OUT/python.log" | tail -15 || rc=1
  set +o pipefail
fi

if has hfbench; then
  stamp hfbench
  OSCAR_LIBRARY="$PWD/$BUILD/liboscar.so" PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" \
    PYTHONUNBUFFERED=1 timeout "${HFBENCH_TIMEOUT:-1800}" \
    python3 python/bench/bench_hf.py --out "$OUT/bench_hf.json" || rc=1
fi

if has runner; then
  stamp runner
  bash tests/gpu/check_runner.sh "$BUILD/oscar" "${RUNNER_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}" \
    "${RUNNER_TEXT:-models/debian-policy.txt}" "$OUT/runner" "${RUNNER_QWEN3:-}" 2>&1 | tee "$OUT/runner.log"
  r=${PIPESTATUS[0]}
  [ $r -eq 0 ] || [ $r -eq 77 ] || rc=1
fi

if has e2e; then
  stamp e2e
  timeout "${E2E_TIMEOUT:-500}" "$BUILD/oscar" bench-e2e --arch qwen3-8b --random ${E2E_ARGS:-} \
    --json "$OUT/e2e.jsonl" > "$OUT/e2e.md" 2> "$OUT/e2e.log" || rc=1
  cat "$OUT/e2e.md"; tail -3 "$OUT/e2e.log"
fi

if has bench; then
  stamp bench
  timeout "${BENCH_TIMEOUT:-240}" "$BUILD/tests/gpu/bench_gpu" "$OUT/bench.jsonl" || rc=1
fi

if has peers; then
  stamp peers
  PYTHONUNBUFFERED=1 timeout "${PEERS_TIMEOUT:-200}" python3 bench/gpu/peers.py "$OUT/bench.jsonl" "$OUT/tables.md" "$OUT/peers.jsonl" || rc=1
fi
stamp "done rc=$rc"
exit $rc
