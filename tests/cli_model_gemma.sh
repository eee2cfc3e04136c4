#!/usr/bin/env bash
# The runner on a second model family, Gemma 3 270M (gemma3: sliding-window
# layers, head dim 256, one KV head, SentencePiece vocabulary): greedy
# generation, `oscar ppl --json` with the 2-bit cache, the refusal of the GPU
# runner, and the numpy logits check over more tokens than the 512-position
# window (so the local layers' window is exercised).
# The model (about 250 MB) is not downloaded here: run scripts/get-gemma.sh
# first. Without it this test exits 77 ("Skipped" in ctest).
# usage: cli_model_gemma.sh <oscar-binary> <build-dir>
set -uo pipefail
BIN="$1"
BUILD="${2:-.}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODEL="${OSCAR_GEMMA_MODEL:-$ROOT/models/gemma-3-270m-q4_k_m.gguf}"
TEXT="$ROOT/docs/FORMAT.md"
WORK="$BUILD/cli_model_gemma.tmp"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"
fail() { echo "FAIL: $*"; exit 1; }

if [ ! -s "$MODEL" ]; then
    echo "SKIP: $MODEL is missing (scripts/get-gemma.sh downloads it, about 250 MB)"
    exit 77
fi
if grep -q '^OSCAR_SANITIZE:BOOL=ON' "$BUILD/../CMakeCache.txt" "$BUILD/CMakeCache.txt" 2>/dev/null; then
    echo "SKIP: too slow for a sanitizer build"
    exit 77
fi
rm -rf "$WORK" && mkdir -p "$WORK"

# 1. greedy generation, 16-bit cache: English about France
out="$("$BIN" run --model "$MODEL" --prompt "The capital of France is" -n 12 --kv none --ids)" || fail "oscar run exited with $?"
echo "$out"
echo "$out" | grep -q "^prompt_ids: 2 818 5279 529 7001 563$" || fail "run: prompt ids (BOS + SentencePiece) differ"
echo "$out" | grep -qi "France" || fail "run: expected the continuation to mention France"

# 2. ppl --json with the 2-bit OScaR cache (global layers) against the 16-bit one
j="$("$BIN" ppl --model "$MODEL" --text "$TEXT" --ctx 160 --windows 1 --kv oscar --bits 2 --residual 32 --json 2>"$WORK/ppl.err" | tail -n1)" \
    || fail "ppl: $(cat "$WORK/ppl.err")"
echo "ppl oscar-2: $j"
awk -v j="$j" 'BEGIN {
    if (match(j, /"ppl":[0-9.]+/) == 0) { print "no ppl"; exit 1 }
    p = substr(j, RSTART + 6, RLENGTH - 6) + 0
    if (match(j, /"kl_mean":[0-9.e-]+/) == 0) { print "no kl_mean"; exit 1 }
    k = substr(j, RSTART + 10, RLENGTH - 10) + 0
    if (!(p > 1 && p < 200)) { print "bad perplexity " p; exit 1 }
    if (!(k > 0 && k < 1)) { print "bad kl_mean " k; exit 1 }
}' || fail "ppl --json values"

# 3. the GPU runner has no sliding-window layers: a clear refusal, not wrong numbers
if err="$("$BIN" run --model "$MODEL" --prompt "hi" -n 1 --device cuda 2>&1)"; then
    fail "run --device cuda accepted gemma3"
fi
echo "$err" | grep -q "sliding-window" || fail "run --device cuda: unexpected message: $err"

# 4. numpy float64 reference: logits of 560 tokens (past the 512 window), greedy ids, tokenizer.
#    A ring of window + 16 positions (chunks of at most 17) wraps within these 560 tokens.
if python3 -c "import numpy, gguf" 2>/dev/null; then
    OSCAR_SWA_RING_SLACK=16 python3 "$ROOT/tests/model/check_logits.py" --oscar "$BIN" --model "$MODEL" --text "$TEXT" --tokens 560 --gen 8 \
        || fail "check_logits.py on Gemma 3"
else
    echo "cli_model_gemma: numpy/gguf not installed; logits check skipped"
fi
rm -rf "$WORK"
echo "cli_model_gemma: ok"
