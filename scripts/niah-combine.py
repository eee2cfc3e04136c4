#!/usr/bin/env python3
"""Combine `oscar niah --json` grids over seeds and compare caches with a
paired test.

usage: scripts/niah-combine.py [--ref LABEL] [--threshold 0.9] A.json B.json ...

Runs of one cache (same cache label, R, groups, device and weights) with different
seeds are summed cell by cell; the same seed twice for one cache is refused
(it would count the same prompts twice). The reference cache is the first
one read, or the one whose label contains --ref. For every other cache it
prints:

  - the grid (% found, depths down, lengths across) and the overall count;
  - the issue-11 criterion: in each cell where the reference finds at least
    the threshold (90%) of the keys, does the cache find at least as many?
  - McNemar's exact test over the paired prompts (the same seed, length,
    depth and trial give the same prompt in every run, so outcomes pair up):
    b = prompts the reference found and the cache missed, c = the reverse,
    p = the two-sided binomial probability of a split at least as uneven as
    (b, c) if neither cache is better. Over all prompts and over the
    reference's >= 90% cells.

Only the standard library: the CI machine runs it on the repository's
recorded grids (docs/niah/*.json).
"""
import argparse
import json
import math
import sys


def binom_two_sided(b, c):
    """Exact two-sided McNemar p: P(min split <= min(b, c)) * 2 at p = 1/2."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def load(paths):
    caches = {}  # key -> {"label", "seeds", "cells": {(L, D): [correct, trials]}, "found": {(seed, L, D): str}}
    order = []
    for p in paths:
        with open(p) as f:
            j = json.load(f)
        if j.get("control"):
            sys.exit(f"niah-combine: {p} is a --control run (no key was given)")
        quant = j["method"] != "none"
        key = (j["cache"], j.get("device", "?"), j.get("weights", "?"),
               j["residual"] if quant else 0, j.get("k_group", 0) if quant else 0, j.get("v_group", 0) if quant else 0)
        c = caches.get(key)
        if c is None:
            shape = f", R {key[3]}, groups {key[4]}/{key[5]}" if quant else ""
            c = caches[key] = {"label": f"{j['cache']} [{key[1]}, {key[2]} weights{shape}]", "seeds": set(),
                               "cells": {}, "found": {}}
            order.append(key)
        seed = j["seed"]
        if seed in c["seeds"]:
            sys.exit(f"niah-combine: {p}: seed {seed} of '{c['label']}' was read already")
        c["seeds"].add(seed)
        for cell in j["cells"]:
            LD = (cell["length"], cell["depth"])
            acc = c["cells"].setdefault(LD, [0, 0])
            acc[0] += cell["correct"]
            acc[1] += j["trials"]
            s = cell.get("found")
            if s is not None:
                if len(s) != j["trials"] or sum(ch == "1" for ch in s) != cell["correct"]:
                    sys.exit(f"niah-combine: {p}: cell {LD}: 'found' {s!r} does not match correct {cell['correct']}")
                c["found"][(seed,) + LD] = s
    return caches, order


def grid(c):
    lengths = sorted({L for L, _ in c["cells"]})
    depths = sorted({D for _, D in c["cells"]})
    return lengths, depths


def print_grid(c):
    lengths, depths = grid(c)
    print(f"\n{c['label']}, seeds {sorted(c['seeds'])}")
    print("| depth \\ length | " + " | ".join(str(L) for L in lengths) + " |")
    print("| --- |" + " --- |" * len(lengths))
    for D in depths:
        row = []
        for L in lengths:
            k, n = c["cells"].get((L, D), [0, 0])
            row.append(f"{100.0 * k / n:.0f} ({k}/{n})" if n else "-")
        print(f"| {D}% | " + " | ".join(row) + " |")
    k = sum(v[0] for v in c["cells"].values())
    n = sum(v[1] for v in c["cells"].values())
    print(f"overall {100.0 * k / n:.1f}% ({k} of {n})")


def compare(ref, c, threshold):
    strong = sorted(LD for LD, (k, n) in ref["cells"].items() if n and k >= threshold * n)
    matched, missed = [], []
    for LD in strong:
        rk, rn = ref["cells"][LD]
        ck, cn = c["cells"].get(LD, [0, 0])
        if cn != rn:
            missed.append((LD, f"{ck}/{cn} (other trials)"))
        elif ck >= rk:
            matched.append(LD)
        else:
            missed.append((LD, f"{ck}/{cn} against {rk}/{rn}"))

    def paired(cells):
        b = cc = n = 0
        for key, rs in ref["found"].items():
            if (key[1], key[2]) not in cells or key not in c["found"]:
                continue
            for x, y in zip(rs, c["found"][key]):
                n += 1
                b += x == "1" and y == "0"
                cc += x == "0" and y == "1"
        return n, b, cc

    print(f"\n{c['label']} against {ref['label']}:")
    print(f"  cells where the reference finds >= {threshold:.0%}: {len(strong)}; "
          f"the cache finds at least as many in {len(matched)}")
    for LD, why in missed:
        print(f"    short at {LD[0]} tokens, depth {LD[1]}%: {why}")
    for name, cells in (("all prompts", set(ref["cells"])), (f"the >= {threshold:.0%} cells", set(strong))):
        n, b, cc = paired(cells)
        if n == 0:
            print(f"  McNemar over {name}: no paired prompts (runs without 'found', or different seeds)")
            continue
        print(f"  McNemar over {name}: {n} paired prompts, reference only {b}, cache only {cc}, "
              f"exact two-sided p = {binom_two_sided(b, cc):.3g}")
    return len(strong), len(matched)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--ref", help="a substring of the reference cache's label (default: the first file's cache)")
    ap.add_argument("--threshold", type=float, default=0.9)
    a = ap.parse_args()
    caches, order = load(a.files)
    ref_key = order[0]
    if a.ref:
        hits = [k for k in order if a.ref in caches[k]["label"]]
        if len(hits) != 1:
            sys.exit(f"niah-combine: --ref '{a.ref}' matches {len(hits)} caches: "
                     + "; ".join(caches[k]["label"] for k in order))
        ref_key = hits[0]
    for k in order:
        print_grid(caches[k])
    for k in order:
        if k != ref_key:
            compare(caches[ref_key], caches[k], a.threshold)


if __name__ == "__main__":
    main()
