#!/usr/bin/env bash
# docs/ACCURACY.md's paired passkey grid ("Paired grid, 18 trials per cell")
# against its recorded data: scripts/niah-combine.py on docs/niah/*.json must
# print the counts the section quotes, its McNemar p-values must equal an
# independent float64 computation, and the combiner must refuse inputs that
# would count prompts twice or do not add up.
# usage: cli_docs_niah.sh <oscar binary (unused)> <scratch dir>
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=$2/cli_docs_niah
rm -rf "$DIR" && mkdir -p "$DIR"
command -v python3 >/dev/null || { echo "SKIP: no python3"; exit 77; }
N=$ROOT/docs/niah
pass=0 fail=0
ok() { pass=$((pass + 1)); }
bad() { echo "FAIL: $*"; fail=$((fail + 1)); }

python3 "$ROOT/scripts/niah-combine.py" "$N"/16bit_bf16_s*.json "$N"/16bit_f32_s*.json "$N"/oscar2_rec_s*.json \
  "$N"/k3v2_rec_s*.json "$N"/k4v2_rec_s*.json > "$DIR/combined.txt" 2>&1 || { cat "$DIR/combined.txt"; exit 1; }

# the counts quoted in the section, in the order the combiner prints them
python3 - "$DIR/combined.txt" <<'EOF' && ok || bad "combined counts differ from docs/ACCURACY.md"
import re, sys
t = open(sys.argv[1]).read()
overall = [int(x) for x in re.findall(r"overall [0-9.]+% \((\d+) of 360\)", t)]
assert overall == [281, 281, 236, 267, 280], overall
pairs = [(int(a), int(b), int(c)) for a, b, c in
         re.findall(r"McNemar over all prompts: (\d+) paired prompts, reference only (\d+), cache only (\d+)", t)]
assert pairs == [(360, 1, 1), (360, 61, 16), (360, 25, 11), (360, 7, 6)], pairs
strong = [(int(a), int(b), int(c)) for a, b, c in
          re.findall(r"McNemar over the >= 90% cells: (\d+) paired prompts, reference only (\d+), cache only (\d+)", t)]
assert strong == [(144, 0, 0), (144, 17, 1), (144, 5, 1), (144, 0, 1)], strong
matched = [int(x) for x in re.findall(r"finds >= 90%: 8; the cache finds at least as many in (\d+)", t)]
assert matched == [8, 1, 5, 8], matched
EOF

# each printed p against a float64 binomial tail built by the pmf recurrence
python3 - "$DIR/combined.txt" <<'EOF' && ok || bad "McNemar p-values"
import re, sys
t = open(sys.argv[1]).read()
rows = re.findall(r"reference only (\d+), cache only (\d+), exact two-sided p = ([0-9.e+-]+)", t)
assert len(rows) == 8, rows
for b, c, p in rows:
    b, c, p = int(b), int(c), float(p)
    n, k = b + c, min(b, c)
    pmf, tail = 0.5 ** n, 0.0          # P(X = 0) for X ~ Binomial(n, 1/2)
    for i in range(k + 1):
        tail += pmf
        pmf *= (n - i) / (i + 1.0)     # P(X = i + 1) from P(X = i)
    want = 1.0 if n == 0 else min(1.0, 2.0 * tail)
    assert abs(p - want) <= 2e-3 * want, (b, c, p, want)
EOF

# one seed of one cache twice: the same prompts would count twice
python3 "$ROOT/scripts/niah-combine.py" "$N/16bit_bf16_s2.json" "$N/16bit_bf16_s2.json" > "$DIR/twice.txt" 2>&1 \
  && bad "the same seed of one cache was accepted twice" \
  || { grep -q "was read already" "$DIR/twice.txt" && ok || bad "no reason given: $(cat "$DIR/twice.txt")"; }

# a cell whose outcomes do not add up to its count
python3 - "$N/k3v2_rec_s2.json" "$DIR/broken.json" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))
j["cells"][0]["correct"] -= 1
json.dump(j, open(sys.argv[2], "w"))
EOF
python3 "$ROOT/scripts/niah-combine.py" "$N/16bit_bf16_s2.json" "$DIR/broken.json" > "$DIR/broken.txt" 2>&1 \
  && bad "a cell whose 'found' disagrees with 'correct' was accepted" \
  || { grep -q "does not match correct" "$DIR/broken.txt" && ok || bad "no reason given: $(cat "$DIR/broken.txt")"; }

echo "cli_docs_niah: $pass passed, $fail failed"
[ $fail -eq 0 ]
