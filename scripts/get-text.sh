#!/usr/bin/env bash
# Fetches the evaluation text: the Debian Policy Manual (plain-text edition,
# policy.txt) from the Debian package `debian-policy` (4.6.2.0 in Debian 12),
# real English technical prose of about 110K SmolLM2 tokens. The table of
# contents is dropped; the text starts at chapter 1. Writes
# models/debian-policy.txt. Idempotent.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/models/debian-policy.txt"
want="${OSCAR_POLICY_VERSION:-4.6.2.0}"
if [ -s "$dest" ]; then
    echo "$dest"
    exit 0
fi
for tool in apt-get dpkg-deb; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "get-text.sh: needs $tool (a Debian/Ubuntu system) to fetch the debian-policy package" >&2
        exit 1
    fi
done
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
# the pinned version if the archive has it, else whatever the archive offers
if ! apt-get download "debian-policy=$want" >/dev/null 2>&1; then
    echo "get-text.sh: debian-policy=$want not in the apt lists; trying the archive's version" >&2
    if ! apt-get download debian-policy >/dev/null 2>&1; then
        echo "get-text.sh: apt-get download debian-policy failed (run apt-get update, or no network)" >&2
        exit 1
    fi
fi
deb="$(ls debian-policy_*.deb | head -n1)"
got="$(dpkg-deb -f "$deb" Version)"
dpkg-deb -x "$deb" x
src="x/usr/share/doc/debian-policy/policy.txt.gz"
if [ ! -s "$src" ]; then
    echo "get-text.sh: $deb has no policy.txt.gz" >&2
    exit 1
fi
mkdir -p "$(dirname "$dest")"
# skip the title page and table of contents (whose entries start with "* "):
# start at the chapter heading "1. About this manual"
gzip -dc "$src" | awk '/^1\. About this manual$/{on=1} on{print}' > "$dest.part"
if [ ! -s "$dest.part" ]; then
    echo "get-text.sh: could not find chapter 1 in policy.txt" >&2
    rm -f "$dest.part"
    exit 1
fi
mv "$dest.part" "$dest"
echo "get-text.sh: debian-policy $got -> $dest ($(wc -c < "$dest") bytes)" >&2
echo "$dest"
