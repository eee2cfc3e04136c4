#!/usr/bin/env bash
# The GPU runner against the CPU runner, same binary, same GGUF, same text.
# With fp32 weights on the GPU (--gpu-weights f32, the CPU's numbers):
#  - logits of the first 300 tokens (16-bit cache): max |dlogit| / max |logit| <= 1e-2;
#  - the same greedy continuation (`oscar run --ids`);
#  - perplexity within 0.5% for --kv none, oscar 2-bit and oscar 4-bit.
# With bf16 weights (the default): logits <= 5e-2, perplexity within 2%
# (bf16 rounds every weight: a different model by ~0.2% per weight).
# A Qwen3-architecture model (optional 5th argument, scripts/make-qwen3-gguf.py):
# logits and the 2-bit perplexity, fp32 weights, same limits.
# `oscar tni --device cuda` gives the CPU's table.
# usage: check_runner.sh OSCAR_BINARY MODEL.gguf TEXT.txt OUTDIR [QWEN3.gguf]
# Exits 77 (skipped) without a CUDA device or without the model.
set -u
bin=$1 model=$2 text=$3 out=$4 qwen=${5:-}
mkdir -p "$out"
if [ ! -s "$model" ] || [ ! -s "$text" ]; then echo "SKIP: runner check needs $model and $text"; exit 77; fi
if ! "$bin" run --model "$model" --prompt x -n 1 --raw --device cuda >/dev/null 2>"$out/probe.err"; then
  if grep -q "CUDA device\|without the CUDA" "$out/probe.err"; then echo "SKIP: $(tail -1 "$out/probe.err")"; exit 77; fi
  echo "FAIL: the GPU runner did not start:"; cat "$out/probe.err"; exit 1
fi
fail=0
# 1. logits: cpu, cuda with fp32 weights, cuda with bf16 weights
logits_check() { # model tag limit: compares $out/cpu_$tag.logits with $out/$2.logits
  python3 - "$out/cpu_$1.logits" "$out/$2.logits" "$3" "$2" <<'PY'
import sys, numpy as np
a = np.fromfile(sys.argv[1], dtype=np.float32)
b = np.fromfile(sys.argv[2], dtype=np.float32)
lim = float(sys.argv[3])
if a.size == 0 or a.size != b.size:
    print("FAIL: logits sizes", a.size, b.size); sys.exit(1)
rel = float(np.max(np.abs(a - b)) / np.max(np.abs(a)))
vocab = 49152
agree = float(np.mean(a.reshape(-1, vocab).argmax(1) == b.reshape(-1, vocab).argmax(1)))
print(f"logits {sys.argv[4]}, 16-bit cache, {a.size // vocab} tokens: max |dlogit| / max |logit| = {rel:.2e} "
      f"(limit {lim:g}), top-1 agreement {agree:.4f}")
sys.exit(0 if rel <= lim else 1)
PY
}
ppl_dump() { # model tag device extra-args...
  local m=$1 tag=$2 dev=$3; shift 3
  "$bin" ppl --model "$m" --text "$text" --ctx 300 --windows 1 --kv none --no-ref --device $dev "$@" \
    --dump "$out/$tag" --json > "$out/ppl_$tag.json" 2> "$out/ppl_$tag.err" || { echo "FAIL: ppl $tag"; cat "$out/ppl_$tag.err"; return 1; }
}
ppl_dump "$model" cpu_smol cpu || fail=1
ppl_dump "$model" cuda_f32 cuda --gpu-weights f32 || fail=1
ppl_dump "$model" cuda_bf16 cuda --gpu-weights bf16 || fail=1
logits_check smol cuda_f32 1e-2 || fail=1
logits_check smol cuda_bf16 5e-2 || fail=1
# 2. greedy continuation, 16-bit cache (the reply and its token ids; the
#    timing lines, which start with "---", naturally differ)
for dev in cpu "cuda --gpu-weights f32" "cuda --gpu-weights bf16"; do
  tag=$(echo "$dev" | tr -d ' -')
  "$bin" run --model "$model" --prompt "The Debian policy says that every package" --raw -n 48 --ids --kv none \
    --device $dev 2> "$out/run_$tag.err" | grep -v "^---" > "$out/run_$tag.txt" || { echo "FAIL: run $dev"; cat "$out/run_$tag.err"; fail=1; }
done
if [ -s "$out/run_cpu.txt" ] && cmp -s "$out/run_cpu.txt" "$out/run_cudagpuweightsf32.txt"; then
  echo "greedy continuation (48 tokens, 16-bit cache, fp32 weights): identical"
else
  echo "FAIL: greedy continuations differ"; diff "$out/run_cpu.txt" "$out/run_cudagpuweightsf32.txt" | head; fail=1
fi
python3 - "$out/run_cpu.txt" "$out/run_cudagpuweightsbf16.txt" <<'PY'
import sys
def ids(p):
    for l in open(p):
        if l.startswith("ids:"): return l.split()[1:]
    return []
a, b = ids(sys.argv[1]), ids(sys.argv[2])
same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
print(f"greedy continuation with bf16 weights: the first {same} of {len(a)} tokens equal the CPU's (reported, not required)")
PY
# 3. perplexity: fp32 weights within 0.5%, bf16 weights within 2%
ppl_check() { # cpu.json cuda.json label limit
  python3 - "$@" <<'PY'
import json, sys
def last(p):
    return json.loads(open(p).read().strip().splitlines()[-1])
a, b = last(sys.argv[1]), last(sys.argv[2])
pa, pb, lim = a["ppl"], b["ppl"], float(sys.argv[4])
d = abs(pb - pa) / pa
print(f"ppl {sys.argv[3]}: cpu {pa:.4f}  cuda {pb:.4f}  ({100 * d:.3f}%, limit {100 * lim:g}%)")
sys.exit(0 if d <= lim else 1)
PY
}
for kv in "none" "oscar --bits 2" "oscar --bits 4"; do
  tag=$(echo "$kv" | tr -d ' -')
  for dev in cpu "cuda --gpu-weights f32" "cuda --gpu-weights bf16"; do
    dtag=$(echo "$dev" | tr -d ' -')
    "$bin" ppl --model "$model" --text "$text" --ctx 1024 --windows 2 --kv $kv --no-ref --device $dev --json \
      > "$out/ppl_${tag}_$dtag.json" 2> "$out/ppl_${tag}_$dtag.err" || { echo "FAIL: ppl $kv $dev"; cat "$out/ppl_${tag}_$dtag.err"; fail=1; }
  done
  ppl_check "$out/ppl_${tag}_cpu.json" "$out/ppl_${tag}_cudagpuweightsf32.json" "--kv $kv, fp32 weights" 0.005 || fail=1
  ppl_check "$out/ppl_${tag}_cpu.json" "$out/ppl_${tag}_cudagpuweightsbf16.json" "--kv $kv, bf16 weights" 0.02 || fail=1
done
# 4. Qwen3 architecture
if [ -n "$qwen" ] && [ -s "$qwen" ]; then
  ppl_dump "$qwen" cpu_qwen cpu || fail=1
  ppl_dump "$qwen" cuda_qwen cuda --gpu-weights f32 || fail=1
  logits_check qwen cuda_qwen 1e-2 || fail=1
  for dev in cpu "cuda --gpu-weights f32"; do
    dtag=$(echo "$dev" | tr -d ' -')
    "$bin" ppl --model "$qwen" --text "$text" --ctx 512 --windows 1 --kv oscar --bits 2 --no-ref --device $dev --json \
      > "$out/qwen_ppl_$dtag.json" 2> "$out/qwen_ppl_$dtag.err" || { echo "FAIL: qwen ppl $dev"; cat "$out/qwen_ppl_$dtag.err"; fail=1; }
  done
  ppl_check "$out/qwen_ppl_cpu.json" "$out/qwen_ppl_cudagpuweightsf32.json" "Qwen3 (random weights) --kv oscar --bits 2" 0.005 || fail=1
else
  echo "runner check: no Qwen3 model given, Qwen3 part skipped"
fi
# 5. tni: the GPU's keys give the CPU's table (norm statistics printed to 2-4 digits)
for dev in cpu cuda; do
  "$bin" tni --model "$model" --text "$text" --tokens 256 --device $dev > "$out/tni_$dev.txt" 2> "$out/tni_$dev.err" \
    || { echo "FAIL: tni $dev"; cat "$out/tni_$dev.err"; fail=1; }
done
if cmp -s "$out/tni_cpu.txt" "$out/tni_cuda.txt"; then
  echo "tni --device cuda: the CPU's table, identical"
else
  echo "tni --device cuda: differs from the CPU's table (float rounding in printed digits?):"
  diff "$out/tni_cpu.txt" "$out/tni_cuda.txt" | head -6
  python3 - "$out/tni_cpu.txt" "$out/tni_cuda.txt" <<'PY' || fail=1
import re, sys
# a number agrees when within 1e-2 relative, or within one unit of its last
# printed digit (0.043 vs 0.044: the keys differ in the 6th digit, the print
# rounds them apart)
ta = re.findall(r"-?\d+\.\d+", open(sys.argv[1]).read())
tb = re.findall(r"-?\d+\.\d+", open(sys.argv[2]).read())
if len(ta) != len(tb):
    print("FAIL: tni tables differ in shape"); sys.exit(1)
bad, worst = 0, 0.0
for x, y in zip(ta, tb):
    a, b = float(x), float(y)
    ulp = 10.0 ** -len(x.split(".")[1])
    rel = abs(a - b) / max(abs(a), 1e-3)
    worst = max(worst, rel)
    bad += rel > 1e-2 and abs(a - b) > 1.01 * ulp
print(f"tni: {len(ta)} numbers, worst relative difference {worst:.2e}; {bad} differ by more than 1e-2 "
      f"and one unit of the last printed digit")
sys.exit(0 if bad == 0 else 1)
PY
fi
[ $fail -eq 0 ] && echo "runner check: passed" || echo "runner check: FAILED"
exit $fail
