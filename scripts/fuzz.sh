#!/usr/bin/env bash
# Long fuzzing runs: each libFuzzer harness (GGUF + model loading, tokenizer,
# .npy, export/import) for SECONDS (default 3600), one after another. The
# corpus grows in build-fuzz/corpus/ and survives between runs; crashes land
# in build-fuzz/artifacts/. CI runs the same harnesses for 30 s each (ctest
# fuzz_libfuzzer). Needs clang with libFuzzer (Debian: clang libclang-rt-dev).
# usage: scripts/fuzz.sh [SECONDS] [gguf|tokenizer|npy|import ...]
#   OSCAR_FUZZ_TOKENIZER=model.gguf fuzzes the tokenizer with that vocabulary.
set -u
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
secs="${1:-3600}"
[ $# -gt 0 ] && shift
exec "$root/tests/fuzz/run.sh" "$secs" "$root/build-fuzz" "$@"
