#!/usr/bin/env bash
# Nsight Compute readings of the decode and append kernels, one benchmark case
# at a time (issue 10: "what bounds each case"). Builds bench_gpu if needed,
# then for each case runs it under ncu, profiling one steady-state call (after
# the benchmark's warm-up) with the SpeedOfLight, Occupancy, LaunchStats,
# SchedulerStats, WarpStateStats and MemoryWorkloadAnalysis sections.
# Writes $OUT/profile.md (scripts/ncu-table.py: one row per profiled kernel
# launch) and $OUT/ncu.tgz (per case ncu_<name>.csv, ncu --csv --page raw).
#   PROFILE_CASES="b1_8k b1_128k ..." narrows the cases (names below).
# Clocks are left alone (--clock-control none), as the device notes ask.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
BUILD=${BUILD:-build-gpu}
mkdir -p "$OUT"
NCU=${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}
if [ ! -x "$BUILD/tests/gpu/bench_gpu" ]; then
  cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DOSCAR_NATIVE=OFF > "$OUT/profile-build.log" 2>&1 &&
    cmake --build "$BUILD" -j "$(nproc)" --target bench_gpu >> "$OUT/profile-build.log" 2>&1 ||
    { echo "BUILD FAILED"; tail -30 "$OUT/profile-build.log"; exit 1; }
fi
SECTIONS="--section SpeedOfLight --section Occupancy --section LaunchStats --section SchedulerStats
  --section WarpStateStats --section MemoryWorkloadAnalysis"
METRICS="gpu__time_duration.sum,smsp__inst_executed.sum,dram__bytes_read.sum,dram__bytes_write.sum,sm__cycles_active.avg,sm__cycles_elapsed.avg"
# decode: the split and merge kernels of one call after the 10 warm-up calls
# (the sequence API's metadata upload, ~1.7 us, is left out: the cache fill
# launches it too, which would shift the count)
DECODE_KERNELS='regex:attn_kernel|merge_kernel'
APPEND_KERNELS='regex:pack|window|build_tasks|finite|sumsq|norm_kernel|prologue'

# name ; OSCAR_BENCH_ONLY ; OSCAR_BENCH_CASE ; kernel filter ; launches to skip ; launches to profile
# (";" separates the fields: the kernel filters use "|")
CASES=(
  "b1_8k;decode;main B1 ctx8192 d128 b2;$DECODE_KERNELS;20;2"
  "b1_128k;decode;main B1 ctx131072 d128 b2;$DECODE_KERNELS;20;2"
  "b8_128k;decode;main B8 ctx131072 d128 b2;$DECODE_KERNELS;20;2"
  "b32_32k;decode;main B32 ctx32768 d128 b2;$DECODE_KERNELS;20;2"
  "d256_b8_32k;decode variants;d256 B8 ctx32768 d256 b2;$DECODE_KERNELS;20;2"
  "4bit_b8_32k;decode variants;4bit B8 ctx32768 d128 b4;$DECODE_KERNELS;20;2"
  "d64_b8_32k;decode variants;d64 B8 ctx32768 d64 b2;$DECODE_KERNELS;20;2"
  "kivi_b8_32k;decode variants;kivi B8 ctx32768 d128 b2;$DECODE_KERNELS;20;2"
  "none_b8_32k;decode variants;none B8 ctx32768 d128 b2;$DECODE_KERNELS;20;2"
  "append_b2_d128;append;append oscar b2 d128 bf16;$APPEND_KERNELS;20;8"
)
want=${PROFILE_CASES:-}
for c in "${CASES[@]}"; do
  IFS=';' read -r name only case_label kernels skip count <<< "$c"
  if [ -n "$want" ] && [[ " $want " != *" $name "* ]]; then continue; fi
  echo "[profile] $name"
  # shellcheck disable=SC2086
  OSCAR_BENCH_ONLY="$only" OSCAR_BENCH_CASE="$case_label" timeout "${PROFILE_TIMEOUT:-240}" \
    "$NCU" --clock-control none --print-units base -k "$kernels" --launch-skip "$skip" --launch-count "$count" \
    $SECTIONS --metrics "$METRICS" --csv --page raw \
    "$BUILD/tests/gpu/bench_gpu" > "$OUT/ncu_$name.csv" 2> "$OUT/ncu_$name.err"
  echo "  rc=$? $(grep -c '"' "$OUT/ncu_$name.csv") csv lines"
  tail -3 "$OUT/ncu_$name.err"
done
if command -v python3 > /dev/null; then
  python3 scripts/ncu-table.py "$OUT"/ncu_*.csv > "$OUT/profile.md" && cat "$OUT/profile.md"
fi
# one archive instead of two files per case (the device tool returns few files)
tar czf "$OUT/ncu.tgz" -C "$OUT" $(cd "$OUT" && ls ncu_*.csv ncu_*.err 2>/dev/null) && rm -f "$OUT"/ncu_*.csv "$OUT"/ncu_*.err
