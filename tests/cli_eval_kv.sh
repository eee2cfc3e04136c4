#!/usr/bin/env bash
# `oscar eval-kv` end to end: JSON fields and their meaning on a synthetic
# example, and a clear message plus non-zero exit for every kind of bad file.
# usage: cli_eval_kv.sh <oscar binary> <scratch dir>
set -u
OSCAR=$1
DIR=$2/cli_eval_kv
rm -rf "$DIR" && mkdir -p "$DIR"
pass=0 fail=0
ok() { pass=$((pass + 1)); }
bad() { echo "FAIL: $*"; fail=$((fail + 1)); }

"$OSCAR" synth --out "$DIR" --tokens 700 --kv-heads 2 --q-heads 8 --head-dim 64 --queries 4 --seed 3 \
  || { echo "FAIL: synth"; exit 1; }

# Valid runs: every method, JSON parsed by python's json module.
for m in none kivi quarot scale-only oscar; do
  out=$("$OSCAR" eval-kv --k "$DIR/K.npy" --v "$DIR/V.npy" --q "$DIR/Q.npy" --method $m --json) \
    || { bad "eval-kv --method $m exited non-zero"; continue; }
  python3 - "$m" "$out" <<'EOF' && ok || bad "eval-kv --method $m JSON: $out"
import json, sys
m, o = sys.argv[1], json.loads(sys.argv[2])
for k in ("method", "bits", "tokens", "attn_rel_err", "k_rel_err", "v_rel_err",
          "packed_bits_per_element", "bits_per_element"):
    assert k in o, k
assert o["method"] == m and o["tokens"] == 700
# 700 tokens, R = 128: 640 quantised, 60 in the fp16 window.
if m == "none":
    assert o["bits"] == 16 and o["packed_bits_per_element"] == 16
    assert o["attn_rel_err"] < 5e-3 and o["k_rel_err"] < 1e-3
else:
    assert o["bits"] == 2
    # d = 64, groups 32/32: K and V codes 2 + 32/32 bits; scaling adds 32/(2*64*2) per element.
    want = 3.0 + (32.0 / (2 * 64 * 2) if m in ("scale-only", "oscar") else 0.0)
    assert abs(o["packed_bits_per_element"] - want) < 1e-3, o["packed_bits_per_element"]
    whole = (640 * want + 60 * 16) / 700
    assert abs(o["bits_per_element"] - whole) < 1e-3, o["bits_per_element"]
    assert 0 < o["k_rel_err"] < 0.5 and 0 < o["v_rel_err"] < 0.7
EOF
done

# 4-bit is far more accurate than 2-bit.
e2=$("$OSCAR" eval-kv --k "$DIR/K.npy" --v "$DIR/V.npy" --q "$DIR/Q.npy" --bits 2 --json)
e4=$("$OSCAR" eval-kv --k "$DIR/K.npy" --v "$DIR/V.npy" --q "$DIR/Q.npy" --bits 4 --json)
python3 -c "import json,sys; a,b=json.loads(sys.argv[1]),json.loads(sys.argv[2]); assert b['k_rel_err']<a['k_rel_err']/3 and b['v_rel_err']<a['v_rel_err']/3" "$e2" "$e4" \
  && ok || bad "4-bit not clearly better than 2-bit: $e2 / $e4"

# Bad inputs: each must exit non-zero and say why on stderr.
python3 - "$DIR" <<'EOF'
import struct, sys, os
d = sys.argv[1]
def npy(path, descr, shape, payload, fortran=False):
    hdr = "{'descr': '%s', 'fortran_order': %s, 'shape': %s, }" % (descr, fortran, shape)
    hdr += " " * ((64 - (10 + len(hdr) + 1) % 64) % 64) + "\n"
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(hdr)) + hdr.encode() + payload)
n = 130 * 2 * 64
npy(f"{d}/f64.npy", "<f8", "(130, 2, 64)", b"\0" * (8 * n))
npy(f"{d}/rank2.npy", "<f4", "(130, 128)", b"\0" * (4 * n))
npy(f"{d}/short.npy", "<f4", "(130, 2, 64)", b"\0" * (4 * n - 4))
npy(f"{d}/long.npy", "<f4", "(130, 2, 64)", b"\0" * (4 * n + 4))
npy(f"{d}/fortran.npy", "<f4", "(130, 2, 64)", b"\0" * (4 * n), fortran=True)
npy(f"{d}/nan.npy", "<f4", "(130, 2, 64)", struct.pack("<f", float("nan")) + b"\0" * (4 * n - 4))
npy(f"{d}/inf.npy", "<f4", "(130, 2, 64)", b"\0" * (4 * n - 4) + struct.pack("<f", float("inf")))
npy(f"{d}/d48.npy", "<f4", "(130, 2, 48)", b"\0" * (4 * 130 * 2 * 48))
npy(f"{d}/v_other.npy", "<f4", "(129, 2, 64)", b"\0" * (4 * 129 * 2 * 64))
npy(f"{d}/q3heads.npy", "<f4", "(2, 3, 64)", b"\0" * (4 * 2 * 3 * 64))
npy(f"{d}/zero.npy", "<f4", "(0, 2, 64)", b"")
npy(f"{d}/ok130.npy", "<f4", "(130, 2, 64)", struct.pack("<f", 0.5) * n)
open(f"{d}/garbage.npy", "wb").write(b"not a numpy file at all")
# regressions: a shape whose product overflows int64 before the size check,
# and a 1 TiB header over a tiny file (nothing may be allocated for it)
npy(f"{d}/overflow.npy", "<f4", "(68719476736, 1099511627776, 1099511627776)", b"")
npy(f"{d}/huge.npy", "<f4", "(65536, 16, 65536)", b"\0" * 64)
EOF
expect_fail() {  # expect_fail "<what>" <pattern in stderr> args...
  local what=$1 pat=$2; shift 2
  local err rc
  err=$("$OSCAR" eval-kv "$@" 2>&1 >/dev/null); rc=$?
  if [ $rc -eq 0 ]; then bad "$what: exit 0"; return; fi
  if ! grep -qi -- "$pat" <<<"$err"; then bad "$what: message '$err' lacks '$pat'"; return; fi
  ok
}
K=$DIR/K.npy V=$DIR/V.npy Q=$DIR/Q.npy
expect_fail "float64 K" "float32" --k $DIR/f64.npy --v $V --q $Q
expect_fail "rank-2 K" "rank" --k $DIR/rank2.npy --v $V --q $Q
expect_fail "truncated K" "truncated" --k $DIR/short.npy --v $V --q $Q
expect_fail "shape overflowing int64" "too large" --k $DIR/overflow.npy --v $V --q $Q
expect_fail "64 GiB header over 64 bytes" "truncated" --k $DIR/huge.npy --v $V --q $Q
expect_fail "over-long K" "longer" --k $DIR/long.npy --v $V --q $Q
expect_fail "Fortran K" "fortran" --k $DIR/fortran.npy --v $V --q $Q
expect_fail "NaN in K" "NaN" --k $DIR/nan.npy --v $DIR/ok130.npy --q $Q
expect_fail "Inf in V" "Inf" --k $DIR/ok130.npy --v $DIR/inf.npy --q $Q
expect_fail "head_dim 48" "head_dim" --k $DIR/d48.npy --v $DIR/d48.npy --q $DIR/d48.npy
expect_fail "V shape differs" "differs" --k $DIR/ok130.npy --v $DIR/v_other.npy --q $Q
expect_fail "3 query heads vs 2 KV heads" "multiple" --k $K --v $V --q $DIR/q3heads.npy
expect_fail "zero tokens" "at least one" --k $DIR/zero.npy --v $DIR/zero.npy --q $Q
expect_fail "not npy" "magic" --k $DIR/garbage.npy --v $V --q $Q
expect_fail "missing file" "cannot open" --k $DIR/nope.npy --v $V --q $Q
expect_fail "missing --q" "required" --k $K --v $V
expect_fail "bad method" "method" --k $K --v $V --q $Q --method kivi2
expect_fail "bad bits" "bits" --k $K --v $V --q $Q --bits 3
expect_fail "group not dividing R" "k_group" --k $K --v $V --q $Q --k-group 48
expect_fail "v group not dividing d" "v_group" --k $K --v $V --q $Q --v-group 48
expect_fail "residual not multiple of 16" "residual" --k $K --v $V --q $Q --residual 100 --k-group 20
expect_fail "unknown option" "unknown option" --k $K --v $V --q $Q --frobnicate

echo "$pass passed, $fail failed"
[ $fail -eq 0 ]
