#!/usr/bin/env bash
# Builds the libFuzzer harnesses with clang (-fsanitize=fuzzer,address,undefined)
# and runs each for SECONDS (default 30), starting from the committed seeds
# and regression inputs. New interesting inputs collect in WORK/corpus/NAME;
# a crash or broken property leaves WORK/artifacts/NAME-crash-* and fails.
# usage: tests/fuzz/run.sh [SECONDS] [WORK_DIR] [HARNESS...]
# Exits 77 (ctest: Skipped) when clang or its libFuzzer runtime is missing.
set -u
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
secs="${1:-30}"
work="${2:-$root/build/fuzz}"
shift $(( $# >= 2 ? 2 : $# ))
harnesses=("$@")
[ ${#harnesses[@]} -gt 0 ] || harnesses=(gguf tokenizer npy import)
CC="${FUZZ_CC:-clang}"

if ! command -v "$CC" >/dev/null 2>&1; then
  echo "SKIP: $CC not found (Debian: apt-get install clang libclang-rt-dev)"
  exit 77
fi
mkdir -p "$work/obj" "$work/artifacts"
probe="$work/probe.c"
printf '#include <stdint.h>\n#include <stddef.h>\nint LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) { (void)d; (void)n; return 0; }\n' >"$probe"
if ! "$CC" -fsanitize=fuzzer,address,undefined "$probe" -o "$work/probe" 2>"$work/probe.log"; then
  echo "SKIP: $CC cannot link -fsanitize=fuzzer (the libFuzzer runtime is missing; Debian: libclang-rt-dev)"
  sed 's/^/  /' "$work/probe.log" | head -5
  exit 77
fi

flags=(-g -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all
       -Wno-unknown-pragmas -Wno-psabi -I"$root/include" -I"$root/src/core" -I"$root/model" -I"$root/tools/oscar"
       -I"$root/tests/fuzz" -I"$root/tests/fuzz/omp_serial"
       -DOSCAR_FUZZ_TOKENIZER_GGUF="\"$root/tests/fuzz/tokenizer/tokenizer.gguf\"")
# The code under test, once, instrumented for coverage (fuzzer-no-link).
sources=("$root"/src/core/*.c "$root"/src/cpu/*.c "$root"/model/gguf.c "$root"/model/llama.c "$root"/model/qmatmul.c
         "$root"/model/tokenizer.c "$root"/model/unicode_tables.c "$root"/tools/oscar/npy.c)
echo "building ${#sources[@]} sources with $("$CC" --version | head -1)"
printf '%s\n' "${sources[@]}" | xargs -P "$(nproc 2>/dev/null || echo 2)" -I{} sh -c \
  'o="$0/obj/$(basename "$1" .c).o"; "$2" -c "$1" -o "$o" -fsanitize=fuzzer-no-link '"${flags[*]@Q}"' || exit 255' \
  "$work" {} "$CC" || { echo "FAIL: building the fuzz targets"; exit 1; }
lib_objs=("$work"/obj/*.o)

status=0
for h in "${harnesses[@]}"; do
  if ! "$CC" -fsanitize=fuzzer "${flags[@]}" "$root/tests/fuzz/fuzz_$h.c" "${lib_objs[@]}" -lm -o "$work/fuzz_$h"; then
    echo "FAIL: building fuzz_$h"; status=1; continue
  fi
  mkdir -p "$work/corpus/$h"
  dirs=("$work/corpus/$h" "$root/tests/fuzz/$h/seeds")
  [ -d "$root/tests/fuzz/$h/regressions" ] && dirs+=("$root/tests/fuzz/$h/regressions")
  log="$work/fuzz_$h.log"
  start=$(date +%s)
  # -rss/-malloc limits: a parser that allocates what a header claims is a finding
  "$work/fuzz_$h" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=1024 \
    -max_len=65536 -error_exitcode=1 -timeout_exitcode=1 -print_final_stats=1 -artifact_prefix="$work/artifacts/$h-" "${dirs[@]}" >"$log" 2>&1
  rc=$?
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$')
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1)
  if [ $rc -ne 0 ]; then
    echo "FAIL: fuzz_$h (exit $rc) after $(( $(date +%s) - start )) s; the input is in $work/artifacts/$h-*"
    grep -E 'ERROR|fuzz property|SUMMARY|==[0-9]+==|#[0-9]+ 0x' "$log" | head -30 | sed 's/^/  /'
    # a CI log is all that is left of a CI machine: the input itself, to reproduce
    grep -E '^Base64: ' "$log" | tail -1 | cut -c1-4000 | sed 's/^/  input /'
    echo "  add it to tests/fuzz/$h/regressions/ once fixed (tests/fuzz/README.md)"
    status=1
  else
    echo "ok: fuzz_$h ran ${runs:-?} inputs in $(( $(date +%s) - start )) s, $cov"
  fi
done
[ $status -eq 0 ] && echo "${#harnesses[@]} passed, 0 failed"
exit $status
