#!/usr/bin/env python3
"""KL divergence against bits per element: oscar's caches and llama.cpp's.

Inputs: the JSON lines of `oscar ppl --score-second-half --json` (one per
cache; scripts/gpu-full-model.sh writes them as kl.jsonl) and llama.cpp's
points, either the logs of scripts/kl-llamacpp.sh (a directory with one
<type>.log per cache type, llama-perplexity's KLD summary) or JSON lines
with "runner": "llama.cpp" (in the oscar file itself, or in --llama-json).
Both runners score the same tokens of the same text with the same GGUF.
docs/kl_points.jsonl holds every point of docs/kl_pareto.png.

Bits per element count what a cache holds during a decode of --ctx tokens:
oscar's packed blocks plus its exact tokens at 16 bits, S + L + (R - 1) / 2
on average (S sink tokens, "sinks"; a minimum exact lag L, "min_exact"; the
window of R = "residual" tokens that fills and is packed). Lines of
`oscar ppl` that carry "bits_per_element_4k" give it directly (used when
--ctx is 4096); older lines without "sinks" / "min_exact" have S = L = 0.
llama.cpp's block formats have no window (f16 16, q8_0 8.5, q5_0 5.5, q4_1
5.0, q4_0 4.5 bits).

usage: plot-kl-pareto.py POINTS.jsonl OUT.png [--llama-json FILE] [--ctx 4096]
       plot-kl-pareto.py OSCAR_KL.jsonl LLAMA_DIR OUT.png [--ctx 4096]
e.g.   python3 scripts/plot-kl-pareto.py docs/kl_points.jsonl docs/kl_pareto.png
Prints the table it plots (markdown) on stdout.
"""
import argparse
import json
import math
import os
import re
import sys

LLAMA_BITS = {"f16": 16.0, "q8_0": 8.5, "q5_0": 5.5, "q4_1": 5.0, "q4_0": 4.5}
NAN = float("nan")


def llama_kld(path):
    """Mean KLD, 99th percentile and 'same top p' from a llama-perplexity log."""
    text = open(path, errors="replace").read()
    num = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
    mean = re.search(r"Mean\s+KLD:\s+" + num, text)
    p99 = re.search(r"99\.0%\s+KLD:\s+" + num, text)
    top = re.search(r"Same top p:\s+" + num, text)
    ppl = re.search(r"Mean PPL\(Q\)\s*:\s+" + num, text)
    ppl_base = re.search(r"Mean PPL\(base\)\s*:\s+" + num, text)
    if not mean:
        return None
    return {"kl_mean": float(mean.group(1)), "kl_p99": float(p99.group(1)) if p99 else NAN,
            "top1": float(top.group(1)) / 100 if top else NAN,
            "dppl": 100 * (float(ppl.group(1)) / float(ppl_base.group(1)) - 1) if ppl and ppl_base else NAN}


def oscar_label(r):
    """The whole cache configuration, compactly: method and widths (K/V when they
    differ), groups when not 32/32, R, then sinks S, minimum exact lag L,
    per-head key norms and clipping when on."""
    kb = r.get("key_bits", r["bits"])
    vb = r.get("value_bits", r["bits"])
    s = "%s-%d" % (r["method"], kb) if kb == vb else "%s K%d/V%d" % (r["method"], kb, vb)
    if (r.get("k_group", 32), r.get("v_group", 32)) != (32, 32):
        s += " g%d/%d" % (r["k_group"], r["v_group"])
    s += " R%d" % r["residual"]
    if r.get("sinks"):
        s += " S%d" % r["sinks"]
    if r.get("min_exact"):
        s += " L%d" % r["min_exact"]
    if r.get("norm_per_head"):
        s += " nph"
    if r.get("clip"):
        s += " clip"
    return s


def oscar_row(r, ctx):
    exact = r.get("sinks", 0) + r.get("min_exact", 0) + (r["residual"] - 1) / 2
    if "bits_per_element_4k" in r and ctx == 4096:
        eff = r["bits_per_element_4k"]
    else:
        b = r["bits_per_element"]
        eff = b + (16 - b) * exact / ctx
    return {"runner": "oscar", "name": oscar_label(r), "bits": eff, "exact": exact, "kl": r["kl_mean"],
            "p99": r["kl_p99"], "top1": r["top1_agree"], "dppl": r["delta_ppl_pct"], "tokens": r.get("tokens")}


def llama_row(r):
    return {"runner": "llama.cpp", "name": r["cache"], "bits": r.get("bits_per_element", LLAMA_BITS.get(r["cache"], NAN)),
            "exact": None, "kl": r["kl_mean"], "p99": r.get("kl_p99", NAN), "top1": r.get("top1_agree", NAN),
            "dppl": r.get("delta_ppl_pct", NAN), "tokens": r.get("tokens")}


def read_jsonl(path):
    out = []
    for line in open(path):
        line = line.strip()
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def pareto(rows):
    """Rows that no other row beats on both bits and KL (lower is better)."""
    front = []
    for r in rows:
        if not any(o is not r and o["bits"] <= r["bits"] and o["kl"] <= r["kl"] and
                   (o["bits"] < r["bits"] or o["kl"] < r["kl"]) for o in rows):
            front.append(r)
    return sorted(front, key=lambda r: r["bits"])


def place_labels(fig, ax, rows, obstacles=()):
    """Greedy label placement, highest KL first: the first of a few offsets whose
    box overlaps no placed label, no marker and none of the obstacles (artists
    already drawn: legend, notes); a leader line when the label is off its point."""
    from matplotlib.transforms import Bbox
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    pts = [ax.transData.transform((r["bits"], r["kl"])) for r in rows]
    rad = 4.5  # marker radius, pixels
    markers = [Bbox([[x - rad, y - rad], [x + rad, y + rad]]) for x, y in pts]
    placed = [o.get_window_extent(renderer) for o in obstacles]
    cands = [(6, 3), (6, 12), (6, -11), (-6, 3), (-6, -11), (-6, 12), (6, -20), (-6, -20),
             (30, 16), (30, -26), (-30, 16), (-30, -26), (40, 0), (-40, 0), (50, 28), (50, -38),
             (-50, 28), (-50, -38)]
    for r, (px, py) in sorted(zip(rows, pts), key=lambda t: -t[0]["kl"]):
        choice = None
        for dx, dy in cands:
            t = ax.annotate(r["name"], (r["bits"], r["kl"]), textcoords="offset points", xytext=(dx, dy),
                            fontsize=7, ha="left" if dx > 0 else "right", va="bottom")
            bb = t.get_window_extent(renderer)
            t.remove()
            inside = ax.bbox.contains(bb.x0, bb.y0) and ax.bbox.contains(bb.x1, bb.y1)
            if inside and not any(bb.overlaps(o) for o in placed + markers):
                choice = (bb, dx, dy)
                break
        if choice is None:
            print(f"label {r['name']!r}: no free place, put at the first offset", file=sys.stderr)
            choice = (None, cands[0][0], cands[0][1])
        bb, dx, dy = choice
        far = abs(dx) > 10 or abs(dy) > 10
        ax.annotate(r["name"], (r["bits"], r["kl"]), textcoords="offset points", xytext=(dx, dy), fontsize=7,
                    ha="left" if dx > 0 else "right", va="bottom",
                    arrowprops=dict(arrowstyle="-", color="0.5", lw=0.6, shrinkA=0, shrinkB=4) if far else None)
        if bb is not None:
            placed.append(bb)


def main():
    ap = argparse.ArgumentParser(usage="%(prog)s POINTS.jsonl [LLAMA_DIR] OUT.png [--llama-json FILE] [--ctx 4096]")
    ap.add_argument("paths", nargs="+", help="oscar JSON lines (llama.cpp lines too, with \"runner\": \"llama.cpp\"), "
                    "optionally a directory of llama-perplexity logs, and the PNG to write")
    ap.add_argument("--llama-json", help="llama.cpp points as JSON lines (or one JSON list) with "
                    "\"runner\": \"llama.cpp\", \"cache\", \"kl_mean\", \"kl_p99\", \"top1_agree\", \"delta_ppl_pct\"")
    ap.add_argument("--ctx", type=int, default=4096)
    a = ap.parse_args()
    if len(a.paths) == 2:
        oscar_path, llama_dir, out_png = a.paths[0], None, a.paths[1]
    elif len(a.paths) == 3:
        oscar_path, llama_dir, out_png = a.paths
    else:
        ap.error("give POINTS.jsonl [LLAMA_DIR] OUT.png")
    rows = []
    records = read_jsonl(oscar_path)
    if a.llama_json:
        text = open(a.llama_json).read().strip()
        records += json.loads(text) if text.startswith("[") else read_jsonl(a.llama_json)
    for r in records:
        if r.get("runner") == "llama.cpp":
            if r["kl_mean"] > 0:  # f16 is the reference (KL 0)
                rows.append(llama_row(r))
        elif r.get("method") != "none":
            rows.append(oscar_row(r, a.ctx))
    if llama_dir:
        for t, bits in LLAMA_BITS.items():
            p = os.path.join(llama_dir, t + ".log")
            if t == "f16" or not os.path.exists(p):
                continue
            k = llama_kld(p)
            if k is None:
                print(f"{p}: no KLD summary", file=sys.stderr)
                continue
            rows.append(llama_row({"cache": t, "bits_per_element": bits, "kl_mean": k["kl_mean"],
                                   "kl_p99": k["kl_p99"], "top1_agree": k["top1"], "delta_ppl_pct": k["dppl"]}))
    if not rows:
        print("no points", file=sys.stderr)
        return 1
    tokens = {r["tokens"] for r in rows if r["tokens"] is not None}
    if len(tokens) > 1:
        print(f"warning: the points score different token counts {sorted(tokens)}", file=sys.stderr)
    rows.sort(key=lambda r: (r["bits"], r["kl"]))
    front = pareto(rows)
    print("| runner | cache | bits/element (exact tokens included, %dK avg) | exact tokens (avg) | mean KL | KL p99 "
          "| top-1 agreement | ΔPPL | Pareto front |" % (a.ctx // 1024))
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ex = "-" if r["exact"] is None else "%g" % r["exact"]
        print(f"| {r['runner']} | {r['name']} | {r['bits']:.2f} | {ex} | {r['kl']:.4f} | {r['p99']:.3f} | "
              f"{r['top1']:.3f} | {r['dppl']:+.2f}% | {'yes' if any(r is f for f in front) else ''} |")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: table only", file=sys.stderr)
        return 0
    fig, ax = plt.subplots(figsize=(9, 6))
    refs = []
    q4 = [r for r in rows if r["runner"] == "llama.cpp" and r["name"] == "q4_0"]
    if q4:
        ax.axhline(q4[0]["kl"], color="tab:red", ls=":", lw=1, zorder=1)
        refs.append(ax.text(0.995, q4[0]["kl"], "llama.cpp q4_0's KL, %.4f" % q4[0]["kl"], color="tab:red",
                fontsize=7, va="bottom", ha="right", transform=ax.get_yaxis_transform(), zorder=1))
    ax.axvline(3.5, color="0.3", ls="--", lw=1, zorder=1)
    refs.append(ax.text(3.5, 0.99, " 3.5-bit budget", color="0.3", fontsize=7, va="top", ha="left",
                        transform=ax.get_xaxis_transform()))
    fx, fy = [], []
    for i, r in enumerate(front):
        fx.append(r["bits"])
        fy.append(r["kl"])
        if i + 1 < len(front):
            fx.append(front[i + 1]["bits"])
            fy.append(r["kl"])
    ax.plot(fx, fy, color="tab:green", lw=1.2, alpha=0.8, zorder=2, label="Pareto front")
    for who, marker, color in (("oscar", "o", "tab:blue"), ("llama.cpp", "s", "tab:red")):
        pts = [r for r in rows if r["runner"] == who]
        ax.scatter([r["bits"] for r in pts], [r["kl"] for r in pts], marker=marker, color=color, s=28,
                   label=who, zorder=3)
    ax.scatter([r["bits"] for r in front], [r["kl"] for r in front], marker="o", s=110, facecolors="none",
               edgecolors="tab:green", lw=1.3, zorder=4)
    ax.set_yscale("log")
    lo = min(r["kl"] for r in rows)
    hi = max(r["kl"] for r in rows)
    ax.set_ylim(lo / 1.6, hi * 1.6)
    xs = [r["bits"] for r in rows]
    ax.set_xlim(math.floor(min(xs)) - 0.1, max(xs) + 0.6)
    ax.set_xlabel("bits per K/V element over a %d-token decode (exact tokens S + L + (R-1)/2 at 16 bits included)"
                  % a.ctx, fontsize=9)
    ax.set_ylabel("mean KL(16-bit || cache), nats per token")
    n = sorted(tokens)[0] if len(tokens) == 1 else None
    ax.set_title("SmolLM2-135M, %d-token chunks, same text and scored tokens%s" %
                 (a.ctx, " (%d)" % n if n else ""), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    leg = ax.legend(loc="upper right", fontsize=8)
    note = ax.text(0.99, 0.80, "R residual window, S sinks, L min-exact lag,\ng key/value groups (32/32 if absent)",
            transform=ax.transAxes, fontsize=7, ha="right", va="top", color="0.3")
    fig.tight_layout()
    place_labels(fig, ax, rows, [leg, note] + refs)
    fig.savefig(out_png, dpi=110)
    print(f"wrote {out_png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
