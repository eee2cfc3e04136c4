#!/usr/bin/env bash
# The full SmolLM2-135M on the GPU. The device machine is reached through a
# 64 MiB transfer and the model is 98 MB, so it travels in two folders (gpuA/,
# gpuB/: `split -b 47000000 -d models/SmolLM2-135M-Instruct.Q4_1.gguf`: part 00 in gpuA, 01 and 02 in gpuB, with
# gpuB/policy.txt = the first 120000 bytes of models/debian-policy.txt), in
# two calls on a warm machine; this script joins them and runs:
#  1. tests/gpu/check_runner.sh on the full model (GPU runner against the CPU
#     runner on the same machine);
#  2. the KL grid of docs/ACCURACY.md: `oscar ppl --device cuda --gpu-weights
#     f32 --ctx 4096 --windows 4 --score-second-half` for each cache, the
#     tokens llama.cpp's llama-perplexity scores (its side runs on the CPU:
#     scripts/kl-llamacpp.sh);
#  3. the passkey-retrieval grid (`oscar niah --device cuda`) for the 16-bit,
#     OScaR-2, KIVI-2 and OScaR-4 caches (NIAH_KVS: other caches, ';'-separated;
#     NIAH_TRIALS: trials per cell, default 3; NIAH_SEED: the prompts' seed,
#     default 1; a cache's entry may carry runner flags, e.g. "none
#     --gpu-weights f32", the 16-bit cache with fp32 weights: a control for
#     how much rounding alone moves the grid).
# STEPS picks among "runner kl niah" (default: all three).
# usage: OUT=dir scripts/gpu-full-model.sh [BUILD_DIR]
set -u
cd "$(dirname "$0")/.."
BUILD=${1:-build-gpu}
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
M=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf
T=gpuB/policy.txt
A=gpuA/smolpart_00; [ -s "$A" ] || A=$BUILD/smolpart_00  # a carried folder does not outlive its call: call 1 copies part A into the build folder
cat "$A" gpuB/smolpart_0[1-9] > "$M" || exit 1
echo "model: $(sha256sum "$M" | cut -c1-16) ($(stat -c %s "$M") bytes)"
rc=0
STEPS=${STEPS:-"runner kl niah"}
has() { case " $STEPS " in *" $1 "*) return 0 ;; esac; return 1; }
if has runner; then
bash tests/gpu/check_runner.sh "$BUILD/oscar" "$M" "$T" "$OUT/runner" 2>&1 | tee "$OUT/runner.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
fi
if has kl; then
: > "$OUT/kl.jsonl"
for kv in "none" "oscar --bits 2" "oscar --bits 4" "kivi --bits 2" "quarot --bits 2" "scale-only --bits 2" \
          "kivi --bits 4" "quarot --bits 4"; do
  "$BUILD/oscar" ppl --device cuda --gpu-weights f32 --model "$M" --text "$T" --ctx 4096 --windows 4 \
    --score-second-half --kv $kv --json 2> "$OUT/kl_err.log" | tail -n1 | tee -a "$OUT/kl.jsonl" || rc=1
done
fi
if has niah; then
# NIAH_KVS: the caches, ';'-separated (default: the four of docs/ACCURACY.md)
IFS=';' read -r -a niah_kvs <<< "${NIAH_KVS:-none;oscar --bits 2;kivi --bits 2;oscar --bits 4}"
for kv in "${niah_kvs[@]}"; do
  tag=$(echo "$kv" | tr -d ' -')_s${NIAH_SEED:-1}
  "$BUILD/oscar" niah --device cuda --model "$M" --text "$T" --lengths 1024,2048,4096,7680 --depths 0,25,50,75,100 \
    --trials ${NIAH_TRIALS:-3} --seed ${NIAH_SEED:-1} --kv $kv --json "$OUT/niah_$tag.json" --png "$OUT/niah_$tag.png" 2> "$OUT/niah_$tag.err" || rc=1
done
fi
exit $rc
