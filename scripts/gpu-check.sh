#!/usr/bin/env bash
# Builds the CUDA backend, runs the GPU tests, compute-sanitizer (memcheck and
# racecheck on the small test), the benchmark and the BF16 peers, in one call.
# Writes logs and tables under $OUT (default ./out):
#   build.log  test_gpu.log  sanitizer.log  python.log  bench.jsonl  peers.jsonl  tables.md
# STEPS selects steps (default "build test sanitize python bench peers").
# OSCAR_BENCH_ONLY (e.g. "decode" or "append") narrows the benchmark.
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
      cmake --build "$BUILD" -j "$(nproc)" --target oscar test_gpu bench_gpu
  } > "$OUT/build.log" 2>&1 || { echo "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }
  grep -E "warning|error" "$OUT/build.log" | grep -v "^--" | head -20
fi

if has test; then
  stamp test
  set -o pipefail
  timeout "${TEST_TIMEOUT:-300}" "$BUILD/tests/gpu/test_gpu" 2>&1 | tee "$OUT/test_gpu.log" | grep -Ev "^  .* ok$" || rc=1
  set +o pipefail
fi

if has sanitize; then
  stamp sanitize
  {
    echo "== memcheck"; timeout "${SAN_TIMEOUT:-150}" compute-sanitizer --tool memcheck --leak-check no "$BUILD/tests/gpu/test_gpu" --small
    echo "memcheck rc=$?"
    echo "== racecheck"; timeout "${SAN_TIMEOUT:-150}" compute-sanitizer --tool racecheck "$BUILD/tests/gpu/test_gpu" --small
    echo "racecheck rc=$?"
  } > "$OUT/sanitizer.log" 2>&1
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|rc=|passed|failed" "$OUT/sanitizer.log"
fi

if has python; then
  # The Python binding's GPU tests (torch CUDA tensors, HF cache on the CUDA backend).
  stamp python
  set -o pipefail
  OSCAR_LIBRARY="$PWD/$BUILD/liboscar.so" PYTHONDONTWRITEBYTECODE=1 timeout "${PY_TIMEOUT:-300}" \
    python3 -m pytest -q -rs -p no:cacheprovider python/tests -k gpu 2>&1 | tee "$OUT/python.log" | tail -15 || rc=1
  set +o pipefail
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
