#!/usr/bin/env bash
# The model runner end to end on the default model (SmolLM2-135M-Instruct):
# `oscar run`, `oscar ppl --json`, online vs folded V rotation, `oscar tni`
# with its PNG, malformed GGUF files, and the numpy logits check when numpy
# and gguf are installed. Downloads the model with scripts/get-model.sh if it
# is missing; skips (exit 77, "Skipped" in ctest) only if that download is impossible.
# usage: cli_model.sh <oscar-binary> <build-dir>
set -uo pipefail
BIN="$1"
BUILD="${2:-.}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODEL="${OSCAR_MODEL:-$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
TEXT="$ROOT/docs/FORMAT.md"   # real English documentation that is always in the repo
WORK="$BUILD/cli_model.tmp"
rm -rf "$WORK" && mkdir -p "$WORK"
# ctest runs tests side by side on few cores: spinning OpenMP threads of two
# processes then starve each other, so threads wait passively here.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"
fail() { echo "FAIL: $*"; exit 1; }

if [ ! -s "$MODEL" ]; then
    if ! "$ROOT/scripts/get-model.sh" >/dev/null; then
        echo "SKIP: the model is missing and scripts/get-model.sh could not download it"
        exit 77
    fi
fi
[ -s "$TEXT" ] || fail "missing $TEXT"

# A sanitizer build runs the same steps on shorter inputs.
SLOW=0
if grep -q '^OSCAR_SANITIZE:BOOL=ON' "$BUILD/../CMakeCache.txt" 2>/dev/null || \
   grep -q '^OSCAR_SANITIZE:BOOL=ON' "$BUILD/CMakeCache.txt" 2>/dev/null; then SLOW=1; fi
if [ $SLOW = 1 ]; then CTX=40; WIN=1; NGEN=2; TNI=48; RES=16; KG=16; VG=16; else CTX=256; WIN=2; NGEN=16; TNI=256; RES=128; KG=32; VG=32; fi
echo "cli_model: model $MODEL, ctx $CTX$( [ $SLOW = 1 ] && echo ' (sanitizer build: short inputs)')"

# 1. generation with the 2-bit OScaR cache: greedy, chat template
out="$("$BIN" run --model "$MODEL" --prompt "What is the capital of France?" -n $NGEN --kv oscar --bits 2 --residual $RES --k-group $KG --v-group $VG)" \
    || fail "oscar run exited with $?"
echo "$out"
if [ $SLOW = 0 ]; then echo "$out" | grep -q "Paris" || fail "run: expected 'Paris' in the answer"; fi
echo "$out" | grep -q "tokens/s" || fail "run: no tokens/s report"
echo "$out" | grep -q "KV cache oscar-2" || fail "run: no KV memory report"

# 2. perplexity with --json: the last stdout line is one JSON object
json_field() { sed -n 's/.*"'"$1"'":\([-0-9.eE+a-z]*\).*/\1/p' <<<"$2"; }
ppl_json() {
    "$BIN" ppl --model "$MODEL" --text "$TEXT" --ctx $CTX --windows $WIN --residual $RES --k-group $KG --v-group $VG --json "$@" \
        2>"$WORK/ppl.err" | tail -n1
}
j="$(ppl_json --kv oscar --bits 2)" || fail "ppl exited with an error: $(cat "$WORK/ppl.err")"
echo "ppl oscar-2: $j"
for f in ppl ppl_ref kl_mean kl_p99 top1_agree tokens kv_bytes_per_token; do
    [ -n "$(json_field $f "$j")" ] || fail "ppl --json: field '$f' missing"
done
grep -q 'tokens' "$WORK/ppl.err" || fail "ppl: no progress output on stderr"
awk -v p="$(json_field ppl "$j")" -v r="$(json_field ppl_ref "$j")" -v k="$(json_field kl_mean "$j")" \
    -v t="$(json_field top1_agree "$j")" -v b="$(json_field kv_bytes_per_token "$j")" 'BEGIN {
    if (!(p > 1 && p < 1000 && r > 1 && r < 1000)) { print "bad perplexity " p " / " r; exit 1 }
    if (!(k >= 0 && k < 1)) { print "bad kl_mean " k; exit 1 }
    if (!(t > 0.5 && t <= 1)) { print "bad top1_agree " t; exit 1 }
    if (!(b > 0 && b < 23040 / 3)) { print "bad kv_bytes_per_token " b; exit 1 }
}' || fail "ppl: implausible values"

# 2b. --score-second-half scores what llama-perplexity scores: the predictions
#     made at positions ctx/2 .. ctx-2 of each window; its perplexity equals
#     the one computed here from the full window's dumped logits
if [ $SLOW = 0 ] && python3 -c 'import numpy' 2>/dev/null; then
    jh="$("$BIN" ppl --model "$MODEL" --text "$TEXT" --ctx $CTX --windows 1 --kv f32 --score-second-half --json \
        --dump "$WORK/half" 2>/dev/null | tail -n1)" || fail "ppl --score-second-half failed"
    [ "$(json_field tokens "$jh")" = "$(( CTX - 1 - CTX / 2 ))" ] || fail "--score-second-half scored $(json_field tokens "$jh") tokens"
    python3 - "$WORK/half" $CTX "$(json_field ppl "$jh")" <<'PY' || fail "--score-second-half perplexity"
import sys, numpy as np
pre, ctx, ppl = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ids = np.fromfile(pre + ".tokens", dtype=np.int32)[:ctx]
lg = np.fromfile(pre + ".logits", dtype=np.float32).reshape(ctx, -1).astype(np.float64)
pos = np.arange(ctx // 2, ctx - 1)
m = lg[pos].max(-1)
lse = m + np.log(np.exp(lg[pos] - m[:, None]).sum(-1))
want = float(np.exp(np.mean(lse - lg[pos, ids[pos + 1]])))
print(f"--score-second-half: ppl {ppl} vs {want:.6f} from the dumped logits")
sys.exit(0 if abs(ppl - want) <= 1e-4 * want else 1)
PY
fi
"$BIN" ppl --model "$MODEL" --text "$TEXT" --ctx 64 --score-from 63 >/dev/null 2>&1 && fail "--score-from ctx-1 was accepted"

# 3. V rotation folded into W_v / W_o equals online rotation (normal build only:
#    a sanitizer build is too slow for a second pair of runs)
if [ $SLOW = 0 ]; then
jf="$(ppl_json --kv oscar --bits 2 --fold-v)" || fail "ppl --fold-v failed: $(cat "$WORK/ppl.err")"
echo "ppl oscar-2 --fold-v: $jf"
awk -v a="$(json_field ppl "$j")" -v b="$(json_field ppl "$jf")" -v ka="$(json_field kl_mean "$j")" \
    -v kb="$(json_field kl_mean "$jf")" -v ra="$(json_field ppl_ref "$j")" -v rb="$(json_field ppl_ref "$jf")" 'BEGIN {
    d = a > b ? a - b : b - a; dr = ra > rb ? ra - rb : rb - ra; dk = ka > kb ? ka - kb : kb - ka
    # equal up to float rounding (which can flip a rare 2-bit code)
    if (d / a > 2e-3 || dr / ra > 1e-4 || dk > 0.05 * ka + 1e-4) { print "online " a " vs folded " b; exit 1 }
}' || fail "folded and online V rotation differ"
fi

# 4. bad arguments and malformed files fail cleanly
"$BIN" ppl --model "$MODEL" --text "$TEXT" --kv nope >/dev/null 2>&1 && fail "ppl accepted --kv nope"
"$BIN" run --model "$MODEL" --prompt hi --bits 3 >/dev/null 2>&1 && fail "run accepted --bits 3"
head -c 1000000 "$MODEL" > "$WORK/truncated.gguf"
msg="$("$BIN" run --model "$WORK/truncated.gguf" --prompt hi 2>&1)"; rc=$?
[ $rc = 1 ] || fail "truncated GGUF: exit $rc, expected 1 ($msg)"
echo "truncated GGUF -> $msg"
printf 'GGUF\003\000\000\000\377\377\377\377\377\377\377\377\001\000\000\000\000\000\000\000' > "$WORK/hostile.gguf"
msg="$("$BIN" run --model "$WORK/hostile.gguf" --prompt hi 2>&1)"; rc=$?
[ $rc = 1 ] || fail "hostile GGUF: exit $rc, expected 1 ($msg)"
echo "hostile GGUF -> $msg"
echo "not a model" > "$WORK/text.gguf"
"$BIN" run --model "$WORK/text.gguf" --prompt hi >/dev/null 2>&1 && fail "a text file was accepted as a model"

# 5. TNI statistics and the PNG
"$BIN" tni --model "$MODEL" --text "$TEXT" --tokens $TNI --residual $RES --k-group $KG --png "$WORK/tni.png" > "$WORK/tni.txt" \
    || fail "tni failed"
head -n 8 "$WORK/tni.txt"
[ "$(grep -cE '^ +[0-9]+ \|' "$WORK/tni.txt")" = 30 ] || fail "tni: expected 30 layer rows"
[ "$(head -c 8 "$WORK/tni.png" | od -An -tx1 | tr -d ' \n')" = "89504e470d0a1a0a" ] || fail "tni: not a PNG"
if command -v python3 >/dev/null && python3 -c 'import zlib' 2>/dev/null; then
    python3 - "$WORK/tni.png" <<'PY' || fail "tni: PNG does not decode"
import struct, sys, zlib
d = open(sys.argv[1], "rb").read()
pos, idat = 8, b""
while pos < len(d):
    n, = struct.unpack(">I", d[pos:pos + 4]); typ = d[pos + 4:pos + 8]; body = d[pos + 8:pos + 8 + n]
    assert zlib.crc32(typ + body) == struct.unpack(">I", d[pos + 8 + n:pos + 12 + n])[0], "bad CRC"
    if typ == b"IHDR": w, h = struct.unpack(">II", body[:8])
    if typ == b"IDAT": idat += body
    pos += 12 + n
raw = zlib.decompress(idat)
assert len(raw) == h * (3 * w + 1), "bad size"
print(f"tni.png: {w}x{h}, decodes")
PY
fi

# 6. bench-e2e --device cpu: every cache, prefill and two depths, a table row each
out="$("$BIN" bench-e2e --device cpu --model "$MODEL" --bits 2,4 --depth 0,40 --gen 2 --pp 16 --reps 1 --threads 2)" \
    || fail "bench-e2e --device cpu exited with $?"
echo "$out" | tail -n 9
for c in "none (16-bit)" "oscar-2" "oscar-4"; do
    for t in "pp16" "tg2 @ d0" "tg2 @ d40"; do
        echo "$out" | grep -q "^| $c | $t | [0-9]" || fail "bench-e2e: no row '$c | $t'"
    done
done

# 7. logits against an independent numpy implementation
if [ $SLOW = 1 ]; then
    echo "cli_model: sanitizer build, numpy logits check left to the normal build"
elif python3 -c 'import numpy, gguf' 2>/dev/null; then
    python3 "$ROOT/tests/model/check_logits.py" --oscar "$BIN" --model "$MODEL" --text "$TEXT" --tokens 200 --gen 16 \
        || fail "logits check against numpy"
else
    echo "cli_model: numpy/gguf not installed (pip install numpy gguf), logits check skipped"
fi

# 6b. passkey retrieval: the 16-bit cache finds the key in most of six
#     256-token prompts (the model's own limit: 90% over 10 on this text),
#     and the control (no key in the prompt) scores 0 (the scorer does not
#     reward guessing)
if [ $SLOW = 0 ]; then
    "$BIN" niah --model "$MODEL" --text "$TEXT" --lengths 256 --depths 0,50,100 --trials 2 --kv none \
        --json "$WORK/niah.json" --png "$WORK/niah.png" > "$WORK/niah.txt" 2>&1 || fail "niah: $(cat "$WORK/niah.txt")"
    grep -v prompts "$WORK/niah.txt"
    found=$(grep -o '"correct":[0-9]*' "$WORK/niah.json" | awk -F: '{s += $2} END {print s + 0}')
    [ "$found" -ge 4 ] || fail "niah: the 16-bit cache found the key in $found of 6 prompts"
    [ -s "$WORK/niah.png" ] || fail "niah: no PNG"
    "$BIN" niah --model "$MODEL" --text "$TEXT" --lengths 256 --depths 0,100 --trials 1 --kv none --control \
        --json "$WORK/niah_control.json" > "$WORK/niah_control.txt" 2>&1 || fail "niah --control"
    grep -q '"correct":[1-9]' "$WORK/niah_control.json" && fail "niah --control: a key was 'found' that was never given"
    "$BIN" niah --model "$MODEL" --text "$TEXT" --lengths 10 >/dev/null 2>&1 && fail "niah: --lengths 10 accepted"
    "$BIN" niah --model "$MODEL" --text "$TEXT" --gpu-weights f32 >/dev/null 2>&1 \
        && fail "niah: --gpu-weights f32 accepted without --device cuda"
    grep -q '"device":"cpu","weights":"gguf"' "$WORK/niah.json" || fail "niah: the JSON does not say the device"
    # the combiner pairs prompts by seed: the 2-bit cache on the same prompts
    "$BIN" niah --model "$MODEL" --text "$TEXT" --lengths 256 --depths 0,50,100 --trials 2 --kv oscar --bits 2 \
        --json "$WORK/niah_o2.json" > "$WORK/niah_o2.txt" 2>&1 || fail "niah oscar: $(cat "$WORK/niah_o2.txt")"
    python3 "$ROOT/scripts/niah-combine.py" "$WORK/niah.json" "$WORK/niah_o2.json" > "$WORK/combine.txt" \
        || fail "niah-combine: $(cat "$WORK/combine.txt")"
    grep -q "McNemar over all prompts: 6 paired prompts" "$WORK/combine.txt" \
        || fail "niah-combine did not pair the 6 prompts: $(cat "$WORK/combine.txt")"
    python3 "$ROOT/scripts/niah-combine.py" "$WORK/niah.json" "$WORK/niah.json" > /dev/null 2>&1 \
        && fail "niah-combine counted one seed's prompts twice"
fi

# 7. the Qwen3 architecture (per-head q/k RMSNorm, neox RoPE, head_dim != dim/heads,
#    untied output) on a random-weight model with the real tokenizer, against numpy;
#    the 2-bit cache runs on it too
if [ $SLOW = 1 ]; then
    echo "cli_model: sanitizer build, Qwen3 numpy check left to the normal build"
elif python3 -c 'import numpy, gguf' 2>/dev/null; then
    python3 "$ROOT/scripts/make-qwen3-gguf.py" "$MODEL" "$WORK/qwen3.gguf" --untied >/dev/null \
        || fail "make-qwen3-gguf.py"
    python3 "$ROOT/tests/model/check_logits.py" --oscar "$BIN" --model "$WORK/qwen3.gguf" --text "$TEXT" \
        --tokens 64 --gen 8 || fail "Qwen3 logits check against numpy"
    "$BIN" ppl --model "$WORK/qwen3.gguf" --text "$TEXT" --ctx 256 --windows 1 --kv oscar --bits 2 --residual 32 \
        --json > "$WORK/qwen3_ppl.json" || fail "ppl on the Qwen3 model"
    grep -q '"kl_mean"' "$WORK/qwen3_ppl.json" || fail "Qwen3 ppl: no KL in the JSON"
    rm -f "$WORK/qwen3.gguf"
else
    echo "cli_model: numpy/gguf not installed, Qwen3 check skipped"
fi
echo "cli_model: PASS"
