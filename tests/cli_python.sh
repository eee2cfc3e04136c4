#!/usr/bin/env bash
# The Python binding's tests (python/tests), run by ctest as
#   bash tests/cli_python.sh <oscar-binary> <build-dir>
# OSCAR_PYTEST_FILES (set by cli_python_hf.sh and cli_python_compile.sh) picks
# test files; without it every file except those two scripts' runs here, so
# that each ctest test stays within its timeout.
# where <build-dir> is the tests' binary directory (build/tests); liboscar.so
# is one level up. Exits 77 (ctest: Skipped) with a SKIP message when python3, numpy or pytest
# are missing. Without torch/transformers/GPU the tests that need them skip.
set -u

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build_dir=${2:-$here/build/tests}

lib=""
for cand in "$build_dir/../liboscar.so" "$build_dir/liboscar.so" "$here/build/liboscar.so"; do
    if [ -f "$cand" ]; then
        lib=$(cd "$(dirname "$cand")" && pwd)/liboscar.so
        break
    fi
done
if [ -z "$lib" ]; then
    echo "cli_python: FAIL: liboscar.so not found (looked in $build_dir/.. and $here/build)"
    exit 1
fi

py=${PYTHON:-python3}
if ! command -v "$py" >/dev/null 2>&1; then
    echo "cli_python: SKIP: $py not found, Python binding tests not run"
    exit 77
fi
for mod in numpy pytest; do
    if ! "$py" -c "import $mod" >/dev/null 2>&1; then
        echo "cli_python: SKIP: the Python module '$mod' is not installed" \
             "(pip install numpy pytest), Python binding tests not run"
        exit 77
    fi
done

echo "cli_python: OSCAR_LIBRARY=$lib"
# A sanitizer build (make test-asan) links libasan: python must preload it.
# CPython's own allocations look like leaks to LeakSanitizer, so leaks are off.
preload=""
if command -v ldd >/dev/null 2>&1; then
    preload=$(ldd "$lib" 2>/dev/null | awk '/libasan\.so/ {print $3; exit}')
fi
if [ -n "$preload" ]; then
    echo "cli_python: sanitizer build, LD_PRELOAD=$preload"
    export LD_PRELOAD="$preload${LD_PRELOAD:+:$LD_PRELOAD}"
    export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0"
fi
cd "$here" || exit 1
if [ -n "${OSCAR_PYTEST_FILES:-}" ]; then
    # shellcheck disable=SC2206
    selection=($OSCAR_PYTEST_FILES)
else
    selection=(python/tests --ignore=python/tests/test_hf.py --ignore=python/tests/test_compile.py
               --ignore=python/tests/test_wheel.py)
fi
OSCAR_LIBRARY="$lib" PYTHONDONTWRITEBYTECODE=1 \
    "$py" -m pytest -q -rs -p no:cacheprovider "${selection[@]}"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "cli_python: SKIP: pytest collected no tests (exit code 5)"
    exit 77
fi
exit "$rc"
