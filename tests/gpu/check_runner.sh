#!/usr/bin/env bash
# The GPU runner against the CPU runner, same binary, same GGUF, same text:
#  - logits of the first 300 tokens (16-bit cache): max |dlogit| / max |logit| <= 1e-2;
#  - the same greedy continuation (`oscar run --ids`);
#  - perplexity within 0.5% for --kv none, oscar 2-bit and oscar 4-bit.
# usage: check_runner.sh OSCAR_BINARY MODEL.gguf TEXT.txt OUTDIR
# Exits 77 (skipped) without a CUDA device or without the model.
set -u
bin=$1 model=$2 text=$3 out=$4
mkdir -p "$out"
if [ ! -s "$model" ] || [ ! -s "$text" ]; then echo "SKIP: runner check needs $model and $text"; exit 77; fi
if ! "$bin" run --model "$model" --prompt x -n 1 --raw --device cuda >/dev/null 2>"$out/probe.err"; then
  if grep -q "CUDA device\|without the CUDA" "$out/probe.err"; then echo "SKIP: $(tail -1 "$out/probe.err")"; exit 77; fi
  echo "FAIL: the GPU runner did not start:"; cat "$out/probe.err"; exit 1
fi
fail=0
# 1. logits
for dev in cpu cuda; do
  "$bin" ppl --model "$model" --text "$text" --ctx 300 --windows 1 --kv none --no-ref --device $dev \
    --dump "$out/$dev" --json > "$out/ppl_none_$dev.json" 2> "$out/ppl_none_$dev.err" || { echo "FAIL: ppl $dev"; cat "$out/ppl_none_$dev.err"; fail=1; }
done
python3 - "$out" <<'PY' || fail=1
import sys, numpy as np
o = sys.argv[1]
a = np.fromfile(o + "/cpu.logits", dtype=np.float32)
b = np.fromfile(o + "/cuda.logits", dtype=np.float32)
if a.size == 0 or a.size != b.size:
    print("FAIL: logits sizes", a.size, b.size); sys.exit(1)
rel = float(np.max(np.abs(a - b)) / np.max(np.abs(a)))
vocab = 49152
agree = float(np.mean(a.reshape(-1, vocab).argmax(1) == b.reshape(-1, vocab).argmax(1)))
print(f"logits, 16-bit cache, {a.size // vocab} tokens: max |dlogit| / max |logit| = {rel:.2e} (limit 1e-2), top-1 agreement {agree:.4f}")
sys.exit(0 if rel <= 1e-2 else 1)
PY
# 2. greedy continuation, 16-bit cache (the reply and its token ids; the
#    timing lines, which start with "---", naturally differ)
for dev in cpu cuda; do
  "$bin" run --model "$model" --prompt "The Debian policy says that every package" --raw -n 48 --ids --kv none \
    --device $dev 2> "$out/run_$dev.err" | grep -v "^---" > "$out/run_$dev.txt" || { echo "FAIL: run $dev"; cat "$out/run_$dev.err"; fail=1; }
done
if [ -s "$out/run_cpu.txt" ] && cmp -s "$out/run_cpu.txt" "$out/run_cuda.txt"; then
  echo "greedy continuation (48 tokens, 16-bit cache): identical"
else
  echo "FAIL: greedy continuations differ"; diff "$out/run_cpu.txt" "$out/run_cuda.txt" | head; fail=1
fi
# 3. perplexity
for kv in "none" "oscar --bits 2" "oscar --bits 4"; do
  tag=$(echo "$kv" | tr -d ' -')
  for dev in cpu cuda; do
    "$bin" ppl --model "$model" --text "$text" --ctx 1024 --windows 2 --kv $kv --no-ref --device $dev --json \
      > "$out/ppl_${tag}_$dev.json" 2> "$out/ppl_${tag}_$dev.err" || { echo "FAIL: ppl $kv $dev"; cat "$out/ppl_${tag}_$dev.err"; fail=1; }
  done
  python3 - "$out/ppl_${tag}_cpu.json" "$out/ppl_${tag}_cuda.json" "$kv" <<'PY' || fail=1
import json, sys
def last(p):
    return json.loads(open(p).read().strip().splitlines()[-1])
a, b = last(sys.argv[1]), last(sys.argv[2])
pa, pb = a["ppl"], b["ppl"]
d = abs(pb - pa) / pa
print(f"ppl --kv {sys.argv[3]}: cpu {pa:.4f}  cuda {pb:.4f}  ({100 * d:.3f}%, limit 0.5%)")
sys.exit(0 if d <= 0.005 else 1)
PY
done
[ $fail -eq 0 ] && echo "runner check: passed" || echo "runner check: FAILED"
exit $fail
