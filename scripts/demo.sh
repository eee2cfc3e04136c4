#!/usr/bin/env bash
# The main-job demo: SmolLM2-135M-Instruct answers a fixed question with its
# KV cache stored at 2 bits by OScaR, then we show the memory saved and the KL
# divergence of next-token distributions against the 16-bit cache on a short
# passage (the repository's own docs/FORMAT.md). A few minutes on 2 cores.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
build="${BUILD:-build}"
model="$("$root/scripts/get-model.sh")"
if [ ! -x "$build/oscar" ]; then
    cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
    cmake --build "$build" -j "$(nproc 2>/dev/null || echo 2)" >/dev/null
fi
oscar="$build/oscar"
prompt="In three sentences, why does a KV cache help a language model generate text faster?"
echo "== oscar run, 2-bit OScaR cache: $prompt"
"$oscar" run --model "$model" --kv oscar --bits 2 -n 96 --prompt "$prompt"
echo
echo "== the same question with the 16-bit cache, for comparison"
"$oscar" run --model "$model" --kv none -n 96 --prompt "$prompt"
echo
echo "== KL of OScaR-2 against the 16-bit cache on docs/FORMAT.md (one 1024-token window)"
"$oscar" ppl --model "$model" --text docs/FORMAT.md --ctx 1024 --windows 1 --kv oscar --bits 2 2>/dev/null | grep -E "^(perplexity|KV bytes)"
echo
echo "Full tables (1K/4K/8K contexts, all methods, group/window sweep): docs/ACCURACY.md"
