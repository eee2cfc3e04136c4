#!/usr/bin/env bash
# The shared library exports exactly the functions include/oscar.h declares:
# every other symbol (backend tables, numerics helpers, kernels' host stubs)
# is hidden. usage: cli_symbols.sh OSCAR_BINARY BUILD_DIR (the library sits
# beside the binary). Skips (77) without nm or python3.
set -u
lib="$(dirname "$1")/liboscar.so"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
command -v nm >/dev/null 2>&1 || { echo "SKIP: nm not found"; exit 77; }
command -v python3 >/dev/null 2>&1 || { echo "SKIP: python3 not found"; exit 77; }
[ -f "$lib" ] || { echo "FAIL: $lib not found"; exit 1; }
nm -D --defined-only "$lib" | awk '{print $3}' | python3 -c '
import re, sys
exported = set(l.strip() for l in sys.stdin if l.strip())
hdr = open(sys.argv[1]).read()
hdr = re.sub(r"/\*.*?\*/", "", hdr, flags=re.S)          # comments
hdr = re.sub(r"^\s*#.*$", "", hdr, flags=re.M)            # preprocessor lines
declared = set(re.findall(r"\b(oscar_[a-z0-9_]+)\s*\(", hdr))
extra, missing = sorted(exported - declared), sorted(declared - exported)
print("exported %d symbols, oscar.h declares %d functions" % (len(exported), len(declared)))
if extra: print("FAIL: exported but not in oscar.h:", " ".join(extra))
if missing: print("FAIL: declared in oscar.h but not exported:", " ".join(missing))
print("1 passed, 0 failed" if not (extra or missing) else "0 passed, 1 failed")
sys.exit(1 if extra or missing else 0)
' "$root/include/oscar.h"
